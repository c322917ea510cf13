"""Test utilities shipped with the package (as ``torch.testing`` is): what the test suite
and the benchmarks share, so that neither imports the other. Nothing here imports pytest;
third-party test tools (moto, s3fs, psutil) are imported when used.

* :mod:`nrd_dist.testing.processes`: free loopback ports, killing a process tree by PID,
  reading a log's tail.
* :mod:`nrd_dist.testing.s3_server`: a real S3-protocol server (moto in server mode) on
  loopback, for the storage tests and ``benchmarks/streaming.py``.
"""

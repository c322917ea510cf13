"""A real S3-protocol server on loopback: ``moto_server`` in a process of its own (what
s3fs's own tests use), for the storage tests (``tests/conftest.py``'s ``s3_server``
fixture) and ``benchmarks/streaming.py``. moto and s3fs are imported when used."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from nrd_dist.testing.processes import free_port, kill_tree, read_tail

# Credentials for the loopback S3 server only; moto accepts any pair unless told to
# enforce IAM. AWS_EC2_METADATA_DISABLED keeps botocore off 169.254.169.254.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "nrd-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "nrd-test-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    """``moto_server`` in a process of its own on 127.0.0.1.

    ``endpoint``: its URL; ``env``: what a subprocess needs to reach it (credentials and
    ``AWS_ENDPOINT_URL``); ``storage_options``: the fsspec options for this process;
    ``fs()``: a fresh s3fs filesystem. ``stop()``/``start()`` kill and restart it (state
    is lost: moto keeps it in memory)."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.storage_options = {
            "endpoint_url": self.endpoint,
            "key": S3_ENV["AWS_ACCESS_KEY_ID"],
            "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        }
        self.proc: Optional[subprocess.Popen] = None

    def start(self, extra_env: Optional[dict] = None) -> "S3Server":
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **S3_ENV, **(extra_env or {})},
        )
        log.close()
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return self
            except OSError as err:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start: {read_tail(self.log_path)}") from err
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait()
            self.proc = None

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def upload(self, local_dir: Path, url: str) -> list[str]:
        """Copy every file of ``local_dir`` to ``s3://bucket/prefix`` (bucket created)."""
        fs = self.fs()
        bucket = url.removeprefix("s3://").split("/")[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        uploaded = []
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{url.rstrip('/')}/{path.name}")
                uploaded.append(f"{url.rstrip('/')}/{path.name}")
        return uploaded

"""Shard streaming throughput: the same shards from local disk and from an S3 server on
loopback (moto in server mode, started here), through the training stream (fetch,
untar, decode, labels; no augmentation), in samples/s.

    .venv/bin/python benchmarks/streaming.py [--shards DIR] [--workers N] [--repeats R]

DIR defaults to the demo's Fashion-MNIST training shards (data/fmnist/train, written by
``make demo``). Each configuration is timed ``repeats`` times, alternating local and S3,
and the best run is kept (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import DEMO_TRAIN_SHARDS, local_shards  # benchmarks/common.py: run as a script, its folder is on sys.path
from nrd_dist.data.shards import ShardStream, make_loader
from nrd_dist.testing.s3_server import S3Server  # the tests' S3 server, shared with tests/conftest.py


def samples_per_s(urls: list[str], workers: int, options: dict, batch_size: int = 256) -> tuple[float, int]:
    stream = ShardStream(urls, lambda image: image, num_classes=1000, channels=1, train=False, storage_options=options)
    loader = make_loader(stream, batch_size, workers, drop_last=False)
    started = time.perf_counter()
    count = sum(len(batch["label"]) for batch in loader)
    return count / (time.perf_counter() - started), count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=DEMO_TRAIN_SHARDS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    local = local_shards(args.shards)
    server = S3Server(Path("/tmp/nrd-bench-moto.log")).start()
    try:
        remote = [url for url in server.upload(args.shards, "s3://bench/shards") if url.endswith(".tar")]
        results = {"local": [], "s3": []}
        for _ in range(args.repeats):
            for name, urls in (("local", local), ("s3", remote)):
                rate, count = samples_per_s(urls, args.workers, server.storage_options)
                results[name].append(rate)
        best = {name: max(rates) for name, rates in results.items()}
        report = {
            "shards": str(args.shards),
            "num_shards": len(local),
            "samples": count,
            "bytes": sum(Path(p).stat().st_size for p in local),
            "workers": args.workers,
            "local_samples_per_s": round(best["local"]),
            "s3_samples_per_s": round(best["s3"]),
            "s3_over_local": round(best["s3"] / best["local"], 3),
            "all_runs": {k: [round(r) for r in v] for k, v in results.items()},
        }
        print(json.dumps(report, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

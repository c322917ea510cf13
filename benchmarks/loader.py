"""Training-loader throughput, samples/s per worker: our shard stream building the student
and teacher (AugMix) views, against torchvision's ``ImageFolder`` over the very same
images (written out as files) with the very same transforms, and against the
decode-only limit (shard stream, no augmentation).

    .venv/bin/python benchmarks/loader.py [--shards DIR] [--samples N] [--workers 1] [--repeats 3]

The three loaders alternate ``repeats`` times and the best run of each is kept (the
least disturbed by other load). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from common import DEMO_TRAIN_SHARDS, local_shards
from nrd_dist.data.augment import TrainViews, build_policy
from nrd_dist.data.shards import ShardStream, make_loader


def timed(loader, samples: int, batch_size: int) -> float:
    """samples/s over ``samples`` samples, after one warm-up batch (worker start-up)."""
    batches = iter(loader)
    next(batches)
    started = time.perf_counter()
    for _ in itertools.islice(batches, samples // batch_size):
        pass
    return (samples // batch_size) * batch_size / (time.perf_counter() - started)


def as_image_folder(shard: str, root: Path, limit: int) -> int:
    """The shard's images as ``root/{label}/{key}.png`` files, byte for byte."""
    count = 0
    for sample in itertools.islice(wds.WebDataset(shard, shardshuffle=False), limit):
        folder = root / sample["cls"].decode()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
        count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=DEMO_TRAIN_SHARDS)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shards = local_shards(args.shards)
    policy = build_policy("fmnist")
    views = TrainViews(policy, with_teacher=True)
    rates: dict[str, list[float]] = {
        "shards_student_teacher": [],
        "imagefolder_student_teacher": [],
        "shards_decode_only": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        count = as_image_folder(shards[0], Path(tmp), args.samples + 2 * args.batch_size)
        folder = datasets.ImageFolder(
            tmp, transform=transforms.Compose([transforms.PILToTensor(), views])
        )  # the same uint8 [C, H, W] input as the shards'
        for _ in range(args.repeats):
            for name in rates:
                if name == "imagefolder_student_teacher":
                    loader = DataLoader(
                        folder,
                        batch_size=args.batch_size,
                        shuffle=True,
                        num_workers=args.workers,
                        prefetch_factor=4 if args.workers else None,
                        drop_last=True,
                    )
                else:
                    transform = views if name == "shards_student_teacher" else (lambda image: (image, None))
                    stream = ShardStream(
                        [shards[0]], transform, num_classes=10, channels=1, train=True, shuffle_buffer=1000
                    )
                    loader = make_loader(stream, args.batch_size, args.workers)
                rates[name].append(timed(loader, args.samples, args.batch_size))
    best = {name: max(values) for name, values in rates.items()}
    per_worker = max(args.workers, 1)
    report = {
        "images": f"Fashion-MNIST 28x28 PNG ({count} written as files for ImageFolder)",
        "workers": args.workers,
        "batch_size": args.batch_size,
        "samples_timed": args.samples,
        **{f"{name}_per_worker": round(rate / per_worker) for name, rate in best.items()},
        "shards_over_imagefolder": round(best["shards_student_teacher"] / best["imagefolder_student_teacher"], 3),
        "views_over_decode_only": round(best["shards_student_teacher"] / best["shards_decode_only"], 3),
        "all_runs": {k: [round(v) for v in values] for k, values in rates.items()},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

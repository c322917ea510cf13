"""``python tools/make_shards.py DATASET --src SRC --out OUT [--split S] ...``

Converts a dataset in its original layout into webdataset shards plus ``manifest.json``
(docs/design.md, "Shards"), optionally baking in synthetic label noise through the same
``apply_noise`` used at load time (so both routes give identical noisy labels).

Each split goes to ``OUT/{split}/{split}-{000000..}.tar`` with its own manifest. ``OUT``
is a local folder or any fsspec URL (``s3://bucket/webvision``): credentials and
endpoint from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE`` ...), plus ``--storage-options '{"endpoint_url": ...}'`` (JSON; the
names of ``data.storage``, any other fsspec option of the protocol passed through).
Remote shards are written to a local temporary file, uploaded, then recorded.

Datasets:
* ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...), by default from
  Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* ``cifar10`` / ``cifar100``: the official "python version" pickle batches
  (``cifar-10-batches-py/`` / ``cifar-100-python/``, or those folders' contents).
* ``folder``: ``SRC/{class_name}/*.{jpg,jpeg,png,webp}``; class index = position in the
  sorted folder names.
* ``webvision``: WebVision 1.0 as distributed. ``SRC/info/synsets.txt`` (one
  ``n01440764 tench, Tinca tinca`` line per class; class index = line number, 0-based),
  split ``train`` = the Google subset (``SRC/info/train_filelist_google.txt``, lines
  ``google/q0001/00000001.jpg 0``, images under ``SRC/``), split ``val``
  (``SRC/info/val_filelist.txt``, lines ``val000001.jpg 0``, images in
  ``SRC/val_images_256/``, else ``SRC/val_images/``). ``--webvision-info DIR`` replaces
  ``SRC/info``. Only labels ``< --classes`` (default 50: mini-WebVision) are kept;
  dropping the others is selection, counted in the manifest as ``excluded_other_classes``.
* ``imagenet-val``: the ILSVRC2012 validation images of the same classes, split ``val``,
  labelled through WebVision's ``synsets.txt`` (label i = the i-th WebVision synset;
  ``--webvision-info DIR`` names the folder holding it, required), keeping synsets among
  the first ``--classes``. ``SRC`` is either flat (``ILSVRC2012_val_00000001.JPEG`` ...
  with the devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` and ``data/meta.mat``;
  the devkit is ``--devkit DIR``, else ``SRC/ILSVRC2012_devkit_t12``, else
  ``SRC/../ILSVRC2012_devkit_t12``) or one folder per synset (``SRC/n01440764/*.JPEG``).
  Samples are in file-name order in both layouts, so the same images give the same
  keys, labels and images whichever layout holds them.

Keys and fields. Keys are ``{split}_{i:06d}`` (wider past a million), ``i`` counting the
samples of the split in source order after class selection (file-list order; sorted
names for folders; image number for imagenet-val). A bad sample keeps its number, so
skipping one never renames the others (and noise, a function of the key, never moves).
Each sample holds the image (``.jpg``/``.png``/``.webp``, by its actual format), ``.cls``
(training label), ``.clean.cls`` (clean label) and, for ``webvision`` and
``imagenet-val``, ``.path.txt``: the image's path relative to ``SRC`` (UTF-8).

Images (file datasets). ``--resize-shorter PX`` shrinks images whose shorter side
exceeds PX so that it becomes PX (the longer side rounded, so the aspect ratio holds to
half a pixel; JPEGs are DCT-downscaled to at least twice the target first, then Lanczos)
and re-encodes them as JPEG at ``--jpeg-quality`` (default 90), as RGB or greyscale.
Other images are copied byte for byte after a full decode check, except formats the
loader cannot read (not JPEG/PNG/WebP: GIF, BMP, TIFF ...), which are re-encoded as JPEG.
EXIF orientation is ignored, as the loader ignores it. ``--workers N`` decodes and
resizes in N processes; results are consumed in order, so the shards are the same
bytes for any N (``--workers 1``, the default, works in-process). The in-memory
datasets (fashion-mnist, cifar) ignore these options.

Bad data. Missing files, malformed list lines, labels out of range (of the synsets,
not of ``--classes``), duplicate paths and unknown synsets are found before anything is
written; unreadable or corrupt images while decoding. By default the tool stops with an
error naming each file (shards finished before a corrupt image stay valid: see
resuming). ``--skip-bad`` skips them instead and lists them in the manifest as
``"skipped": {"count": n, "samples": [{"key", "path", "reason"}]}``.

Resuming and ``--force``. Shard i always holds the same samples (fixed order, fixed
shard size) and shards are byte-reproducible (the writer fixes the tar metadata). Next
to the shards, ``{split}.progress.json`` records a fingerprint of the request (dataset,
split, source listing with file sizes, classes, shard size, image options, noise; not
``--workers`` or the output location) and, per finished shard, its name, count, sha256,
size and source range; it is replaced atomically after each shard and kept after the
run. A rerun of the same request resumes: a recorded shard whose object at the
destination still has its recorded size and sha256 is kept, not rewritten; every other
shard (missing, corrupt, never finished) is written, and the manifest is rewritten
only if its bytes would change, so the result equals an uninterrupted run's. A
destination that holds shards of a *different* request (or shards with no progress
record) is refused without ``--force``; ``--force`` deletes this split's shards,
manifest and progress record (after the source has been read and checked) and starts
over.

Manifest fields: ``dataset``, ``split``, ``source``, ``num_samples``, ``num_classes``,
``classes`` (WNIDs for webvision / imagenet-val), ``class_counts`` (clean labels of the
written samples), ``shard_pattern``, ``shards`` (name, count, sha256, bytes), ``noise``,
``noise_report``, ``skipped``, ``images`` (resize_shorter, jpeg_quality, how many were
resized or re-encoded) and, for webvision / imagenet-val, ``class_descriptions``,
``excluded_other_classes`` and (imagenet-val) ``layout``.

This module is the command line and the order of work; the readers are in
``nrd_dist.tools.sources``, image handling in ``nrd_dist.tools.images``, the output
folder and its progress record in ``nrd_dist.tools.shard_output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from nrd_dist.data import storage
from nrd_dist.data.noise import apply_noise, noise_report
from nrd_dist.data.writer import MANIFEST_NAME, ShardWriter
from nrd_dist.tools.cli import add_noise_arguments, add_storage_argument, noise_spec_from_args, parse_storage_options
from nrd_dist.tools.images import Decoder
from nrd_dist.tools.location import open_location
from nrd_dist.tools.shard_output import SplitOutput
from nrd_dist.tools.sources import (
    CLASS_SELECTING,
    DATASETS,
    DEFAULT_WEBVISION_CLASSES,
    FASHION_MNIST_DIR,
    PROGRESS_FORMAT,
    BadDataError,
    BadSample,
    Options,
    Source,
    SourceError,
)

# ----------------------------------------------------------------------------- writing


@dataclass
class Plan:
    """One split, read and checked, ready to write (nothing written yet)."""

    dataset: str
    split: str
    src: Path
    source: Source
    output: SplitOutput
    shard_size: int
    noise: Optional[dict[str, Any]]
    opts: Options
    records: list[dict[str, Any]] = field(default_factory=list)  # shards of an earlier run
    clear: list[str] = field(default_factory=list)  # --force: to delete first


def prepare(
    dataset: str,
    src: Path,
    out: str,
    split: str,
    shard_size: int = 5000,
    noise: Optional[dict[str, Any]] = None,
    force: bool = False,
    opts: Optional[Options] = None,
) -> Plan:
    """Read and check one split's source and its destination; writes nothing."""
    opts = opts or Options()
    source = DATASETS[dataset][0](src, split, opts)
    what = f"{dataset} {split} in {src}"
    if not source.keys and not source.bad:
        raise SourceError(f"{what}: no samples")
    if source.bad and not opts.skip_bad:
        raise BadDataError(source.bad, what)
    if noise:
        apply_noise([], [], noise, len(source.classes))  # a bad spec fails now, before --force deletes
    files = source.files is not None
    request = {
        "format": PROGRESS_FORMAT,
        "dataset": dataset,
        "split": split,
        "shard_size": shard_size,
        "classes": len(source.classes),
        "noise": noise,
        "source_digest": source.digest,
        "resize_shorter": opts.resize_shorter if files else None,
        "jpeg_quality": opts.jpeg_quality if files else None,
    }
    output = SplitOutput(open_location(out, opts.storage_options).child(split), split, request)
    plan = Plan(dataset, split, src, source, output, shard_size, noise, opts)
    ours = output.existing()
    if not ours:
        return plan
    if force:
        plan.clear = ours
        return plan
    plan.records = output.recorded_shards()
    recorded_bad = [
        BadSample(s["path"], s["reason"], str(src / s["path"]), s.get("index"))
        for r in plan.records
        for s in r.get("skipped", [])
    ]
    if recorded_bad and not opts.skip_bad:
        raise BadDataError(recorded_bad, what, note=f" (recorded in {output.location.url(output.progress_name)})")
    return plan


def _skipped_entry(source: Source, bad: BadSample) -> dict[str, Any]:
    return {
        "key": source.keys[bad.index] if bad.index is not None else None,
        "path": bad.path,
        "reason": bad.reason,
        "index": bad.index,
    }


def write(plan: Plan, progress: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    """Write (or resume) one planned split; returns its manifest and what was done."""
    source, output, split, opts = plan.source, plan.output, plan.split, plan.opts
    dest = output.location
    for name in plan.clear:
        dest.delete(name)
    num_classes = len(source.classes)
    labels = source.labels
    if plan.noise:
        labels = apply_noise(source.keys, source.labels, plan.noise, num_classes)
    pre_bad = {b.index for b in source.bad if b.index is not None}
    pending = [i for i in range(len(source.keys)) if i not in pre_bad]
    records = list(plan.records)
    stats = {"shards_written": 0, "shards_reused": 0}
    tail_skipped: list[dict[str, Any]] = []

    decoder = Decoder(source, opts)
    bar = tqdm(total=len(pending), desc=f"{plan.dataset}/{split}", unit="img", disable=not progress)
    try:
        with dest.staging(".staging-") as staging:
            cursor, shard, stream, stream_at = 0, 0, None, -1
            while cursor < len(pending):
                record = records[shard] if shard < len(records) else None
                if (
                    record is not None
                    and record.get("first") == cursor
                    and dest.matches(record["name"], record["bytes"], record["sha256"])
                ):
                    bar.update(record["end"] - cursor)
                    cursor = record["end"]
                    shard += 1
                    stats["shards_reused"] += 1
                    continue
                if stream is None or stream_at != cursor:
                    if stream is not None:
                        stream.close()
                    stream = decoder.stream(pending[cursor:])
                first, skipped, count = cursor, [], 0
                resized = reencoded = 0
                writer = ShardWriter(staging, "shard", plan.shard_size)
                while count < plan.shard_size and cursor < len(pending):
                    index = pending[cursor]
                    loaded = next(stream)
                    cursor += 1
                    bar.update(1)
                    if loaded.error:
                        bad = BadSample(source.paths[index], loaded.error, source.files[index], index)
                        if not opts.skip_bad:
                            raise BadDataError(
                                [bad],
                                f"{plan.dataset} {split} in {plan.src}",
                                note=(f"; the {shard} shard(s) before it are complete and a rerun resumes"),
                            )
                        skipped.append(_skipped_entry(source, bad))
                        continue
                    fields = {
                        loaded.ext: loaded.data,
                        "cls": str(int(labels[index])).encode(),
                        "clean.cls": str(int(source.labels[index])).encode(),
                    }
                    if source.record_paths:
                        fields["path.txt"] = source.paths[index].encode()
                    writer.write(source.keys[index], fields)
                    count += 1
                    resized += loaded.resized
                    reencoded += loaded.reencoded
                stream_at = cursor
                infos = writer.close()
                if not infos:  # only bad samples were left: no shard, just their report
                    tail_skipped = skipped
                    break
                name = output.shard_name(shard)
                dest.put(staging / infos[0].name, name)
                record = {
                    "name": name,
                    "count": count,
                    "sha256": infos[0].sha256,
                    "bytes": infos[0].bytes,
                    "first": first,
                    "end": cursor,
                    "resized": resized,
                    "reencoded": reencoded,
                    "skipped": skipped,
                }
                records[shard : shard + 1] = [record]
                output.save_progress(records, complete=False)
                shard += 1
                stats["shards_written"] += 1
            if stream is not None:
                stream.close()
    finally:
        bar.close()
        decoder.close()
    del records[shard:]  # only if the source changed under a matching fingerprint
    output.remove_unrecorded_shards(records)
    if not records:
        raise SourceError(f"{plan.dataset} {split} in {plan.src}: no samples left to write")

    written = np.asarray([i for r in records for i in _written_indices(r, pending)], dtype=np.int64)
    skipped = (
        [_skipped_entry(source, b) for b in source.bad] + [s for r in records for s in r["skipped"]] + tail_skipped
    )
    skipped = [{k: v for k, v in entry.items() if k != "index"} for entry in skipped]
    manifest = {
        "dataset": plan.dataset,
        "split": split,
        "source": str(plan.src),
        "num_samples": int(len(written)),
        "num_classes": num_classes,
        "classes": source.classes,
        **source.extra,
        "class_counts": np.bincount(source.labels[written], minlength=num_classes).tolist(),
        "shard_pattern": f"{split}-{{000000..{len(records) - 1:06d}}}.tar",
        "shards": [{k: r[k] for k in ("name", "count", "sha256", "bytes")} for r in records],
        "noise": plan.noise,
        "noise_report": noise_report(source.labels[written], labels[written], num_classes),
        "skipped": {"count": len(skipped), "samples": skipped},
        "images": {
            "resize_shorter": output.request["resize_shorter"],
            "jpeg_quality": output.request["jpeg_quality"],
            "resized": sum(r["resized"] for r in records),
            "reencoded": sum(r["reencoded"] for r in records),
        },
    }
    output.write_if_changed(MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    output.save_progress(records, complete=True)
    return manifest, stats


def _written_indices(record: dict[str, Any], pending: list[int]) -> list[int]:
    skipped = {s["index"] for s in record["skipped"]}
    return [i for i in pending[record["first"] : record["end"]] if i not in skipped]


def make_shards(
    dataset: str,
    src: Path,
    out: Any,
    split: str,
    shard_size: int = 5000,
    noise: Optional[dict[str, Any]] = None,
    force: bool = False,
    progress: bool = True,
    opts: Optional[Options] = None,
) -> dict[str, Any]:
    """Shard one split into ``out/{split}/`` (a folder or a URL) and return its manifest."""
    plan = prepare(dataset, Path(src), str(out), split, shard_size, noise, force, opts)
    return write(plan, progress)[0]


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument(
        "--src", type=Path, help=f"dataset root in its original layout (fashion-mnist default: {FASHION_MNIST_DIR})"
    )
    parser.add_argument(
        "--out", required=True, help="output folder or fsspec URL (s3://bucket/prefix); each split in OUT/SPLIT/"
    )
    parser.add_argument("--split", default="all", help="a split of the dataset, or all (default)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    add_noise_arguments(parser)
    parser.add_argument(
        "--noise-split", default="train", help="split(s) that get the noise, comma-separated (default: train only)"
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help=f"webvision, imagenet-val: keep the first N synsets (default {DEFAULT_WEBVISION_CLASSES})",
    )
    parser.add_argument(
        "--webvision-info",
        type=Path,
        default=None,
        help="folder holding WebVision's synsets.txt (and file lists); webvision "
        "default SRC/info, required for imagenet-val",
    )
    parser.add_argument(
        "--devkit", type=Path, default=None, help="imagenet-val flat layout: the ILSVRC2012_devkit_t12 folder"
    )
    parser.add_argument(
        "--resize-shorter",
        type=int,
        default=None,
        metavar="PX",
        help="file datasets: shrink so the shorter side is PX (never enlarge)",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality when re-encoding (default 90)"
    )
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (output identical for any N)")
    add_storage_argument(parser)
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable/missing/mislabelled/duplicate samples (listed in the manifest)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite shards of a different request")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _options(args: argparse.Namespace) -> Options:
    """Options from the command line; raises ValueError naming the bad option."""
    if args.dataset not in CLASS_SELECTING:
        for flag, value in (("--classes", args.classes), ("--webvision-info", args.webvision_info)):
            if value is not None:
                raise ValueError(f"{flag} applies to webvision and imagenet-val only, not {args.dataset}")
    if args.devkit is not None and args.dataset != "imagenet-val":
        raise ValueError(f"--devkit applies to imagenet-val only, not {args.dataset}")
    if args.resize_shorter is not None and args.resize_shorter <= 0:
        raise ValueError(f"--resize-shorter must be > 0, got {args.resize_shorter}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must lie in [1, 100], got {args.jpeg_quality}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    return Options(
        classes=args.classes,
        webvision_info=args.webvision_info,
        devkit=args.devkit,
        resize_shorter=args.resize_shorter,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
        skip_bad=args.skip_bad,
        storage_options=parse_storage_options(args.storage_options),
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    reader, splits, default_src = DATASETS[args.dataset]
    src = args.src or (Path(default_src) if default_src else None)
    if src is None:
        print(f"error: --src is required for {args.dataset}", file=sys.stderr)
        return 2
    wanted = splits if args.split == "all" else [args.split]
    for split in wanted:
        if split not in splits:
            print(f"error: --split {split!r}: {args.dataset} has splits {', '.join(splits)}", file=sys.stderr)
            return 2
    if args.shard_size <= 0:
        print(f"error: --shard-size must be > 0, got {args.shard_size}", file=sys.stderr)
        return 2
    noise = noise_spec_from_args(args)
    opts = None
    try:
        opts = _options(args)
        # Read and check every split (and its destination) before writing any.
        plans = [
            prepare(
                args.dataset,
                src,
                args.out,
                split,
                args.shard_size,
                noise if split in args.noise_split.split(",") else None,
                args.force,
                opts,
            )
            for split in wanted
        ]
        for plan in plans:
            manifest, stats = write(plan, progress=not args.quiet)
            print(
                json.dumps(
                    {
                        "split": plan.split,
                        "out": plan.output.location.url(),
                        "num_samples": manifest["num_samples"],
                        "shards": len(manifest["shards"]),
                        **stats,
                        "skipped": manifest["skipped"]["count"],
                        "realised_noise_rate": manifest["noise_report"]["realised_rate"],
                    }
                )
            )
    except (SourceError, FileExistsError, ValueError) as err:
        print(storage.redact(f"error: {err}", opts.storage_options if opts else {}), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

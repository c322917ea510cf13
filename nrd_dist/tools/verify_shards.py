"""``python tools/verify_shards.py DIR_OR_URL [--deep] [--storage-options JSON]``

Checks a shard folder (a local path or any fsspec URL such as ``s3://bucket/fmnist/train``)
against the ``manifest.json`` beside its shards (docs/design.md, "Shards").

Always: every shard the manifest lists exists, with the listed size, sha256 and sample
count (samples grouped as the webdataset loader groups them), the counts add up to
``num_samples``, and no ``*.tar`` in the folder is missing from the manifest.
``--deep`` also decodes every image with the training loader's decoder, checks that
labels are integers in ``[0, num_classes)``, that keys are unique across shards, and
that ``class_counts`` and ``noise_report.counts`` match the labels.

Output: one line per problem on stdout, naming the shard URL (and the sample key where
there is one), then a summary line. Exit status: 0 all good, 1 problems found, 2 nothing
could be checked (no manifest, unreachable storage, bad arguments).

Remote access: credentials and endpoint come from the usual AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``
...) or ``--storage-options '{"endpoint_url": ...}'`` (JSON; the names of ``data.storage``,
any other fsspec option of the protocol passed through). Secret
values (``nrd_dist.data.storage.secrets``) never appear in the output.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from nrd_dist.data import storage
from nrd_dist.data.storage import StorageError
from nrd_dist.data.writer import MANIFEST_NAME
from nrd_dist.tools.cli import add_storage_argument, run_cli
from nrd_dist.tools.location import Location, open_location, storage_failure
from nrd_dist.tools.shard_reading import HashingReader, iter_samples, read_manifest_at

# ----------------------------------------------------------------------------- checks


@dataclass
class DeepState:
    """What ``--deep`` accumulates across shards."""

    num_classes: int
    channels: int = 3  # decode as RGB: any image the loader can read, grey or colour
    first_seen: dict[str, str] = field(default_factory=dict)  # key -> URL of its first shard
    labels: list[int] = field(default_factory=list)
    clean_labels: list[int] = field(default_factory=list)  # -1 where unknown


def _pil_problem(data: bytes) -> Optional[str]:
    """Why PIL cannot read this image (chunk checksums included), or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        return f"{type(err).__name__}: {err}"
    return None


def _label(sample: dict[str, Any], suffix: str) -> Optional[int]:
    """The integer in ``sample[suffix]``; None when absent; ValueError when not an integer."""
    if suffix not in sample:
        return None
    try:
        return int(sample[suffix])
    except ValueError:
        raise ValueError(f".{suffix} is not an integer ({sample[suffix][:20]!r})") from None


def _deep_check_sample(
    key: str, members: list[tuple[str, bytes]], url: str, state: DeepState, problem: Callable[[str], None]
) -> None:
    from nrd_dist.data.shards import IMAGE_EXTENSIONS, ShardError, decode_sample  # torch: only for --deep

    where = f"{url}: sample {key!r}"
    if key in state.first_seen:
        problem(f"{where}: duplicate key (also in {state.first_seen[key]})")
    else:
        state.first_seen[key] = url
    sample = {"__key__": key, "__url__": url, **dict(members)}
    labels_ok = False
    try:
        label, clean = _label(sample, "cls"), _label(sample, "clean.cls")
        if label is None:
            problem(f"{where}: no .cls label")
        else:
            bad = [
                f"{name} {value}"
                for name, value in (("label", label), ("clean label", clean))
                if value is not None and not 0 <= value < state.num_classes
            ]
            if bad:
                problem(f"{where}: {' and '.join(bad)} out of range [0, {state.num_classes})")
            else:
                labels_ok = True
                state.labels.append(label)
                state.clean_labels.append(-1 if clean is None else clean)
    except ValueError as err:
        problem(f"{where}: {err}")
    images = [suffix for suffix in IMAGE_EXTENSIONS if suffix in sample]
    if not images:
        problem(f"{where}: no image ({'/'.join(IMAGE_EXTENSIONS)})")
        return
    # PIL first: torchvision 0.29's decode_image kills the process (SIGSEGV) on some
    # corrupt PNGs (libpng "IDAT: incorrect data check"), so only images PIL reads
    # whole reach the training loader's own decoder below.
    for suffix in images:
        reason = _pil_problem(sample[suffix])
        if reason:
            problem(f"{where}: .{suffix} cannot be decoded ({reason})")
            return
    if labels_ok:  # decode_sample also parses the labels, reported above when bad
        try:
            decode_sample(sample, state.channels)
        except ShardError as err:
            problem(f"{where}: the training loader cannot decode it ({err})")


def check_shard(
    location: Location,
    entry: dict[str, Any],
    problem: Callable[[str], None],
    deep: Optional[DeepState] = None,
    on_read: Optional[Callable[[int], Any]] = None,
) -> int:
    """Check one manifest entry; report each problem; return the samples actually read."""
    name = entry["name"]
    url = location.url(name)
    path = location.join(name)
    try:
        size = location.fs.size(path)
    except FileNotFoundError:
        problem(f"{url}: missing (listed in the manifest)")
        return 0
    except Exception as err:  # noqa: BLE001 - denied, unreachable: nothing more can be checked
        raise storage_failure(url, "read", err) from None
    if entry.get("bytes") is not None and size != entry["bytes"]:
        problem(f"{url}: {size} bytes, the manifest says {entry['bytes']}")
    count = 0
    try:
        with location.fs.open(path, "rb") as raw:
            reader = HashingReader(raw, on_read)
            try:
                for key, members in iter_samples(reader):
                    count += 1
                    suffixes = [suffix for suffix, _ in members]
                    for suffix in sorted({s for s in suffixes if suffixes.count(s) > 1}):
                        problem(f"{url}: sample {key!r}: member .{suffix} appears twice")
                    if deep is not None:
                        _deep_check_sample(key, members, url, deep, problem)
            except tarfile.TarError as err:
                problem(f"{url}: unreadable tar after {count} samples ({err})")
            reader.drain()
    except OSError as err:  # the storage failed mid-read: not a verdict on the shard
        raise storage_failure(url, "read", err) from None
    digest = reader.sha256.hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        problem(f"{url}: sha256 {digest} differs from the manifest's {entry['sha256']}")
    if entry.get("count") is not None and count != entry["count"]:
        problem(f"{url}: holds {count} samples, the manifest says {entry['count']}")
    return count


def _check_totals(
    location: Location,
    manifest: dict[str, Any],
    counted: int,
    deep: Optional[DeepState],
    problem: Callable[[str], None],
) -> None:
    url = location.url(MANIFEST_NAME)
    listed = sum(int(s.get("count") or 0) for s in manifest["shards"])
    expected = manifest.get("num_samples")
    if expected is not None and listed != expected:
        problem(f"{url}: shard counts add up to {listed}, num_samples says {expected}")
    if expected is not None and counted != expected:
        problem(f"{location.url()}: the shards hold {counted} samples, num_samples says {expected}")
    if deep is None or not deep.labels:
        return
    C = deep.num_classes
    clean = np.asarray(deep.clean_labels, dtype=np.int64)
    labels = np.asarray(deep.labels, dtype=np.int64)
    clean_or_label = np.where(clean >= 0, clean, labels)
    if manifest.get("class_counts") is not None:
        actual = np.bincount(clean_or_label, minlength=C).tolist()
        if actual != list(manifest["class_counts"]):
            problem(f"{url}: class_counts {manifest['class_counts']} but the (clean) labels give {actual}")
    report = manifest.get("noise_report") or {}
    if report.get("counts") is not None and (clean >= 0).all():
        actual = np.bincount(clean * C + labels, minlength=C * C).reshape(C, C).tolist()
        if actual != report["counts"]:
            problem(f"{url}: noise_report.counts do not match the (clean label, label) pairs in the shards")


@dataclass
class VerifyResult:
    url: str  # the folder, as messages show it
    problems: list[str]
    shards: int  # listed in the manifest
    samples: int  # read from the shards


def verify(
    url: str,
    deep: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
    progress: bool = False,
    report: Callable[[str], None] = print,
) -> VerifyResult:
    """Check the shard folder at ``url``; ``report`` each problem line as it is found.
    Raises :class:`StorageError` when nothing can be checked."""
    location = open_location(url, storage_options)
    manifest, _ = read_manifest_at(location)
    state = None
    if deep:
        num_classes = manifest.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise StorageError(
                f"{location.url(MANIFEST_NAME)}: --deep needs an integer num_classes, got {num_classes!r}"
            )
        state = DeepState(num_classes)
    problems: list[str] = []

    def problem(line: str) -> None:
        problems.append(line)
        report(line)

    try:
        present = location.tar_names()
    except Exception as err:  # noqa: BLE001 - a listing failure after the manifest was read
        raise storage_failure(location.url(), "list", err) from None
    listed = [s["name"] for s in manifest["shards"]]
    for name in sorted(set(present) - set(listed)):
        problem(f"{location.url(name)}: extra tar file, not in the manifest")
    for name in sorted({n for n in listed if listed.count(n) > 1}):
        problem(f"{location.url(name)}: listed more than once in the manifest")
    total = sum(int(s.get("bytes") or 0) for s in manifest["shards"])
    counted = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr, disable=None if progress else True
    ) as bar:
        for entry in manifest["shards"]:
            counted += check_shard(location, entry, problem, state, bar.update)
    _check_totals(location, manifest, counted, state, problem)
    return VerifyResult(location.url(), problems, len(listed), counted)


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="verify_shards.py",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="DIR_OR_URL", help="shard folder holding manifest.json (local or fsspec URL)")
    parser.add_argument(
        "--deep", action="store_true", help="also decode every image and check labels, key uniqueness and class counts"
    )
    add_storage_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)

    def body(options: dict[str, Any]) -> int:
        def report(line: str) -> None:
            tqdm.write(storage.redact(line, options), file=sys.stdout)

        result = verify(args.url, args.deep, options, progress=not args.quiet, report=report)
        n = len(result.problems)
        what = f"{result.shards} shards, {result.samples} samples" + (" (deep)" if args.deep else "")
        verdict = "OK" if not n else f"{n} problem{'s' if n != 1 else ''}"
        print(storage.redact(f"{result.url}: {what}: {verdict}", options))
        return 0 if not n else 1

    return run_cli(body, args.storage_options)


if __name__ == "__main__":
    sys.exit(main())

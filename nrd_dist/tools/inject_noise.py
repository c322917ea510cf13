"""``python tools/inject_noise.py SRC --out OUT --noise-type T --noise-rate R [--noise-seed S] ...``

Bakes synthetic label noise into existing shards: a copy of the shard folder SRC (local
path or fsspec URL, with ``manifest.json``) goes to OUT (likewise) with the training
labels rewritten. The noisy labels are those of ``nrd_dist.data.noise.apply_noise``,
exactly what load-time noise (``data.noise``) and ``make_shards.py --noise-type`` give
for the same spec, because they are a function of (seed, sample key, clean label, spec).

Per sample: the clean label is kept in ``.clean.cls`` (shards without one have their
``.cls`` taken as the clean label and written as ``.clean.cls``; the manifest says how
many), the noisy label goes to ``.cls``, every other member (the image above all) is
copied byte for byte, never decoded. Same shard names and counts as SRC; each source
shard is checked against SRC's manifest (sha256, count) before it is used.

OUT gets a new manifest: SRC's, with the noise spec, ``noise_report`` (realised rate,
transition matrix, counts), new per-shard sha256 and sizes, and ``derived_from`` (SRC's
URL, its manifest's sha256 and per-shard sha256, its noise spec, and where the clean
labels came from). Shards are written to a temporary file and renamed (local) or
uploaded when complete (remote), the manifest last, so an interrupted run leaves no
manifest. The same command gives byte-identical output. OUT must not be SRC; an OUT
that already holds a manifest or shards is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from nrd_dist.data.noise import apply_noise, noise_report
from nrd_dist.data.storage import StorageError
from nrd_dist.data.writer import MANIFEST_NAME, ShardInfo, ShardWriter, write_manifest
from nrd_dist.tools.cli import add_noise_arguments, add_storage_argument, noise_spec_from_args, run_cli
from nrd_dist.tools.location import Location, open_location, same_location
from nrd_dist.tools.shard_reading import HashingReader, iter_samples, read_manifest_at

# ----------------------------------------------------------------------------- one shard


def _int_label(data: bytes, what: str) -> int:
    try:
        return int(data)
    except ValueError:
        raise ValueError(f"{what}: not an integer label ({data[:20]!r})") from None


def _read_labels(path: str, url: str, entry: dict[str, Any], num_classes: int):
    """Pass 1 over a local copy of a source shard: keys, clean labels and whether each
    sample had ``.clean.cls``; the shard is checked against its manifest entry."""
    keys, clean, had_clean = [], [], []
    with open(path, "rb") as raw:
        reader = HashingReader(raw)
        for key, members in iter_samples(reader, lcase=False):
            fields = dict(members)
            where = f"{url}: sample {key!r}"
            if len(fields) != len(members):  # the loader refuses such a sample too
                raise ValueError(f"{where}: a member name appears twice")
            if "cls" not in fields:
                raise ValueError(f"{where}: no .cls label")
            label = _int_label(fields.get("clean.cls", fields["cls"]), where)
            if not 0 <= label < num_classes:
                raise ValueError(f"{where}: label {label} out of range [0, {num_classes})")
            keys.append(key)
            clean.append(label)
            had_clean.append("clean.cls" in fields)
        reader.drain()
    if entry.get("sha256") and reader.sha256.hexdigest() != entry["sha256"]:
        raise ValueError(
            f"{url}: sha256 differs from the source manifest; the source is damaged (tools/verify_shards.py tells more)"
        )
    if entry.get("count") is not None and len(keys) != entry["count"]:
        raise ValueError(f"{url}: holds {len(keys)} samples, the source manifest says {entry['count']}")
    return keys, np.asarray(clean, dtype=np.int64), had_clean


def _rewrite_shard(path: str, url: str, noisy: np.ndarray, staging: Path, bar: tqdm) -> ShardInfo:
    """Pass 2: the shard with ``.cls`` replaced by the noisy label and ``.clean.cls`` added
    where missing (right after ``.cls``, as make_shards orders them); everything else as
    read. Written by ShardWriter (fixed tar metadata, so byte-reproducible) as the one
    shard ``staging/shard-000000.tar``, whose info it returns."""
    writer = ShardWriter(staging, "shard", shard_size=len(noisy))
    with open(path, "rb") as raw:
        for i, (key, members) in enumerate(iter_samples(raw, lcase=False)):
            has_clean = any(suffix == "clean.cls" for suffix, _ in members)
            fields: dict[str, bytes] = {}
            for suffix, data in members:
                if suffix == "cls":
                    fields["cls"] = str(int(noisy[i])).encode()
                    if not has_clean:
                        fields["clean.cls"] = data
                else:
                    fields[suffix] = data
            try:
                writer.write(key, fields)
            except ValueError as err:  # a key ShardWriter cannot write back
                raise ValueError(f"{url}: {err}") from None
            bar.update()
    (info,) = writer.close()
    return info


# ----------------------------------------------------------------------------- the tool


def _prepare_out(out: Location, force: bool) -> list[str]:
    """Refuse a used OUT without ``force``; with it, remove OUT's manifest first (so OUT
    reads as incomplete until the new one lands). Returns OUT's existing tar names."""
    existing = out.tar_names()
    has_manifest = out.fs.isfile(out.join(MANIFEST_NAME))
    if (existing or has_manifest) and not force:
        what = MANIFEST_NAME if has_manifest else f"shards ({existing[0]} ...)"
        raise FileExistsError(f"{out.url()} already holds {what}; pass --force to overwrite")
    if has_manifest:
        out.delete(MANIFEST_NAME)
    return existing


def inject_noise(
    src_url: str,
    out_url: str,
    noise: dict[str, Any],
    force: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write SRC's shards with ``noise`` baked in to OUT; return OUT's manifest."""
    src = open_location(src_url, storage_options)
    out = open_location(out_url, storage_options)
    if same_location(src, out):
        raise StorageError(f"--out {out.url()} is the source folder; write the noisy copy elsewhere")
    source, source_raw = read_manifest_at(src)
    num_classes = source.get("num_classes")
    if not isinstance(num_classes, int):
        raise StorageError(f"{src.url(MANIFEST_NAME)}: needs an integer num_classes, got {num_classes!r}")
    if not source["shards"]:
        raise StorageError(f"{src.url(MANIFEST_NAME)}: lists no shards")
    apply_noise([], [], noise, num_classes)  # a bad spec fails here, naming the field
    stale = _prepare_out(out, force)
    shards, clean_all, noisy_all, clean_from_cls = [], [], [], 0
    with out.staging(".inject_noise-") as staging:
        total = sum(int(s.get("count") or 0) for s in source["shards"])
        with tqdm(
            total=total, unit="img", desc="inject_noise", file=sys.stderr, disable=None if progress else True
        ) as bar:
            for entry in source["shards"]:
                name, url = entry["name"], src.url(entry["name"])
                path = src.join(name)
                if not src.is_local:
                    path = os.path.join(staging, "source.tar")
                    src.get(name, path)
                keys, clean, had_clean = _read_labels(path, url, entry, num_classes)
                if not keys:
                    raise ValueError(f"{url}: holds no samples")
                noisy = apply_noise(keys, clean, noise, num_classes)
                written = _rewrite_shard(path, url, noisy, staging, bar)
                shards.append(ShardInfo(name, written.count, written.sha256, written.bytes))
                out.put(staging / written.name, name)
                clean_all.append(clean)
                noisy_all.append(noisy)
                clean_from_cls += had_clean.count(False)
        names = {s.name for s in shards}
        for name in stale:
            if name not in names:
                out.delete(name)
        clean, noisy = np.concatenate(clean_all), np.concatenate(noisy_all)
        manifest = {
            **source,
            "num_samples": int(len(clean)),
            "class_counts": np.bincount(clean, minlength=num_classes).tolist(),
            "shards": [vars(s) for s in shards],
            "noise": noise,
            "noise_report": noise_report(clean, noisy, num_classes),
            "derived_from": {
                "url": src.url(),
                "manifest_sha256": hashlib.sha256(source_raw).hexdigest(),
                "shards": [{"name": s["name"], "sha256": s.get("sha256")} for s in source["shards"]],
                "noise": source.get("noise"),
                # Samples whose clean label is their source .cls (no .clean.cls there): if
                # the source was itself noisy, these "clean" labels are not clean.
                "clean_labels_from_cls": clean_from_cls,
            },
        }
        out.put(write_manifest(staging, manifest), MANIFEST_NAME)
    return manifest


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inject_noise.py",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="shard folder with manifest.json (local path or fsspec URL)")
    parser.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    add_noise_arguments(parser, required=True)
    add_storage_argument(parser)
    parser.add_argument("--force", action="store_true", help="overwrite an OUT that holds shards or a manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)

    def body(options: dict[str, Any]) -> int:
        manifest = inject_noise(
            args.src, args.out, noise_spec_from_args(args), args.force, options, progress=not args.quiet
        )
        print(
            json.dumps(
                {
                    "out": open_location(args.out, options).url(),
                    "num_samples": manifest["num_samples"],
                    "shards": len(manifest["shards"]),
                    "realised_noise_rate": manifest["noise_report"]["realised_rate"],
                    "clean_labels_from_cls": manifest["derived_from"]["clean_labels_from_cls"],
                }
            )
        )
        return 0

    return run_cli(body, args.storage_options)


if __name__ == "__main__":
    sys.exit(main())

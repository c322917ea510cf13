"""``python tools/make_shards.py DATASET --src SRC --out OUT [--split S] ...``

Converts a dataset in its original layout into webdataset shards plus ``manifest.json``
(DESIGN.md section 3), optionally baking in synthetic label noise through the same
``apply_noise`` used at load time (so both routes give identical noisy labels).

Each split goes to ``OUT/{split}/{split}-{000000..}.tar`` with its own manifest.

Datasets:
* ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...), by default from
  Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* ``cifar10`` / ``cifar100``: the official "python version" pickle batches
  (``cifar-10-batches-py/`` / ``cifar-100-python/``, or those folders' contents).
* ``folder``: ``SRC/{class_name}/*.{jpg,jpeg,png,webp}``; images copied byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from nrd_dist.data.noise import apply_noise, noise_report
from nrd_dist.data.writer import MANIFEST_NAME, ShardWriter, write_manifest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FOLDER_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class SourceError(ValueError):
    """The input dataset is missing, malformed or inconsistent; says which file."""


@dataclass
class Source:
    """One split of a dataset: class names and a way to iterate its samples."""

    classes: list[str]
    keys: list[str]
    labels: np.ndarray  # int64 [N], clean labels
    image: Callable[[int], tuple[str, bytes]]  # index -> (extension, encoded image)


# ----------------------------------------------------------------------------- readers


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped), checking its magic number and size."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise SourceError(f"missing file: {candidates[0]} (or {candidates[1].name})")
    opener = gzip.open if found.suffix == ".gz" else open
    try:
        with opener(found, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # truncated or corrupt .gz, unreadable file
        raise SourceError(f"{found}: cannot read ({err})") from None
    if len(data) < 4:
        raise SourceError(f"{found}: too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise SourceError(f"{found}: not an idx uint8 file with {expected_ndim} dimensions "
                          f"(magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise SourceError(f"{found}: header truncated ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise SourceError(f"{found}: header says {dims} ({expected} bytes) but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _array_source(images: np.ndarray, labels: np.ndarray, classes: list[str], split: str,
                  what: str) -> Source:
    if len(images) != len(labels):
        raise SourceError(f"{what}: {len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise SourceError(f"{what}: label {labels[bad[0]]} at index {bad[0]} is out of range "
                          f"[0, {len(classes)}) ({bad.size} such labels)")
    keys = [f"{split}_{i:06d}" for i in range(len(labels))]
    return Source(classes, keys, labels, lambda i: ("png", _png(images[i])))


def fashion_mnist(src: Path, split: str) -> Source:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(src / f"{prefix}-images-idx3-ubyte", 3)
    labels = _read_idx(src / f"{prefix}-labels-idx1-ubyte", 1)
    if images.shape[1:] != (28, 28):
        raise SourceError(f"{src}/{prefix}-images-idx3-ubyte: expected 28x28 images, got {images.shape[1:]}")
    return _array_source(images, labels, FASHION_MNIST_CLASSES, split, f"fashion-mnist {split} in {src}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(f"missing file: {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise SourceError(f"{path}: not a CIFAR python pickle batch ({err})") from None


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = batch.get(b"data")
    if data is None:
        raise SourceError(f"{path}: no b'data' entry")
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise SourceError(f"{path}: data must be uint8 pixels, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise SourceError(f"{path}: data must be N x 3072 (32x32 RGB planes), got {data.shape}")
    # Each row is the R plane, then G, then B, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_dir(src: Path, subdir: str, marker: str) -> Path:
    for candidate in (src / subdir, src):
        if (candidate / marker).is_file():
            return candidate
    raise SourceError(f"no CIFAR python batches under {src}: expected {src / subdir / marker}")


def cifar10(src: Path, split: str) -> Source:
    root = _cifar_dir(src, "cifar-10-batches-py", "batches.meta")
    names = [n.decode() for n in _unpickle(root / "batches.meta")[b"label_names"]]
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in files:
        batch = _unpickle(root / name)
        images.append(_cifar_images(batch, root / name))
        labels.append(np.asarray(batch.get(b"labels", []), dtype=np.int64))
    return _array_source(np.concatenate(images), np.concatenate(labels), names, split,
                         f"cifar10 {split} in {root}")


def cifar100(src: Path, split: str) -> Source:
    root = _cifar_dir(src, "cifar-100-python", "meta")
    names = [n.decode() for n in _unpickle(root / "meta")[b"fine_label_names"]]
    batch = _unpickle(root / split)
    labels = np.asarray(batch.get(b"fine_labels", []), dtype=np.int64)
    return _array_source(_cifar_images(batch, root / split), labels, names, split,
                         f"cifar100 {split} in {root}")


def folder(src: Path, split: str) -> Source:
    """One sub-folder per class; class index = position in the sorted folder names."""
    if not src.is_dir():
        raise SourceError(f"missing folder: {src}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise SourceError(f"{src}: no class sub-folders")
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((src / name).iterdir()):
            if path.suffix.lower() in FOLDER_EXTENSIONS:
                files.append(path)
                labels.append(index)
    if not files:
        raise SourceError(f"{src}: no images ({', '.join(FOLDER_EXTENSIONS)}) in its class folders")
    keys = [f"{split}_{i:06d}" for i in range(len(files))]

    def image(i: int) -> tuple[str, bytes]:
        return FOLDER_EXTENSIONS[files[i].suffix.lower()], files[i].read_bytes()

    return Source(classes, keys, np.asarray(labels, dtype=np.int64), image)


DATASETS: dict[str, tuple[Callable[[Path, str], Source], list[str], Optional[str]]] = {
    # name: (reader, splits, default --src)
    "fashion-mnist": (fashion_mnist, ["train", "test"], FASHION_MNIST_DIR),
    "cifar10": (cifar10, ["train", "test"], None),
    "cifar100": (cifar100, ["train", "test"], None),
    "folder": (folder, ["train"], None),
}


# ----------------------------------------------------------------------------- writing


def _existing_outputs(out: Path, split: str, force: bool) -> list[Path]:
    split_dir = out / split
    existing = sorted(split_dir.glob(f"{split}-*.tar")) + sorted(split_dir.glob(MANIFEST_NAME))
    if existing and not force:
        raise FileExistsError(f"{split_dir} already holds shards ({existing[0].name} ...); "
                              "pass --force to overwrite")
    return existing


def make_shards(dataset: str, src: Path, out: Path, split: str, shard_size: int = 5000,
                noise: Optional[dict[str, Any]] = None, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Shard one split into ``out/{split}/`` and return its manifest."""
    reader = DATASETS[dataset][0]
    split_dir = out / split
    existing = _existing_outputs(out, split, force)
    source = reader(src, split)  # validates the input before anything is written
    if not source.keys:
        raise SourceError(f"{dataset} {split} in {src}: no samples")
    num_classes = len(source.classes)
    labels = source.labels
    if noise:
        labels = apply_noise(source.keys, source.labels, noise, num_classes)
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in existing:
        stale.unlink()
    writer = ShardWriter(split_dir, split, shard_size)
    for i in tqdm(range(len(source.keys)), desc=f"{dataset}/{split}", unit="img", disable=not progress):
        ext, image_bytes = source.image(i)
        fields = {ext: image_bytes, "cls": str(int(labels[i])).encode()}
        fields["clean.cls"] = str(int(source.labels[i])).encode()
        writer.write(source.keys[i], fields)
    shards = writer.close()
    manifest = {
        "dataset": dataset,
        "split": split,
        "source": str(src),
        "num_samples": len(source.keys),
        "num_classes": num_classes,
        "classes": source.classes,
        "class_counts": np.bincount(source.labels, minlength=num_classes).tolist(),
        "shard_pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar",
        "shards": [vars(s) for s in shards],
        "noise": noise,
        "noise_report": noise_report(source.labels, labels, num_classes),
    }
    write_manifest(split_dir, manifest)
    return manifest


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--src", type=Path, help="dataset root in its original layout "
                        f"(fashion-mnist default: {FASHION_MNIST_DIR})")
    parser.add_argument("--out", type=Path, required=True, help="output folder; each split in OUT/SPLIT/")
    parser.add_argument("--split", default="all", help="train, test or all (default)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument("--noise-type", default=None,
                        help="bake label noise in: symmetric, symmetric_exclusive, asymmetric, matrix")
    parser.add_argument("--noise-rate", type=float, default=0.0)
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--noise-map", default=None,
                        help="asymmetric map: cifar10, cifar100 or YAML such as '{0: 2, 6: 0}'")
    parser.add_argument("--noise-split", default="train",
                        help="split(s) that get the noise, comma-separated (default: train only)")
    parser.add_argument("--force", action="store_true", help="overwrite existing shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


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
    noise = None
    if args.noise_type:
        noise = {"type": args.noise_type, "rate": args.noise_rate, "seed": args.noise_seed}
        if args.noise_map is not None:
            noise["map"] = yaml.safe_load(args.noise_map)
    try:
        for split in wanted:  # refuse before writing any split, not halfway through
            _existing_outputs(args.out, split, args.force)
        for split in wanted:
            split_noise = noise if split in args.noise_split.split(",") else None
            manifest = make_shards(args.dataset, src, args.out, split, args.shard_size, split_noise,
                                   args.force, progress=not args.quiet)
            report = manifest["noise_report"]
            print(json.dumps({"split": split, "out": str(args.out / split),
                              "num_samples": manifest["num_samples"], "shards": len(manifest["shards"]),
                              "realised_noise_rate": report["realised_rate"]}))
    except (SourceError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

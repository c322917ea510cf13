"""The in-memory datasets: Fashion-MNIST (idx files) and CIFAR-10/100 (the official
"python version" pickle batches). Images are held as arrays and encoded as PNG on demand."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from nrd_dist.tools.sources.base import Options, Source, SourceError, split_keys

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


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
        raise SourceError(f"{found}: not an idx uint8 file with {expected_ndim} dimensions (magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise SourceError(f"{found}: header truncated ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise SourceError(f"{found}: header says {dims} ({expected} bytes) but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _array_source(images: np.ndarray, labels: np.ndarray, classes: list[str], split: str, what: str) -> Source:
    if len(images) != len(labels):
        raise SourceError(f"{what}: {len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise SourceError(
            f"{what}: label {labels[bad[0]]} at index {bad[0]} is out of range "
            f"[0, {len(classes)}) ({bad.size} such labels)"
        )
    digest = hashlib.sha256()
    digest.update(json.dumps(classes).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(labels.tobytes())
    return Source(
        classes,
        split_keys(split, len(labels)),
        labels,
        image=lambda i: ("png", _png(images[i])),
        digest=digest.hexdigest(),
    )


def fashion_mnist(src: Path, split: str, opts: Options) -> Source:
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


def cifar10(src: Path, split: str, opts: Options) -> Source:
    root = _cifar_dir(src, "cifar-10-batches-py", "batches.meta")
    names = [n.decode() for n in _unpickle(root / "batches.meta")[b"label_names"]]
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in files:
        batch = _unpickle(root / name)
        images.append(_cifar_images(batch, root / name))
        labels.append(np.asarray(batch.get(b"labels", []), dtype=np.int64))
    return _array_source(np.concatenate(images), np.concatenate(labels), names, split, f"cifar10 {split} in {root}")


def cifar100(src: Path, split: str, opts: Options) -> Source:
    root = _cifar_dir(src, "cifar-100-python", "meta")
    names = [n.decode() for n in _unpickle(root / "meta")[b"fine_label_names"]]
    batch = _unpickle(root / split)
    labels = np.asarray(batch.get(b"fine_labels", []), dtype=np.int64)
    return _array_source(_cifar_images(batch, root / split), labels, names, split, f"cifar100 {split} in {root}")

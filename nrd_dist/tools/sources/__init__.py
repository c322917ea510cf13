"""Dataset readers for make_shards. Each turns one split of a dataset in its original
layout into a :class:`Source` (class names, keys, clean labels, and images in memory or as
files), checking everything that can be checked before any image is decoded. The layouts,
keys and bad-data rules they implement are make_shards' command-line contract (its
module docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from nrd_dist.tools.sources.arrays import FASHION_MNIST_DIR, cifar10, cifar100, fashion_mnist
from nrd_dist.tools.sources.base import PROGRESS_FORMAT, BadDataError, BadSample, Options, Source, SourceError
from nrd_dist.tools.sources.files import folder
from nrd_dist.tools.sources.imagenet import imagenet_val
from nrd_dist.tools.sources.webvision import DEFAULT_WEBVISION_CLASSES, webvision

__all__ = [
    "BadDataError",
    "BadSample",
    "CLASS_SELECTING",
    "DATASETS",
    "DEFAULT_WEBVISION_CLASSES",
    "FASHION_MNIST_DIR",
    "Options",
    "PROGRESS_FORMAT",
    "Source",
    "SourceError",
]

DATASETS: dict[str, tuple[Callable[[Path, str, Options], Source], list[str], Optional[str]]] = {
    # name: (reader, splits, default --src)
    "fashion-mnist": (fashion_mnist, ["train", "test"], FASHION_MNIST_DIR),
    "cifar10": (cifar10, ["train", "test"], None),
    "cifar100": (cifar100, ["train", "test"], None),
    "folder": (folder, ["train"], None),
    "webvision": (webvision, ["train", "val"], None),
    "imagenet-val": (imagenet_val, ["val"], None),
}
# The datasets that read --classes and --webvision-info.
CLASS_SELECTING = {"webvision", "imagenet-val"}

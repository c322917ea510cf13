"""What a dataset reader returns (:class:`Source`), the options it reads, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# Version of the request fingerprint make_shards records beside the shards, the source
# listing digests included: bump it when either changes meaning, so old records stop
# matching (and are refused, never silently resumed).
PROGRESS_FORMAT = 1
MAX_LISTED_ERRORS = 20


class SourceError(ValueError):
    """The input dataset is missing, malformed or inconsistent; says which file."""


@dataclass
class BadSample:
    """A sample that cannot be written: ``path`` relative to SRC (for the manifest),
    ``location`` the absolute file name (for messages), ``index`` into the keys or None
    when the bad line never got a key (malformed, label out of range)."""

    path: str
    reason: str
    location: str
    index: Optional[int] = None


class BadDataError(SourceError):
    def __init__(self, bad: list[BadSample], what: str, note: str = ""):
        lines = [f"  {b.location}: {b.reason}" for b in bad[:MAX_LISTED_ERRORS]]
        if len(bad) > MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(bad) - MAX_LISTED_ERRORS} more")
        super().__init__(
            f"{what}: {len(bad)} bad sample(s); pass --skip-bad to skip them "
            f"(they are then listed in the manifest){note}:\n" + "\n".join(lines)
        )
        self.bad = bad


@dataclass
class Options:
    """The options of the file datasets (ignored by the in-memory ones, except skip_bad)."""

    classes: Optional[int] = None  # webvision / imagenet-val: keep labels < classes
    webvision_info: Optional[Path] = None
    devkit: Optional[Path] = None
    resize_shorter: Optional[int] = None
    jpeg_quality: int = 90
    workers: int = 1
    skip_bad: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """One split of a dataset: class names, keys and clean labels, and either ``image``
    (in-memory datasets: index -> (extension, encoded image)) or ``files`` (absolute
    paths, decoded and optionally resized in worker processes)."""

    classes: list[str]
    keys: list[str]
    labels: np.ndarray  # int64 [N], clean labels
    image: Optional[Callable[[int], tuple[str, bytes]]] = None
    files: Optional[list[str]] = None
    paths: Optional[list[str]] = None  # relative to SRC; written as .path.txt when record_paths
    record_paths: bool = False
    bad: list[BadSample] = field(default_factory=list)  # found before decoding
    digest: str = ""  # fingerprint of the listing (make_shards: "Resuming")
    extra: dict[str, Any] = field(default_factory=dict)  # dataset-specific manifest fields


def split_keys(split: str, n: int) -> list[str]:
    width = max(6, len(str(max(n - 1, 0))))
    return [f"{split}_{i:0{width}d}" for i in range(n)]

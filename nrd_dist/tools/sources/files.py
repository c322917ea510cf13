"""Image files listed under a dataset root: the checks every file dataset shares (keys,
missing files, duplicates, the listing digest) and the ``folder`` dataset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nrd_dist.tools.sources.base import PROGRESS_FORMAT, BadSample, Options, Source, SourceError, split_keys

FOLDER_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Entry:
    """One listed image: path relative to SRC, label, and where it was listed."""

    path: str
    label: int
    where: str = ""  # e.g. "info/train_filelist_google.txt line 7", for messages


def file_source(
    src: Path,
    split: str,
    classes: list[str],
    entries: list[Entry],
    line_bad: list[BadSample],
    record_paths: bool,
    extra: dict[str, Any],
) -> Source:
    """Keys, existence and duplicate checks and the listing digest for listed files.

    ``entries`` are the selected samples in order (each gets a key); ``line_bad`` the
    listed lines that got no key (malformed, label out of range)."""
    keys = split_keys(split, len(entries))
    bad = list(line_bad)
    first_seen: dict[str, int] = {}
    digest = hashlib.sha256(json.dumps([PROGRESS_FORMAT, classes]).encode())
    files, paths = [], []
    for index, entry in enumerate(entries):
        path = src / entry.path
        where = f" ({entry.where})" if entry.where else ""
        files.append(str(path))
        paths.append(entry.path)
        if entry.path in first_seen:
            other = entries[first_seen[entry.path]]
            bad.append(
                BadSample(
                    entry.path,
                    f"duplicate of {other.where or keys[first_seen[entry.path]]} "
                    f"(labels {other.label} and {entry.label}){where}",
                    str(path),
                    index,
                )
            )
            size = -2
        else:
            first_seen[entry.path] = index
            try:
                size = path.stat().st_size
                if not path.is_file():
                    raise FileNotFoundError
            except (FileNotFoundError, NotADirectoryError):
                bad.append(BadSample(entry.path, f"missing file{where}", str(path), index))
                size = -1
        digest.update(f"{keys[index]}\t{entry.path}\t{entry.label}\t{size}\n".encode())
    for b in line_bad:
        digest.update(f"bad\t{b.path}\t{b.reason}\n".encode())
    labels = np.asarray([e.label for e in entries], dtype=np.int64)
    return Source(
        classes,
        keys,
        labels,
        files=files,
        paths=paths,
        record_paths=record_paths,
        bad=bad,
        digest=digest.hexdigest(),
        extra=extra,
    )


def folder(src: Path, split: str, opts: Options) -> Source:
    """One sub-folder per class; class index = position in the sorted folder names."""
    if not src.is_dir():
        raise SourceError(f"missing folder: {src}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise SourceError(f"{src}: no class sub-folders")
    entries = []
    for index, name in enumerate(classes):
        for path in sorted((src / name).iterdir()):
            if path.suffix.lower() in FOLDER_EXTENSIONS:
                entries.append(Entry(f"{name}/{path.name}", index))
    if not entries:
        raise SourceError(f"{src}: no images ({', '.join(FOLDER_EXTENSIONS)}) in its class folders")
    return file_source(src, split, classes, entries, [], record_paths=False, extra={})

"""WebVision 1.0 as distributed: ``info/synsets.txt`` and the file lists of the Google
subset (``train``) and the validation set (``val``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nrd_dist.tools.sources.base import BadSample, Options, Source, SourceError
from nrd_dist.tools.sources.files import Entry, file_source

DEFAULT_WEBVISION_CLASSES = 50
WNID_RE = re.compile(r"^n\d{8}$")


def read_synsets(info_dir: Path) -> tuple[list[str], list[str]]:
    """WebVision's ``info/synsets.txt``: (WNIDs, descriptions); class index = line number."""
    path = info_dir / "synsets.txt"
    if not path.is_file():
        raise SourceError(f"missing file: {path} (WebVision's info/synsets.txt)")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    wnids, descriptions = [], []
    for number, line in enumerate(lines, 1):
        parts = line.strip().split(maxsplit=1)
        if not parts or not WNID_RE.match(parts[0]):
            raise SourceError(f"{path} line {number}: expected 'nXXXXXXXX description', got {line!r}")
        if parts[0] in wnids:
            raise SourceError(f"{path} line {number}: synset {parts[0]} already on line {wnids.index(parts[0]) + 1}")
        wnids.append(parts[0])
        descriptions.append(parts[1] if len(parts) > 1 else "")
    if not wnids:
        raise SourceError(f"{path}: no synsets")
    return wnids, descriptions


def selected_classes(opts: Options, wnids: list[str], path: Path) -> int:
    n = DEFAULT_WEBVISION_CLASSES if opts.classes is None else opts.classes
    if not 1 <= n <= len(wnids):
        raise SourceError(f"--classes {n}: must lie in [1, {len(wnids)}] ({path} lists {len(wnids)} synsets)")
    return n


def webvision(src: Path, split: str, opts: Options) -> Source:
    info = opts.webvision_info or src / "info"
    wnids, descriptions = read_synsets(info)
    n_classes = selected_classes(opts, wnids, info / "synsets.txt")
    if split == "train":
        list_path, image_dir = info / "train_filelist_google.txt", ""
        if not (src / "google").is_dir():
            raise SourceError(f"missing folder: {src / 'google'} (the Google subset's images)")
    else:
        list_path = info / "val_filelist.txt"
        image_dir = next((d for d in ("val_images_256", "val_images") if (src / d).is_dir()), "")
        if not image_dir:
            raise SourceError(f"missing folder: {src / 'val_images_256'} (or {src / 'val_images'})")
    if not list_path.is_file():
        raise SourceError(f"missing file: {list_path}")
    list_name = os.path.relpath(list_path, src) if list_path.is_relative_to(src) else str(list_path)
    entries, line_bad, excluded = [], [], 0
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{list_name} line {number}"
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            line_bad.append(
                BadSample(
                    f"{list_name}:{number}",
                    f"malformed line {line!r} (expected 'PATH LABEL')",
                    f"{list_path} line {number}",
                )
            )
            continue
        rel = f"{image_dir}/{parts[0]}" if image_dir else parts[0]
        label = int(parts[1])
        if not 0 <= label < len(wnids):
            line_bad.append(BadSample(rel, f"label {label} out of range [0, {len(wnids)}) ({where})", str(src / rel)))
        elif label < n_classes:
            entries.append(Entry(rel, label, where))
        else:
            excluded += 1
    extra = {"class_descriptions": descriptions[:n_classes], "excluded_other_classes": excluded}
    return file_source(src, split, wnids[:n_classes], entries, line_bad, record_paths=True, extra=extra)

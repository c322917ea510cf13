"""The ILSVRC2012 validation images, labelled through WebVision's ``synsets.txt``: flat
(with the devkit's ground truth) or one folder per synset."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from nrd_dist.tools.sources.base import BadSample, Options, Source, SourceError
from nrd_dist.tools.sources.files import Entry, file_source
from nrd_dist.tools.sources.webvision import WNID_RE, read_synsets, selected_classes

IMAGENET_VAL_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
IMAGENET_EXTENSIONS = {".jpeg", ".jpg", ".png"}


def _find_devkit(src: Path, opts: Options) -> Path:
    candidates = [opts.devkit] if opts.devkit else [src / "ILSVRC2012_devkit_t12", src.parent / "ILSVRC2012_devkit_t12"]
    for candidate in candidates:
        if (candidate / "data").is_dir():
            return candidate
    raise SourceError(f"no ILSVRC2012 devkit: expected {candidates[0] / 'data'} (or pass --devkit DIR)")


def read_imagenet_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1000 leaf synsets, from the devkit's ``meta.mat``."""
    import scipy.io

    if not path.is_file():
        raise SourceError(f"missing file: {path}")
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=True)["synsets"]
    except Exception as err:  # noqa: BLE001 - any loadmat failure means a bad file
        raise SourceError(f"{path}: cannot read the synsets struct ({err})") from None
    synsets = np.atleast_1d(synsets).ravel()
    names = synsets.dtype.names or ()
    if "ILSVRC2012_ID" not in names or "WNID" not in names:
        raise SourceError(f"{path}: synsets lack ILSVRC2012_ID / WNID fields (have {names})")
    mapping = {}
    for entry in synsets:
        if "num_children" in names and int(np.asarray(entry["num_children"]).item()) != 0:
            continue  # an inner node of the hierarchy, never a label
        mapping[int(np.asarray(entry["ILSVRC2012_ID"]).item())] = str(np.asarray(entry["WNID"]).item())
    return mapping


def imagenet_val(src: Path, split: str, opts: Options) -> Source:
    if opts.webvision_info is None:
        raise SourceError(
            "imagenet-val needs --webvision-info DIR (the folder holding WebVision's "
            "synsets.txt, which fixes the label of each synset)"
        )
    wnids, descriptions = read_synsets(opts.webvision_info)
    n_classes = selected_classes(opts, wnids, opts.webvision_info / "synsets.txt")
    index_of = {w: i for i, w in enumerate(wnids)}
    if not src.is_dir():
        raise SourceError(f"missing folder: {src}")
    flat = sorted((p for p in src.iterdir() if p.is_file() and IMAGENET_VAL_RE.match(p.name)), key=lambda p: p.name)
    synset_dirs = sorted(p for p in src.iterdir() if p.is_dir() and WNID_RE.match(p.name))
    if flat and synset_dirs:
        raise SourceError(f"{src} holds both ILSVRC2012_val_*.JPEG files and synset folders; point --src at one layout")
    # (image name, relative path, label or None, where/reason) in file-name order
    listed: list[tuple[str, str, int, str]] = []
    line_bad: list[BadSample] = []
    excluded = 0

    def select(name: str, rel: str, wnid: Optional[str], where: str, reason: str = "") -> None:
        nonlocal excluded
        label = index_of.get(wnid) if wnid else None
        if label is None:
            line_bad.append(BadSample(rel, reason or f"synset {wnid} is not in synsets.txt ({where})", str(src / rel)))
        elif label < n_classes:
            listed.append((name, rel, label, where))
        else:
            excluded += 1

    if flat:
        layout = "flat"
        devkit = _find_devkit(src, opts)
        meta = read_imagenet_meta(devkit / "data" / "meta.mat")
        truth_path = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
        if not truth_path.is_file():
            raise SourceError(f"missing file: {truth_path}")
        truth = [line.strip() for line in truth_path.read_text().splitlines()]
        while truth and not truth[-1]:
            truth.pop()
        present = {int(IMAGENET_VAL_RE.match(p.name).group(1)): p.name for p in flat}
        for number, value in enumerate(truth, 1):
            name = present.get(number, f"ILSVRC2012_val_{number:08d}.JPEG")
            where = f"{truth_path.name} line {number}"
            if not re.fullmatch(r"\d+", value):
                line_bad.append(BadSample(name, f"malformed ground truth {value!r} ({where})", str(src / name)))
            elif int(value) not in meta:
                line_bad.append(
                    BadSample(
                        name,
                        f"label {value} out of range: not an ILSVRC2012_ID of a leaf synset in meta.mat ({where})",
                        str(src / name),
                    )
                )
            else:
                select(name, name, meta[int(value)], where)
        for number, name in sorted(present.items()):
            if number > len(truth):
                line_bad.append(
                    BadSample(name, f"no ground-truth line ({truth_path} has {len(truth)})", str(src / name))
                )
    elif synset_dirs:
        layout = "synset_folders"
        found = []
        for folder_path in synset_dirs:
            for path in folder_path.iterdir():
                if path.suffix.lower() in IMAGENET_EXTENSIONS:
                    found.append((path.name, f"{folder_path.name}/{path.name}", folder_path.name))
        for name, rel, wnid in sorted(found):
            select(name, rel, wnid, f"folder {wnid}")
    else:
        raise SourceError(f"{src}: neither ILSVRC2012_val_*.JPEG files nor synset folders (n01440764/ ...)")

    entries = [Entry(rel, label, where) for _, rel, label, where in listed]
    extra = {"class_descriptions": descriptions[:n_classes], "excluded_other_classes": excluded, "layout": layout}
    source = file_source(src, split, wnids[:n_classes], entries, line_bad, record_paths=True, extra=extra)
    # The same image in two synset folders is a duplicate (its label is ambiguous).
    seen: dict[str, int] = {}
    for index, (name, rel, label, _) in enumerate(listed):
        if name in seen:
            other = listed[seen[name]]
            source.bad.append(
                BadSample(
                    rel, f"duplicate image: also {other[1]} (labels {other[2]} and {label})", str(src / rel), index
                )
            )
        else:
            seen[name] = index
    return source

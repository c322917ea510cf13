"""Small WebVision 1.0 and ILSVRC2012-validation trees in their real layouts, with real
images (JPEGs of varied sizes made with PIL, plus the oddities real crawls hold: a
greyscale JPEG, and a PNG and a BMP saved under ``.jpg`` names).

WebVision 1.0::

    ROOT/info/synsets.txt                    n01440764 tench, Tinca tinca   (class i = line i)
    ROOT/info/train_filelist_google.txt      google/q0001/00000001.jpg 0
    ROOT/info/val_filelist.txt               val000001.jpg 0
    ROOT/google/q0001/00000001.jpg ...
    ROOT/val_images_256/val000001.jpg ...

ILSVRC2012 validation: flat (``ILSVRC2012_val_00000001.JPEG`` ... with the devkit's
``data/ILSVRC2012_validation_ground_truth.txt`` and ``data/meta.mat``, whose
``synsets`` struct maps ILSVRC2012_ID -> WNID in an order unlike WebVision's) or one
folder per synset (``n01440764/ILSVRC2012_val_00000001.JPEG``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# The first synsets of WebVision's info/synsets.txt (= ImageNet-1k sorted by WNID).
REAL_SYNSETS = [
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
]


def synsets(n: int) -> list[tuple[str, str]]:
    """n (WNID, description) pairs: the real first five, then made-up sorted WNIDs."""
    made_up = [(f"n{1500000 + 7919 * i:08d}", f"made-up class {i}") for i in range(max(0, n - 5))]
    return (REAL_SYNSETS + made_up)[:n]


def image_array(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB picture with structure (gradients, a block, noise) so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, size=3)
    image = np.stack(
        [
            (x * 255 // max(width - 1, 1) + base[0]) % 256,
            (y * 255 // max(height - 1, 1) + base[1]) % 256,
            ((x + y) * 3 + base[2]) % 256,
        ],
        axis=-1,
    ).astype(np.int16)
    y0, x0 = rng.integers(0, max(height // 2, 1)), rng.integers(0, max(width // 2, 1))
    image[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, size=3)
    image += rng.integers(-12, 13, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", quality: int = 85) -> bytes:
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def random_size(rng: np.random.Generator, sizes: tuple[int, int]) -> tuple[int, int]:
    return int(rng.integers(sizes[0], sizes[1] + 1)), int(rng.integers(sizes[0], sizes[1] + 1))


def write_image(path: Path, rng: np.random.Generator, sizes: tuple[int, int], seed: int, kind: str = "rgb") -> None:
    """kind: rgb (JPEG), grey (greyscale JPEG), png or bmp (that data, whatever the name says)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image_array(*random_size(rng, sizes), seed)
    data = {
        "rgb": lambda: encode(array),
        "grey": lambda: encode(array, mode="L"),
        "png": lambda: encode(array, fmt="PNG"),
        "bmp": lambda: encode(array, fmt="BMP"),
    }[kind]()
    path.write_bytes(data)


@dataclass
class WebVisionTree:
    root: Path
    wnids: list[str]
    descriptions: list[str]
    train: list[tuple[str, int]]  # (path relative to root, label), file-list order
    val: list[tuple[str, int]]  # (path relative to root, label)
    odd: dict[str, str] = field(default_factory=dict)  # relative path -> "grey" | "png" | "bmp"

    @property
    def info(self) -> Path:
        return self.root / "info"


def make_webvision_tree(
    root: Path,
    train_labels: Sequence[int],
    val_labels: Sequence[int],
    num_synsets: int = 60,
    sizes: tuple[int, int] = (24, 80),
    seed: int = 0,
    odd: bool = True,
) -> WebVisionTree:
    """A WebVision 1.0 tree: the Google training subset and the validation set.

    Training images go to ``google/q{label + 1:04d}/{n:08d}.jpg`` in the given label
    order (the real list is grouped by query; order here is what the list says). With
    ``odd``, the second training image is a greyscale JPEG, the third a PNG and the fifth
    a BMP, all named .jpg (real crawls hold such files).
    """
    rng = np.random.default_rng(seed)
    pairs = synsets(num_synsets)
    info = root / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("".join(f"{w} {d}\n" for w, d in pairs))
    tree = WebVisionTree(root, [w for w, _ in pairs], [d for _, d in pairs], [], [])
    lines = []
    for n, label in enumerate(train_labels, 1):
        rel = f"google/q{label + 1:04d}/{n:08d}.jpg"
        kind = {2: "grey", 3: "png", 5: "bmp"}.get(n, "rgb") if odd else "rgb"
        if kind != "rgb":
            tree.odd[rel] = kind
        write_image(root / rel, rng, sizes, seed * 100003 + n, kind)
        tree.train.append((rel, label))
        lines.append(f"{rel} {label}\n")
    (info / "train_filelist_google.txt").write_text("".join(lines))
    lines = []
    for n, label in enumerate(val_labels, 1):
        name = f"val{n:06d}.jpg"
        write_image(root / "val_images_256" / name, rng, sizes, seed * 100003 + 50000 + n)
        tree.val.append((f"val_images_256/{name}", label))
        lines.append(f"{name} {label}\n")
    (info / "val_filelist.txt").write_text("".join(lines))
    return tree


def write_filelist(tree: WebVisionTree, split: str, lines: Sequence[str]) -> Path:
    """Replace a split's file list with raw ``lines`` (to plant bad entries)."""
    name = "train_filelist_google.txt" if split == "train" else "val_filelist.txt"
    path = tree.info / name
    path.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
    return path


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------- ILSVRC2012 val


@dataclass
class ImageNetVal:
    root: Path  # --src
    devkit: Optional[Path]  # flat layout only
    images: list[tuple[str, str]]  # (file name, WNID) in image-number order
    id_of: dict[str, int]  # WNID -> ILSVRC2012_ID


def write_meta_mat(path: Path, wnids: Sequence[str], seed: int = 0, inner_nodes: int = 3) -> dict[str, int]:
    """The devkit's ``meta.mat``: a ``synsets`` struct array (N x 1) with the real fields.

    Leaf IDs 1..len(wnids) go to a shuffled order of ``wnids`` (as in the real devkit,
    where ILSVRC2012_ID order is not WNID order); ``inner_nodes`` non-leaf synsets
    (num_children > 0) follow, as in the real file's 1860 entries."""
    import scipy.io

    rng = np.random.default_rng(seed)
    order = [wnids[i] for i in rng.permutation(len(wnids))]
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = []
    for i, wnid in enumerate(order, 1):
        rows.append((float(i), wnid, f"words {wnid}", f"gloss of {wnid}", 0.0, np.zeros((1, 0)), 0.0, 1300.0))
    for j in range(inner_nodes):
        ident = len(order) + 1 + j
        rows.append(
            (float(ident), f"n{9000000 + j:08d}", "inner", "an inner node", 2.0, np.array([[1.0, 2.0]]), 1.0, 0.0)
        )
    array = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, row in enumerate(rows):
        array[r, 0] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": array})
    return {wnid: i for i, wnid in enumerate(order, 1)}


def make_imagenet_val(
    root: Path,
    wnids_per_image: Sequence[str],
    all_wnids: Sequence[str],
    layout: str = "flat",
    devkit: Optional[Path] = None,
    sizes: tuple[int, int] = (24, 80),
    seed: int = 7,
) -> ImageNetVal:
    """ILSVRC2012 validation images ``ILSVRC2012_val_{n:08d}.JPEG`` (n from 1), image n of
    synset ``wnids_per_image[n - 1]``. ``layout``: ``flat`` (+ the devkit, by default in
    ``root/../ILSVRC2012_devkit_t12``) or ``folders`` (``root/{wnid}/...``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    images = [(f"ILSVRC2012_val_{n:08d}.JPEG", w) for n, w in enumerate(wnids_per_image, 1)]
    id_of: dict[str, int] = {}
    if layout == "flat":
        devkit = devkit or root.parent / "ILSVRC2012_devkit_t12"
        id_of = write_meta_mat(devkit / "data" / "meta.mat", list(all_wnids), seed)
        (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{id_of[w]}\n" for _, w in images)
        )
    for n, (name, wnid) in enumerate(images, 1):
        path = root / name if layout == "flat" else root / wnid / name
        write_image(path, rng, sizes, seed * 100003 + n)
    return ImageNetVal(root, devkit if layout == "flat" else None, images, id_of)


def copy_as_folders(flat: ImageNetVal, root: Path) -> ImageNetVal:
    """The same images re-arranged one folder per synset (bytes unchanged)."""
    for name, wnid in flat.images:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / wnid / name).write_bytes((flat.root / name).read_bytes())
    return ImageNetVal(root, None, list(flat.images), dict(flat.id_of))

"""Tests for tools/make_shards.py: real data, real files, the real CLI.

The shards contract (docs/design.md section 2): ``{prefix}-{000000..N}.tar``, one sample per
key, image as ``.jpg``/``.png``, training label ``.cls``, clean label ``.clean.cls``, and
a ``manifest.json`` beside them (counts, classes, per-shard sha256, noise spec, realised
noise rate and transition matrix).

Everything here is read back independently of the writer: tar members with ``tarfile``,
images with PIL, idx files with gzip + numpy, checksums with hashlib, keys with
webdataset (the loader's own key rule).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nrd_dist.data.noise import apply_noise

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_shards.py"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARD_NAME = re.compile(r"^(train|test)-(\d{6})\.tar$")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- helpers


def run_script(*args, check: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python tools/make_shards.py ARGS`` as a user would, from the repo root, in a
    fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, f"make_shards failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def run_cli(*args, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI's ``main(ARGS)`` (what the script calls) in this process: its exit code (an
    argparse exit included), stdout and stderr, without a fresh interpreter's ~2 s start.
    An exception it does not turn into a message fails the test with its traceback.
    :func:`run_script` runs the script itself for the full and determinism tests."""
    import contextlib

    from nrd_dist.tools.make_shards import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    proc = subprocess.CompletedProcess([str(TOOL), *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, f"make_shards failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, a one-line style error naming ``needles``, and no traceback."""
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(split_dir: Path) -> tuple[dict, list[tuple[str, dict[str, bytes]]]]:
    """The manifest and every sample, in shard order, as (key, {ext: bytes}).

    Checks the structural contract on the way: the shard files on disk are exactly the
    manifest's, named ``{split}-{000000..N}``, with matching sha256, size and count, and
    each key's members are contiguous and occur in one shard only.
    """
    manifest = json.loads((split_dir / "manifest.json").read_text())
    split = manifest["split"]
    on_disk = sorted(p.name for p in split_dir.glob("*.tar"))
    listed = [s["name"] for s in manifest["shards"]]
    assert on_disk == listed, (on_disk, listed)
    assert listed == [f"{split}-{i:06d}.tar" for i in range(len(listed))]
    assert all(SHARD_NAME.match(n) for n in listed)
    assert manifest["shard_pattern"] == f"{split}-{{000000..{len(listed) - 1:06d}}}.tar"
    assert not list(split_dir.glob("*.tmp")), "temporary files left behind"

    samples: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    for info in manifest["shards"]:
        path = split_dir / info["name"]
        assert info["sha256"] == sha256(path), info["name"]
        assert info["bytes"] == path.stat().st_size, info["name"]
        count = 0
        with tarfile.open(path) as tar:
            for member in tar:
                assert member.isfile(), member.name
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if not samples or samples[-1][0] != key:
                    assert key not in seen, f"key {key} split across shards or not contiguous"
                    seen.add(key)
                    samples.append((key, {}))
                    count += 1
                fields = samples[-1][1]
                assert ext not in fields, f"duplicate member {member.name}"
                fields[ext] = data
        assert count == info["count"], info["name"]
    assert sum(s["count"] for s in manifest["shards"]) == manifest["num_samples"] == len(samples)
    return manifest, samples


def labels_of(samples, ext: str = "cls") -> np.ndarray:
    return np.array([int(fields[ext].decode()) for _, fields in samples], dtype=np.int64)


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """An idx uint8 file as in the (Fashion-)MNIST distribution."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def read_idx_gz(path: Path) -> np.ndarray:
    """Independent idx reader for the real files (header: 4-byte magic + 4 bytes per dim)."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_fmnist_fixture(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict:
    """A Fashion-MNIST-layout folder of random 28x28 images with balanced labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python 2 pickles


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> the official N x 3072 rows: R plane, then G, then B."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def pattern_image(offset: int) -> np.ndarray:
    """R rises down the rows, G rises along the columns, B is a constant: any channel
    swap or transposition shows."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([y * 8, x * 8, np.full_like(y, 17 + offset)], axis=-1).astype(np.uint8)


def cifar_images(rng, n: int, offset: int) -> np.ndarray:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[0] = pattern_image(offset)
    return images


def make_cifar10_fixture(root: Path, per_batch: int = 3, n_test: int = 4, seed: int = 1) -> dict:
    """``root/cifar-10-batches-py/`` in the official python-version layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _pickle(
        folder / "batches.meta",
        {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
    )
    train_images, train_labels = [], []
    batches = [(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    batches.append(("test_batch", n_test, "testing batch 1 of 1"))
    test = None
    for b, (name, n, batch_label) in enumerate(batches):
        images = cifar_images(rng, n, b)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        labels[0] = 9 if b % 2 else 0  # both ends of the label range occur
        _pickle(
            folder / name,
            {
                b"batch_label": batch_label.encode(),
                b"labels": labels,
                b"data": cifar_rows(images),
                b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n)],
            },
        )
        if name == "test_batch":
            test = (images, np.array(labels))
        else:
            train_images.append(images)
            train_labels.extend(labels)
    return {"dir": folder, "train": (np.concatenate(train_images), np.array(train_labels)), "test": test}


def make_cifar100_fixture(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 2) -> dict:
    """``root/cifar-100-python/`` in the official python-version layout."""
    from nrd_dist.data.noise import CIFAR100_COARSE_LABELS

    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        },
    )
    out = {"dir": folder, "fine_names": fine_names}
    for b, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images = cifar_images(rng, n, b)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        fine[0], fine[1] = 0, 99
        _pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [CIFAR100_COARSE_LABELS[f] for f in fine],
                b"data": cifar_rows(images),
            },
        )
        out[split] = (images, np.array(fine))
    return out


# ----------------------------------------------------------------------------- 1. real Fashion-MNIST


@pytest.mark.slow
def test_full_fashion_mnist_via_cli(tmp_path):
    out = tmp_path / "fmnist"
    proc = run_script("fashion-mnist", "--out", out, "--quiet", check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [(r["split"], r["num_samples"]) for r in lines] == [("train", 60000), ("test", 10000)]

    all_keys: set[str] = set()
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        images = read_idx_gz(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_gz(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)

        manifest, samples = read_split(out / split)
        assert manifest["dataset"] == "fashion-mnist" and manifest["split"] == split
        assert manifest["num_samples"] == n
        assert manifest["num_classes"] == 10 and len(manifest["classes"]) == 10
        assert manifest["classes"][0] == "T-shirt/top" and manifest["classes"][9] == "Ankle boot"
        assert manifest["class_counts"] == [n // 10] * 10
        assert manifest["noise"] is None
        assert manifest["noise_report"]["realised_rate"] == 0.0

        keys = [k for k, _ in samples]
        assert len(set(keys)) == n
        all_keys.update(keys)
        for key, fields in samples:
            assert set(fields) == {"png", "cls", "clean.cls"}, key
        # Samples are in idx order: the i-th sample is idx index i.
        np.testing.assert_array_equal(labels_of(samples), labels)
        np.testing.assert_array_equal(labels_of(samples, "clean.cls"), labels)
        np.testing.assert_array_equal(np.bincount(labels_of(samples), minlength=10), manifest["class_counts"])

        # Pixels of every sample (about 1.5 s for all 70,000).
        decoded = np.empty_like(images)
        for i, (key, fields) in enumerate(samples):
            image = decode(fields["png"])
            assert image.mode == "L" and image.size == (28, 28), (key, image.mode, image.size)
            decoded[i] = np.asarray(image)
        mismatched = np.flatnonzero((decoded != images).any(axis=(1, 2)))
        assert mismatched.size == 0, f"{split}: {mismatched.size} images differ, first index {mismatched[:5]}"
        del samples, decoded
    assert len(all_keys) == 70000


# ----------------------------------------------------------------------------- 2. determinism


@pytest.mark.slow
def test_determinism_byte_identical(tmp_path):
    make_fmnist_fixture(tmp_path / "src", n_train=50, n_test=7)
    make_cifar10_fixture(tmp_path / "c10", per_batch=4)
    for dataset, src in (("fashion-mnist", tmp_path / "src"), ("cifar10", tmp_path / "c10")):
        runs = []
        for run in ("a", "b"):
            out = tmp_path / f"{dataset}-{run}"
            run_script(dataset, "--src", src, "--out", out, "--shard-size", 16, "--quiet", check=True)
            runs.append(out)
        for split in ("train", "test"):
            m_a = json.loads((runs[0] / split / "manifest.json").read_text())
            m_b = json.loads((runs[1] / split / "manifest.json").read_text())
            assert m_a["shards"] == m_b["shards"]  # names, counts, sha256, sizes
            assert len(m_a["shards"]) == -(-m_a["num_samples"] // 16)
            for info in m_a["shards"]:
                a, b = runs[0] / split / info["name"], runs[1] / split / info["name"]
                assert a.read_bytes() == b.read_bytes(), info["name"]
                assert sha256(a) == info["sha256"]
                # Nothing time- or user-dependent inside, so a later run cannot differ.
                with tarfile.open(a) as tar:
                    for member in tar.getmembers():
                        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
                            0,
                            0,
                            0,
                            "",
                            "",
                        ), member.name


# ----------------------------------------------------------------------------- 3. CIFAR


def _check_rgb_samples(samples, images, labels):
    assert len(samples) == len(images)
    np.testing.assert_array_equal(labels_of(samples), labels)
    np.testing.assert_array_equal(labels_of(samples, "clean.cls"), labels)
    for i, (key, fields) in enumerate(samples):
        assert set(fields) == {"png", "cls", "clean.cls"}, key
        image = decode(fields["png"])
        assert image.mode == "RGB" and image.size == (32, 32), (key, image.mode, image.size)
        np.testing.assert_array_equal(np.asarray(image), images[i], err_msg=key)


@pytest.mark.parametrize("src_is_inner_folder", [False, True])
def test_cifar10(tmp_path, src_is_inner_folder):
    fx = make_cifar10_fixture(tmp_path / "src")
    src = fx["dir"] if src_is_inner_folder else tmp_path / "src"
    out = tmp_path / "out"
    run_cli("cifar10", "--src", src, "--out", out, "--shard-size", 4, "--quiet", check=True)
    for split, n in (("train", 15), ("test", 4)):
        images, labels = fx[split]
        manifest, samples = read_split(out / split)
        assert manifest["dataset"] == "cifar10" and manifest["num_samples"] == n
        assert manifest["classes"] == CIFAR10_NAMES and manifest["num_classes"] == 10
        assert manifest["class_counts"] == np.bincount(labels, minlength=10).tolist()
        _check_rgb_samples(samples, images, labels)
    # The pattern image, checked against explicit values rather than the fixture's array:
    # pixel (y, x) = (R 8y, G 8x, B constant) of the first image of data_batch_1.
    _, samples = read_split(out / "train")
    first = np.asarray(decode(samples[0][1]["png"]))
    assert first[0, 0].tolist() == [0, 0, 17]
    assert first[3, 0].tolist() == [24, 0, 17]  # down the rows: red
    assert first[0, 5].tolist() == [0, 40, 17]  # along the columns: green
    # Train samples follow data_batch_1..5: the first image of data_batch_2 is sample 3.
    second = np.asarray(decode(samples[3][1]["png"]))
    assert second[31, 31].tolist() == [248, 248, 18]


def test_cifar100(tmp_path):
    fx = make_cifar100_fixture(tmp_path / "src")
    out = tmp_path / "out"
    run_cli("cifar100", "--src", tmp_path / "src", "--out", out, "--quiet", check=True)
    for split, n in (("train", 12), ("test", 5)):
        images, labels = fx[split]
        manifest, samples = read_split(out / split)
        assert manifest["dataset"] == "cifar100" and manifest["num_samples"] == n
        assert manifest["num_classes"] == 100
        assert manifest["classes"] == fx["fine_names"]  # fine labels, not coarse
        assert manifest["class_counts"] == np.bincount(labels, minlength=100).tolist()
        assert labels_of(samples)[:2].tolist() == [0, 99]
        _check_rgb_samples(samples, images, labels)


# ----------------------------------------------------------------------------- 4. folder


def test_folder_copies_bytes_and_sorted_labels(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    # Created out of order; class index is the position in the sorted names, compared
    # by code point as torchvision's ImageFolder does ("Zebra" before "apple").
    layout = {
        "cat": ["b.png", "a.jpg"],
        "apple": ["x.jpeg", "y.PNG"],
        "Zebra": ["only.jpg"],
    }
    for cls, names in layout.items():
        (src / cls).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 256, size=(int(rng.integers(5, 20)), int(rng.integers(5, 20)), 3), dtype=np.uint8)
            fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
            Image.fromarray(pixels).save(src / cls / name, format=fmt)
        (src / cls / "notes.txt").write_text("not an image")
    (src / "README.md").write_text("a file at the top level is not a class")

    out = tmp_path / "out"
    run_cli("folder", "--src", src, "--out", out, "--shard-size", 2, "--quiet", check=True)
    manifest, samples = read_split(out / "train")
    classes = sorted(layout)
    assert classes == ["Zebra", "apple", "cat"]
    assert manifest["classes"] == classes and manifest["num_classes"] == 3
    expected = [(classes.index(cls), src / cls / name) for cls in classes for name in sorted(layout[cls])]
    assert manifest["num_samples"] == len(expected) == 5
    assert manifest["class_counts"] == [1, 2, 2]
    for (label, path), (key, fields) in zip(expected, samples):
        ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
        assert set(fields) == {ext, "cls", "clean.cls"}, (key, path)
        assert fields[ext] == path.read_bytes(), path  # byte for byte
        assert int(fields["cls"]) == int(fields["clean.cls"]) == label, path


# ----------------------------------------------------------------------------- 5. baked-in noise


def _wds_samples(split_dir: Path) -> list[dict]:
    """Samples as the training loader sees them (webdataset's own key rule)."""
    import webdataset as wds

    manifest = json.loads((split_dir / "manifest.json").read_text())
    urls = [str(split_dir / s["name"]) for s in manifest["shards"]]
    return list(wds.tarfile_to_samples()(iter({"url": u} for u in urls)))


@pytest.mark.slow
def test_baked_noise_matches_apply_noise(tmp_path):
    fx = make_fmnist_fixture(tmp_path / "src", n_train=3000, n_test=400, seed=5)
    out = tmp_path / "out"
    proc = run_cli(
        "fashion-mnist",
        "--src",
        tmp_path / "src",
        "--out",
        out,
        "--shard-size",
        1000,
        "--noise-type",
        "symmetric",
        "--noise-rate",
        0.4,
        "--noise-seed",
        3,
        "--quiet",
        check=True,
    )
    spec = {"type": "symmetric", "rate": 0.4, "seed": 3}

    manifest, samples = read_split(out / "train")
    noisy, clean = labels_of(samples), labels_of(samples, "clean.cls")
    np.testing.assert_array_equal(clean, fx["train"][1])
    keys = [s["__key__"] for s in _wds_samples(out / "train")]
    assert keys == [k for k, _ in samples]
    np.testing.assert_array_equal(noisy, apply_noise(keys, clean, spec, 10))

    realised = float(np.mean(noisy != clean))
    expected = 0.4 * 9 / 10  # symmetric may redraw the clean class
    sigma = (expected * (1 - expected) / len(noisy)) ** 0.5
    assert abs(realised - expected) < 5 * sigma, (realised, expected)

    assert manifest["noise"] == spec
    assert manifest["class_counts"] == np.bincount(clean, minlength=10).tolist()  # clean counts
    report = manifest["noise_report"]
    assert report["realised_rate"] == pytest.approx(realised, abs=1e-12)
    counts = np.zeros((10, 10), dtype=np.int64)
    np.add.at(counts, (clean, noisy), 1)
    assert report["counts"] == counts.tolist()
    np.testing.assert_allclose(report["transition_matrix"], counts / counts.sum(1, keepdims=True))
    summary = {json.loads(line)["split"]: json.loads(line) for line in proc.stdout.splitlines()}
    assert summary["train"]["realised_noise_rate"] == pytest.approx(realised)

    # The test split is not noised unless asked for.
    manifest, samples = read_split(out / "test")
    assert manifest["noise"] is None and manifest["noise_report"]["realised_rate"] == 0.0
    np.testing.assert_array_equal(labels_of(samples), labels_of(samples, "clean.cls"))
    np.testing.assert_array_equal(labels_of(samples), fx["test"][1])


def test_noise_split_option_noises_test_too(tmp_path):
    make_fmnist_fixture(tmp_path / "src", n_train=20, n_test=400, seed=6)
    out = tmp_path / "out"
    run_cli(
        "fashion-mnist",
        "--src",
        tmp_path / "src",
        "--out",
        out,
        "--split",
        "test",
        "--noise-type",
        "symmetric_exclusive",
        "--noise-rate",
        0.5,
        "--noise-seed",
        1,
        "--noise-split",
        "train,test",
        "--quiet",
        check=True,
    )
    assert not (out / "train").exists()
    manifest, samples = read_split(out / "test")
    noisy, clean = labels_of(samples), labels_of(samples, "clean.cls")
    spec = {"type": "symmetric_exclusive", "rate": 0.5, "seed": 1}
    np.testing.assert_array_equal(noisy, apply_noise([k for k, _ in samples], clean, spec, 10))
    assert 0.3 < np.mean(noisy != clean) < 0.7
    assert manifest["noise"] == spec


# ----------------------------------------------------------------------------- 6. errors


def test_refuses_overwrite_without_force(tmp_path):
    make_fmnist_fixture(tmp_path / "src", n_train=30, n_test=6)
    out = tmp_path / "out"
    args = ["fashion-mnist", "--src", tmp_path / "src", "--out", out, "--quiet"]
    run_cli(*args, "--shard-size", 4, check=True)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert len([p for p in before if p.suffix == ".tar"]) == 8 + 2

    proc = run_cli(*args, "--shard-size", 100)
    assert_clean_error(proc, "--force")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before  # untouched

    # --force with a broken source fails before deleting anything.
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    proc = run_cli(*args, "--shard-size", 100, "--force")
    assert_clean_error(proc, "train-labels-idx1-ubyte")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before

    # --force works, and stale shards from the earlier, finer sharding are gone.
    fx = make_fmnist_fixture(tmp_path / "src2", n_train=30, n_test=6)
    proc = run_cli(
        "fashion-mnist", "--src", tmp_path / "src2", "--out", out, "--quiet", "--shard-size", 100, "--force", check=True
    )
    for split, n in (("train", 30), ("test", 6)):
        manifest, samples = read_split(out / split)  # checks disk == manifest exactly
        assert [s["name"] for s in manifest["shards"]] == [f"{split}-000000.tar"]
        assert manifest["num_samples"] == n
        np.testing.assert_array_equal(labels_of(samples), fx[split][1])


def test_missing_idx_files(tmp_path):
    src, out = tmp_path / "empty", tmp_path / "out"
    src.mkdir()
    assert_clean_error(
        run_cli("fashion-mnist", "--src", src, "--out", out, "--quiet"), str(src / "train-images-idx3-ubyte")
    )
    assert not list(out.rglob("*.tar"))

    make_fmnist_fixture(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-images-idx3-ubyte.gz").unlink()
    assert_clean_error(
        run_cli("fashion-mnist", "--src", tmp_path / "partial", "--out", out, "--split", "test", "--quiet"),
        str(tmp_path / "partial" / "t10k-images-idx3-ubyte"),
    )
    assert not list(out.rglob("*.tar"))


def test_missing_cifar_batch(tmp_path):
    fx = make_cifar10_fixture(tmp_path / "src")
    (fx["dir"] / "data_batch_3").unlink()
    out = tmp_path / "out"
    assert_clean_error(
        run_cli("cifar10", "--src", tmp_path / "src", "--out", out, "--split", "train", "--quiet"),
        str(fx["dir"] / "data_batch_3"),
    )
    assert not list(out.rglob("*.tar"))

    fx = make_cifar100_fixture(tmp_path / "src100")
    (fx["dir"] / "test").unlink()
    assert_clean_error(
        run_cli("cifar100", "--src", tmp_path / "src100", "--out", out, "--split", "test", "--quiet"),
        str(fx["dir"] / "test"),
    )

    # No batches at all: says where it looked.
    (tmp_path / "nothing").mkdir()
    assert_clean_error(
        run_cli("cifar10", "--src", tmp_path / "nothing", "--out", out, "--quiet"), "cifar-10-batches-py"
    )


def _idx_bytes(array: np.ndarray) -> bytes:
    return (
        struct.pack(">HBB", 0, 8, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


@pytest.mark.parametrize(
    "damage", ["short_body", "long_body", "truncated_header", "truncated_gzip", "not_gzip", "wrong_ndim"]
)
def test_bad_idx_file_named(tmp_path, damage):
    src = tmp_path / "src"
    make_fmnist_fixture(src, n_train=10)
    target = src / "train-images-idx3-ubyte.gz"
    good = _idx_bytes(np.zeros((10, 28, 28)))
    damaged = {
        "short_body": lambda: gzip.compress(good[:-1]),
        "long_body": lambda: gzip.compress(good + b"\0" * 28),
        "truncated_header": lambda: gzip.compress(good[:10]),
        "truncated_gzip": lambda: gzip.compress(good)[: len(gzip.compress(good)) // 2],
        "not_gzip": lambda: b"this is not gzip data at all",
        "wrong_ndim": lambda: gzip.compress(_idx_bytes(np.zeros((10, 784)))),
    }[damage]()
    target.write_bytes(damaged)
    out = tmp_path / "out"
    proc = run_cli("fashion-mnist", "--src", src, "--out", out, "--split", "train", "--quiet")
    assert_clean_error(proc, str(target))
    assert not list(out.rglob("*.tar"))


def test_image_label_count_mismatch(tmp_path):
    src = tmp_path / "src"
    make_fmnist_fixture(src, n_train=10)
    write_idx(src / "train-labels-idx1-ubyte", np.zeros(9))
    proc = run_cli("fashion-mnist", "--src", src, "--out", tmp_path / "out", "--split", "train", "--quiet")
    assert_clean_error(proc, "10 images but 9 labels")


@pytest.mark.parametrize("dataset,bad_label", [("cifar10", 10), ("cifar10", -1), ("cifar100", 100)])
def test_cifar_label_out_of_range(tmp_path, dataset, bad_label):
    if dataset == "cifar10":
        fx = make_cifar10_fixture(tmp_path / "src")
        path, field = fx["dir"] / "data_batch_4", b"labels"
    else:
        fx = make_cifar100_fixture(tmp_path / "src")
        path, field = fx["dir"] / "train", b"fine_labels"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[field][1] = bad_label
    _pickle(path, batch)
    out = tmp_path / "out"
    proc = run_cli(dataset, "--src", tmp_path / "src", "--out", out, "--split", "train", "--quiet")
    assert_clean_error(proc, f"label {bad_label} ")
    assert not list(out.rglob("*.tar"))


def test_fmnist_label_out_of_range(tmp_path):
    src = tmp_path / "src"
    make_fmnist_fixture(src, n_train=10)
    write_idx(src / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10]))
    proc = run_cli("fashion-mnist", "--src", src, "--out", tmp_path / "out", "--split", "train", "--quiet")
    assert_clean_error(proc, "label 10 ")


@pytest.mark.parametrize("dataset,split", [("fashion-mnist", "val"), ("cifar10", "validation"), ("folder", "test")])
def test_wrong_split(tmp_path, dataset, split):
    src = tmp_path / "src"
    if dataset == "fashion-mnist":
        make_fmnist_fixture(src)
    elif dataset == "cifar10":
        make_cifar10_fixture(src)
    else:
        (src / "a").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(src / "a" / "x.png")
    out = tmp_path / "out"
    proc = run_cli(dataset, "--src", src, "--out", out, "--split", split, "--quiet")
    assert_clean_error(proc, "--split", repr(split), "train")
    assert not out.exists()


def test_cifar_requires_src_and_rejects_bad_shard_size(tmp_path):
    assert_clean_error(run_cli("cifar10", "--out", tmp_path / "out"), "--src")
    make_fmnist_fixture(tmp_path / "src")
    assert_clean_error(
        run_cli("fashion-mnist", "--src", tmp_path / "src", "--out", tmp_path / "out", "--shard-size", 0),
        "--shard-size",
    )
    proc = run_cli("imagenet", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_fingerprint_sees_the_order_of_a_sequential_noise_map():
    # asymmetric_sequential applies its pairs in order, so a reordered map is another request;
    # for every other kind the order means nothing and must not change the fingerprint
    from nrd_dist.tools.shard_output import SplitOutput

    def fingerprint(kind, mapping):
        return SplitOutput(None, "train", {"noise": {"type": kind, "rate": 0.4, "map": mapping}}).fingerprint

    forward, backward = {3: 5, 5: 3}, {5: 3, 3: 5}
    assert fingerprint("asymmetric_sequential", forward) != fingerprint("asymmetric_sequential", backward)
    assert fingerprint("asymmetric", forward) == fingerprint("asymmetric", backward)

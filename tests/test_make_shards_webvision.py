"""tools/make_shards.py for ``webvision`` and ``imagenet-val``: real layouts (built by
tests/webvision_fixture.py), real JPEGs, the real CLI, a real S3 server for remote output.

Every sample is read back independently of the writer (tarfile, PIL, hashlib) and
checked against the fixture's own lists, not against the tool's view of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nrd_dist.tools import make_shards as tool
from nrd_dist.tools.location import Location
from webvision_fixture import copy_as_folders, make_imagenet_val, make_webvision_tree, truncate, write_filelist

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_shards.py"

# Labels 50+ exist in the lists: mini-WebVision (the default 50 classes) must drop them.
TRAIN_LABELS = [0, 1, 2, 55, 3, 49, 50, 1, 0, 2, 4, 59, 3, 3, 10, 20, 1, 0, 49, 2, 7, 51]
VAL_LABELS = [0, 1, 51, 2, 49, 3, 0]


# ----------------------------------------------------------------------------- helpers


def run(*args) -> tuple[int, str, str]:
    """``make_shards.main`` in this process (fast); (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main([str(a) for a in args] + ["--quiet"])
    return code, out.getvalue(), err.getvalue()


def ok(*args) -> dict[str, dict]:
    """Run, expect success; the JSON summary line per split."""
    code, out, err = run(*args)
    assert code == 0, err
    return {line["split"]: line for line in map(json.loads, out.splitlines())}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def fails(*args, needles=()) -> str:
    code, _, err = run(*args)
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tar(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of one shard in order: (key, {extension: bytes}); members contiguous per key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                assert key not in {k for k, _ in samples}, f"key {key} not contiguous"
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def read_split(split_dir: Path) -> tuple[dict, list[tuple[str, dict[str, bytes]]]]:
    """Manifest and all samples; checks the shards on disk are exactly the manifest's
    (names, sha256, sizes, counts) and no temporary file is left."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    split = manifest["split"]
    listed = [s["name"] for s in manifest["shards"]]
    assert sorted(p.name for p in split_dir.glob("*.tar")) == listed
    assert listed == [f"{split}-{i:06d}.tar" for i in range(len(listed))]
    assert not [p for p in split_dir.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".staging")]
    samples = []
    for info in manifest["shards"]:
        data = (split_dir / info["name"]).read_bytes()
        assert (sha256(data), len(data)) == (info["sha256"], info["bytes"]), info["name"]
        shard = read_tar(data)
        assert len(shard) == info["count"]
        samples += shard
    assert len(samples) == manifest["num_samples"] == len({k for k, _ in samples})
    return manifest, samples


def image_of(fields: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = [e for e in fields if e in ("jpg", "png", "webp")]
    return ext, fields[ext]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """name -> (bytes, mtime_ns, inode) of every file: a rewritten file shows."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir() if p.is_file()}


def contents(folder: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _, _) in snapshot(folder).items()}


@pytest.fixture(scope="module")
def webvision_tree(tmp_path_factory):
    """Shared read-only WebVision tree (60 synsets; tests that damage data build their own)."""
    root = tmp_path_factory.mktemp("webvision")
    return make_webvision_tree(root / "src", TRAIN_LABELS, VAL_LABELS)


# ----------------------------------------------------------------------------- webvision


def test_webvision_mini_default_50_classes(tmp_path, webvision_tree):
    tree = webvision_tree
    out = tmp_path / "out"
    summary = ok("webvision", "--src", tree.root, "--out", out, "--shard-size", 5)
    assert set(summary) == {"train", "val"}

    for split, listed in (("train", tree.train), ("val", tree.val)):
        kept = [(path, label) for path, label in listed if label < 50]
        manifest, samples = read_split(out / split)
        assert manifest["dataset"] == "webvision" and manifest["split"] == split
        assert manifest["num_classes"] == 50 and manifest["classes"] == tree.wnids[:50]
        assert manifest["class_descriptions"][0] == "tench, Tinca tinca"
        assert manifest["excluded_other_classes"] == len(listed) - len(kept) > 0
        assert manifest["skipped"] == {"count": 0, "samples": []}
        assert manifest["images"]["resized"] == 0
        assert manifest["images"]["reencoded"] == (1 if split == "train" else 0)
        assert manifest["class_counts"] == np.bincount([label for _, label in kept], minlength=50).tolist()
        assert len(manifest["shards"]) == -(-len(kept) // 5)
        assert summary[split]["num_samples"] == len(kept)
        # Every sample: key in file-list order, label, path, image bytes unchanged.
        assert [k for k, _ in samples] == [f"{split}_{i:06d}" for i in range(len(kept))]
        for (key, fields), (path, label) in zip(samples, kept):
            assert set(fields) - {"jpg", "png"} == {"cls", "clean.cls", "path.txt"}, key
            assert int(fields["cls"]) == int(fields["clean.cls"]) == label, key
            assert fields["path.txt"].decode() == path
            ext, data = image_of(fields)
            source = (tree.root / path).read_bytes()
            if tree.odd.get(path) == "bmp":  # not a format the loader reads: re-encoded as JPEG
                image, original = decode(data), decode(source)
                assert (ext, image.format, image.size) == ("jpg", "JPEG", original.size), path
                error = np.abs(np.asarray(image, dtype=float) - np.asarray(original.convert("RGB"), dtype=float))
                assert error.mean() < 16, (path, error.mean())  # the noisy fixture costs JPEG ~10
                continue
            assert data == source, path  # copied byte for byte
            assert ext == ("png" if tree.odd.get(path) == "png" else "jpg"), path  # by content, not name

    # The loader's key rule (webdataset) sees one sample per key, path.txt included.
    import webdataset as wds

    urls = [{"url": str(p)} for p in sorted((out / "train").glob("*.tar"))]
    first = next(iter(wds.tarfile_to_samples()(iter(urls))))
    assert first["__key__"] == "train_000000" and first["path.txt"] == tree.train[0][0].encode()


def test_webvision_classes_option_and_resize(tmp_path, webvision_tree):
    tree = webvision_tree
    out = tmp_path / "out"
    px = 48
    ok(
        "webvision",
        "--src",
        tree.root,
        "--out",
        out,
        "--split",
        "train",
        "--classes",
        4,
        "--resize-shorter",
        px,
        "--jpeg-quality",
        80,
        "--shard-size",
        4,
    )
    kept = [(path, label) for path, label in tree.train if label < 4]
    manifest, samples = read_split(out / "train")
    assert manifest["classes"] == tree.wnids[:4] and manifest["num_classes"] == 4
    assert manifest["excluded_other_classes"] == len(tree.train) - len(kept)
    assert [int(f["cls"]) for _, f in samples] == [label for _, label in kept]
    resized = reencoded = 0
    for (_, fields), (path, _) in zip(samples, kept):
        source = decode((tree.root / path).read_bytes())
        width, height = source.size
        ext, data = image_of(fields)
        if min(width, height) <= px:  # never enlarged: the original bytes (BMP: re-encoded)
            if tree.odd.get(path) == "bmp":
                assert decode(data).size == source.size and ext == "jpg"
                reencoded += 1
            else:
                assert data == (tree.root / path).read_bytes(), path
            continue
        resized += 1
        image = decode(data)
        assert ext == "jpg" and image.format == "JPEG" and image.mode in ("RGB", "L"), path
        assert min(image.size) == px, (path, source.size, image.size)
        long_expected = max(width, height) * px / min(width, height)
        assert abs(max(image.size) - long_expected) <= 1, (path, source.size, image.size)
        assert (image.size[0] >= image.size[1]) == (width >= height), path  # orientation kept
        if tree.odd.get(path) == "grey":
            assert image.mode == "L"
    assert 0 < resized < len(kept)
    assert manifest["images"] == {"resize_shorter": px, "jpeg_quality": 80, "resized": resized, "reencoded": reencoded}


@pytest.mark.slow
def test_workers_give_identical_shards(tmp_path, webvision_tree):
    args = ["webvision", "--src", webvision_tree.root, "--resize-shorter", 40, "--shard-size", 6]
    run_cli(*args, "--out", tmp_path / "w1", "--workers", 1)
    run_cli(*args, "--out", tmp_path / "w2", "--workers", 2)
    for split in ("train", "val"):
        one, two = contents(tmp_path / "w1" / split), contents(tmp_path / "w2" / split)
        assert one == two and len([n for n in one if n.endswith(".tar")]) == {"train": 3, "val": 1}[split]


# ----------------------------------------------------------------------------- imagenet-val


def test_imagenet_val_flat_and_synset_folders(tmp_path, webvision_tree):
    wnids = webvision_tree.wnids
    # Images of kept synsets (incl. the last kept one, 49) and of dropped ones (50+).
    per_image = [wnids[i] for i in (3, 0, 52, 49, 1, 1, 57, 0, 12, 3)]
    flat = make_imagenet_val(tmp_path / "imagenet" / "val", per_image, wnids)
    folders = copy_as_folders(flat, tmp_path / "by_synset")
    info = webvision_tree.info
    expected = [(name, wnids.index(w)) for name, w in flat.images if wnids.index(w) < 50]

    ok("imagenet-val", "--src", flat.root, "--webvision-info", info, "--out", tmp_path / "a", "--shard-size", 4)
    ok("imagenet-val", "--src", folders.root, "--webvision-info", info, "--out", tmp_path / "b", "--shard-size", 4)
    results = {}
    for name, layout in (("a", "flat"), ("b", "synset_folders")):
        manifest, samples = read_split(tmp_path / name / "val")
        assert manifest["layout"] == layout and manifest["split"] == "val"
        assert manifest["classes"] == wnids[:50] and manifest["num_classes"] == 50
        assert manifest["excluded_other_classes"] == 2
        assert [k for k, _ in samples] == [f"val_{i:06d}" for i in range(len(expected))]
        for (key, fields), (image_name, label) in zip(samples, expected):
            assert int(fields["cls"]) == int(fields["clean.cls"]) == label, key
            rel = image_name if layout == "flat" else f"{wnids[label]}/{image_name}"
            assert fields["path.txt"].decode() == rel
            assert image_of(fields) == ("jpg", (flat.root / image_name).read_bytes())
        results[name] = [(k, {e: v for e, v in f.items() if e != "path.txt"}) for k, f in samples]
    assert results["a"] == results["b"]  # same images, same shards but for the recorded path

    # --classes: only the first synsets; --devkit given explicitly.
    ok(
        "imagenet-val",
        "--src",
        flat.root,
        "--webvision-info",
        info,
        "--devkit",
        flat.devkit,
        "--classes",
        2,
        "--out",
        tmp_path / "c",
    )
    manifest, samples = read_split(tmp_path / "c" / "val")
    assert manifest["classes"] == wnids[:2]
    assert [int(f["cls"]) for _, f in samples] == [label for _, label in expected if label < 2]


def test_imagenet_val_bad_data(tmp_path, webvision_tree):
    wnids, info = webvision_tree.wnids, webvision_tree.info
    flat = make_imagenet_val(tmp_path / "flat", [wnids[i] for i in (0, 1, 2, 3)], wnids)
    truth = flat.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    lines = truth.read_text().splitlines()
    lines[2] = "1001"  # not an ILSVRC2012_ID of a leaf synset
    truth.write_text("\n".join(lines) + "\n")
    (flat.root / "ILSVRC2012_val_00000002.JPEG").unlink()
    args = ["imagenet-val", "--src", flat.root, "--webvision-info", info]
    fails(
        *args,
        "--out",
        tmp_path / "out",
        needles=["ILSVRC2012_val_00000003.JPEG", "1001", "ILSVRC2012_val_00000002.JPEG", "missing file", "--skip-bad"],
    )
    assert not (tmp_path / "out").exists()
    ok(*args, "--out", tmp_path / "out", "--skip-bad")
    manifest, samples = read_split(tmp_path / "out" / "val")
    assert [int(f["cls"]) for _, f in samples] == [0, 3]
    assert sorted(s["path"] for s in manifest["skipped"]["samples"]) == [
        "ILSVRC2012_val_00000002.JPEG",
        "ILSVRC2012_val_00000003.JPEG",
    ]

    # Synset folders: the same image in two folders is a duplicate (ambiguous label).
    folders = copy_as_folders(make_imagenet_val(tmp_path / "f0", [wnids[0], wnids[1]], wnids), tmp_path / "f")
    (folders.root / wnids[2]).mkdir()
    (folders.root / wnids[2] / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    fails(
        "imagenet-val",
        "--src",
        folders.root,
        "--webvision-info",
        info,
        "--out",
        tmp_path / "o2",
        needles=[f"{wnids[2]}/ILSVRC2012_val_00000001.JPEG", "duplicate"],
    )


# ----------------------------------------------------------------------------- resuming


def test_resume_after_interruption_rewrites_only_what_is_missing(tmp_path, webvision_tree):
    args = ["webvision", "--src", webvision_tree.root, "--split", "train", "--resize-shorter", 40, "--shard-size", 3]
    ok(*args, "--out", tmp_path / "clean")
    clean = contents(tmp_path / "clean" / "train")
    n_shards = len([n for n in clean if n.endswith(".tar")])
    assert n_shards == 6 and "train.progress.json" in clean

    out = tmp_path / "out"
    split_dir = out / "train"
    ok(*args, "--out", out)
    # A run killed after shard 3: shards 4, 5 and the manifest never written, the progress
    # record lists shards 0-3, a half-written shard lies in the staging folder.
    progress = json.loads((split_dir / "train.progress.json").read_text())
    progress["shards"], progress["complete"] = progress["shards"][:4], False
    (split_dir / "train.progress.json").write_text(json.dumps(progress))
    for name in ("train-000004.tar", "train-000005.tar", "manifest.json"):
        (split_dir / name).unlink()
    (split_dir / ".staging-x").mkdir()
    (split_dir / ".staging-x" / "shard-000000.tar.tmp").write_bytes(b"partial")
    before = snapshot(split_dir)

    summary = ok(*args, "--out", out)["train"]
    assert (summary["shards_reused"], summary["shards_written"]) == (4, 2)
    after = snapshot(split_dir)
    for i in range(4):  # earlier shards not rewritten
        assert after[f"train-{i:06d}.tar"] == before[f"train-{i:06d}.tar"]
    assert contents(split_dir) == clean  # = an uninterrupted run, manifest and record included

    # A corrupted shard (same size, one byte flipped) and a lost manifest: only that shard is redone.
    data = bytearray((split_dir / "train-000002.tar").read_bytes())
    data[1000] ^= 0xFF
    (split_dir / "train-000002.tar").write_bytes(bytes(data))
    (split_dir / "manifest.json").unlink()
    before = snapshot(split_dir)
    summary = ok(*args, "--out", out)["train"]
    assert (summary["shards_reused"], summary["shards_written"]) == (5, 1)
    after = snapshot(split_dir)
    assert {n for n in before if after[n] != before[n]} == {"train-000002.tar", "train.progress.json"}
    assert contents(split_dir) == clean

    # A complete output: a rerun touches nothing, not even the manifest.
    before = snapshot(split_dir)
    assert ok(*args, "--out", out)["train"]["shards_written"] == 0
    assert snapshot(split_dir) == before

    # A different request is refused (naming what changed) and leaves everything alone...
    fails(*args[:-1], 4, "--out", out, needles=["--force", "shard_size: 3 -> 4"])
    fails(*args, "--classes", 5, "--out", out, needles=["--force", "classes: 50 -> 5"])
    assert snapshot(split_dir) == before
    # ... unless forced: rebuilt, stale shards gone.
    ok(*args[:-1], 4, "--out", out, "--force")
    manifest, _ = read_split(split_dir)
    assert len(manifest["shards"]) == 5


def test_corrupt_image_stops_then_skip_bad_resumes(tmp_path):
    labels = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    tree = make_webvision_tree(tmp_path / "src", labels, [0], num_synsets=8, odd=False, seed=3)
    bad_path = tree.train[7][0]
    truncate(tree.root / bad_path)
    args = ["webvision", "--src", tree.root, "--split", "train", "--classes", 5, "--shard-size", 3]

    out = tmp_path / "out"
    fails(*args, "--out", out, needles=[bad_path, "cannot decode", "truncated", "--skip-bad"])
    split_dir = out / "train"
    assert sorted(p.name for p in split_dir.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (split_dir / "manifest.json").exists()
    before = snapshot(split_dir)

    # Without --skip-bad nothing changes; with it, the run resumes after shard 1.
    summary = ok(*args, "--out", out, "--skip-bad")["train"]
    assert (summary["shards_reused"], summary["shards_written"], summary["skipped"]) == (2, 3, 1)
    after = snapshot(split_dir)
    assert all(after[n] == before[n] for n in ("train-000000.tar", "train-000001.tar"))
    ok(*args, "--out", tmp_path / "clean", "--skip-bad")
    assert contents(split_dir) == contents(tmp_path / "clean" / "train")

    manifest, samples = read_split(split_dir)
    assert manifest["skipped"]["count"] == 1
    (entry,) = manifest["skipped"]["samples"]
    assert entry["path"] == bad_path and entry["key"] == "train_000007" and "truncated" in entry["reason"]
    assert [k for k, _ in samples] == [f"train_{i:06d}" for i in range(14) if i != 7]  # no renumbering
    assert [int(f["cls"]) for _, f in samples] == [label for i, label in enumerate(labels) if i != 7]

    # A rerun without --skip-bad of an output holding skipped samples: the error lists them.
    fails(*args, "--out", out, needles=[bad_path, "--skip-bad"])


@pytest.mark.parametrize("damage", ["missing_file", "label_out_of_range", "duplicate_line", "malformed_line"])
def test_bad_listing_found_before_writing(tmp_path, damage):
    labels = [0, 1, 2, 3, 1, 0]
    tree = make_webvision_tree(tmp_path / "src", labels, [0], num_synsets=8, odd=False, seed=4)
    lines = [f"{path} {label}" for path, label in tree.train]
    victim = tree.train[2][0]
    expected_keys = list(range(6))
    if damage == "missing_file":
        (tree.root / victim).unlink()
        expected_keys.remove(2)
        needles = [victim, "missing file"]
    elif damage == "label_out_of_range":
        lines[2] = f"{victim} 8"  # 8 synsets: labels 0-7
        expected_keys = [0, 1, 2, 3, 4]  # the bad line gets no key
        needles = [victim, "label 8 out of range", "line 3"]
    elif damage == "duplicate_line":
        lines.insert(4, lines[2])
        expected_keys = [0, 1, 2, 3, 5, 6]
        needles = [victim, "duplicate", "line 3", "line 5"]
    else:
        lines.insert(1, "google/q0001/no_label.jpg")
        expected_keys = [0, 1, 2, 3, 4, 5]
        needles = ["train_filelist_google.txt line 2", "malformed"]
    write_filelist(tree, "train", lines)
    args = ["webvision", "--src", tree.root, "--split", "train", "--classes", 5, "--shard-size", 4]
    fails(*args, "--out", tmp_path / "out", needles=needles + ["--skip-bad"])
    assert not (tmp_path / "out").exists()  # stopped before writing anything

    ok(*args, "--out", tmp_path / "out", "--skip-bad")
    manifest, samples = read_split(tmp_path / "out" / "train")
    assert manifest["skipped"]["count"] == 1
    entry = manifest["skipped"]["samples"][0]
    assert (
        (victim in entry["path"])
        if damage != "malformed_line"
        else ("line 2" in entry["reason"] or ":2" in entry["path"])
    )
    assert [k for k, _ in samples] == [f"train_{i:06d}" for i in expected_keys]
    assert manifest["num_samples"] == len(expected_keys) == sum(manifest["class_counts"])


def test_option_errors(tmp_path, webvision_tree):
    src = webvision_tree.root
    fails("cifar10", "--src", tmp_path, "--out", tmp_path / "o", "--classes", 5, needles=["--classes"])
    fails("imagenet-val", "--src", tmp_path, "--out", tmp_path / "o", needles=["--webvision-info"])
    fails("webvision", "--src", src, "--out", tmp_path / "o", "--classes", 61, needles=["--classes 61", "60"])
    fails(
        "webvision", "--src", src, "--out", tmp_path / "o", "--storage-options", "{nope", needles=["--storage-options"]
    )
    fails("webvision", "--src", src, "--out", tmp_path / "o", "--split", "test", needles=["train, val"])
    fails(
        "webvision",
        "--src",
        tmp_path / "nothing",
        "--out",
        tmp_path / "o",
        needles=[str(tmp_path / "nothing" / "info" / "synsets.txt")],
    )
    (tmp_path / "no_images" / "info").mkdir(parents=True)
    (tmp_path / "no_images" / "info" / "synsets.txt").write_text("n01440764 tench, Tinca tinca\n")
    fails(
        "webvision",
        "--src",
        tmp_path / "no_images",
        "--out",
        tmp_path / "o",
        "--classes",
        1,
        needles=[str(tmp_path / "no_images" / "google")],
    )
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- S3


@pytest.mark.slow
def test_s3_output_and_rerun_skips_everything(tmp_path, webvision_tree, s3_server, monkeypatch):
    bucket = f"wv-{uuid.uuid4().hex[:12]}"
    fs = s3_server.fs()
    fs.mkdir(bucket)
    try:
        _check_s3_output(tmp_path, webvision_tree, s3_server, monkeypatch, fs, f"s3://{bucket}/webvision")
    finally:
        fs.rm(bucket, recursive=True)


def _check_s3_output(tmp_path, webvision_tree, s3_server, monkeypatch, fs, url):
    args = ["webvision", "--src", webvision_tree.root, "--resize-shorter", 40, "--shard-size", 5]
    # Endpoint and credentials from the standard AWS environment only.
    run_cli(*args, "--out", url, "--workers", 2, env=s3_server.env)
    ok(*args, "--out", tmp_path / "local")

    for split in ("train", "val"):
        manifest = json.loads(fs.cat_file(f"{url}/{split}/manifest.json"))
        local = contents(tmp_path / "local" / split)
        assert manifest == json.loads(local["manifest.json"])  # same manifest as a local run
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{url}/{split}", detail=False))
        assert names == sorted(local)  # shards, manifest, progress record; nothing else
        for info in manifest["shards"]:
            data = fs.cat_file(f"{url}/{split}/{info['name']}")
            assert (sha256(data), len(data)) == (info["sha256"], info["bytes"])
            assert data == local[info["name"]]

    # A rerun (endpoint from --storage-options this time) writes nothing.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    puts = []
    real_put, real_write = Location.put, Location.write_text
    monkeypatch.setattr(Location, "put", lambda self, f, name: (puts.append(name), real_put(self, f, name)))
    storage = ["--storage-options", json.dumps({"endpoint_url": s3_server.endpoint})]
    summary = ok(*args, "--out", url, *storage)
    assert puts == [] and all(s["shards_written"] == 0 for s in summary.values())

    # One shard lost: only it is uploaded again; the manifest is unchanged.
    manifest_before = fs.cat_file(f"{url}/train/manifest.json")
    fs.rm_file(f"{url}/train/train-000001.tar")
    writes = []
    monkeypatch.setattr(
        Location, "write_text", lambda self, name, text: (writes.append(name), real_write(self, name, text))
    )
    ok(*args, "--out", url, *storage, "--split", "train")
    assert puts == ["train-000001.tar"] and "manifest.json" not in writes
    assert fs.cat_file(f"{url}/train/train-000001.tar") == contents(tmp_path / "local" / "train")["train-000001.tar"]
    assert fs.cat_file(f"{url}/train/manifest.json") == manifest_before

"""Tests for tools/inject_noise.py and tools/verify_shards.py: real Fashion-MNIST shards,
real files, a real S3 server (moto) on loopback, the real CLIs.

What the tools wrote is read back independently: tar members with ``tarfile``, checksums
with ``hashlib``, noisy labels recomputed with ``apply_noise`` and through the training
loader's own load-time noise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nrd_dist.data.noise import apply_noise, noise_report
from nrd_dist.data.writer import ShardWriter, write_manifest
from nrd_dist.tools import inject_noise, make_shards, verify_shards

REPO = Path(__file__).resolve().parents[1]
SPEC = {"type": "symmetric", "rate": 0.4, "seed": 3}
SPEC_ARGS = ["--noise-type", "symmetric", "--noise-rate", "0.4", "--noise-seed", "3"]


# ----------------------------------------------------------------------------- helpers


def run_tool(tool: str, *args, env=None) -> subprocess.CompletedProcess:
    """``python tools/TOOL.py ARGS`` as a user runs it, from the repo root."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def call(tool, *args) -> int:
    return tool.main([*map(str, args), "--quiet"])


def members(path) -> list[tuple[str, bytes]]:
    """Every member of a tar, in order, as (name, bytes)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over the manifest's shards, in order."""
    out: dict[str, dict[str, bytes]] = {}
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        for name, data in members(folder / entry["name"]):
            key, ext = name.split(".", 1)
            out.setdefault(key, {})[ext] = data
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def train(tmp_path, fmnist_small) -> Path:
    """A private copy of the clean Fashion-MNIST train shards (3 shards, 107/107/106)."""
    return Path(shutil.copytree(fmnist_small["root"] / "train", tmp_path / "src"))


def png(index: int) -> bytes:
    image = Image.fromarray(np.full((8, 8), index * 9 % 256, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, shards: list[list[tuple[str, dict[str, bytes]]]], **manifest) -> Path:
    """Shards of the given (key, fields) samples with ShardWriter, and a manifest whose
    sha256/size/count entries are right."""
    folder.mkdir(parents=True)
    infos = []
    for index, shard in enumerate(shards):
        writer = ShardWriter(folder, f"tmp{index}", len(shard))
        for key, fields in shard:
            writer.write(key, fields)
        (info,) = writer.close()
        (folder / info.name).rename(folder / f"train-{index:06d}.tar")
        infos.append({**vars(info), "name": f"train-{index:06d}.tar"})
    write_manifest(folder, {"num_samples": sum(len(s) for s in shards), "num_classes": 10, "shards": infos, **manifest})
    return folder


# ----------------------------------------------------------------------------- inject_noise


def test_inject_symmetric_noise(train, tmp_path, capsys):
    before = file_bytes(train)
    out = tmp_path / "noisy"
    assert call(inject_noise, train, "--out", out, *SPEC_ARGS) == 0
    summary = json.loads(capsys.readouterr().out)
    assert file_bytes(train) == before, "the source was modified"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"train-00000{i}.tar" for i in range(3)]

    # Same members in the same order; images and clean labels byte for byte; .cls noisy.
    source, noisy = json.loads((train / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    keys, clean, labels = [], [], []
    for entry in source["shards"]:
        src_members, out_members = members(train / entry["name"]), members(out / entry["name"])
        assert [n for n, _ in src_members] == [n for n, _ in out_members]
        for (name, src_data), (_, out_data) in zip(src_members, out_members):
            if name.endswith(".cls") and not name.endswith(".clean.cls"):
                keys.append(name.split(".")[0])
                labels.append(int(out_data))
            else:
                assert out_data == src_data, name
                if name.endswith(".clean.cls"):
                    clean.append(int(src_data))
    clean, labels = np.array(clean), np.array(labels)
    assert len(keys) == 320
    np.testing.assert_array_equal(labels, apply_noise(keys, clean, SPEC, 10))

    # symmetric resamples over all 10 classes: the expected flip rate is 0.4 * 9/10
    realised = float(np.mean(labels != clean))
    expected = 0.4 * 9 / 10
    assert abs(realised - expected) < 4 * np.sqrt(expected * (1 - expected) / 320), realised
    assert noisy["noise_report"] == noise_report(clean, labels, 10)
    assert summary["realised_noise_rate"] == realised

    # The manifest: the source's, with new checksums, the spec and where it came from.
    assert noisy["noise"] == SPEC
    assert noisy["num_samples"] == 320 and noisy["num_classes"] == 10
    assert noisy["class_counts"] == np.bincount(clean, minlength=10).tolist()
    assert [(s["name"], s["count"]) for s in noisy["shards"]] == [(s["name"], s["count"]) for s in source["shards"]]
    for entry in noisy["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert (entry["sha256"], entry["bytes"]) == (sha256(data), len(data))
    derived = noisy["derived_from"]
    assert derived["url"] == str(train)
    assert derived["manifest_sha256"] == sha256((train / "manifest.json").read_bytes())
    assert derived["shards"] == [{"name": s["name"], "sha256": s["sha256"]} for s in source["shards"]]
    assert derived["clean_labels_from_cls"] == 0 and derived["noise"] is None

    # Deterministic: a second run elsewhere gives the same bytes.
    assert call(inject_noise, train, "--out", tmp_path / "again", *SPEC_ARGS) == 0
    assert file_bytes(tmp_path / "again") == file_bytes(out)

    # An existing OUT is refused without --force and left alone; with it, rewritten.
    written = file_bytes(out)
    capsys.readouterr()
    assert call(inject_noise, train, "--out", out, *SPEC_ARGS) == 2
    err = capsys.readouterr().err
    assert "already holds manifest.json" in err and "--force" in err
    assert file_bytes(out) == written
    (out / "train-000009.tar").write_bytes(b"stale")
    assert call(inject_noise, train, "--out", out, *SPEC_ARGS, "--force") == 0
    assert file_bytes(out) == written


def test_inject_refuses_bad_requests(train, tmp_path, capsys):
    before = file_bytes(train)
    assert call(inject_noise, train, "--out", train / ".." / "src", *SPEC_ARGS) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert call(inject_noise, train, "--out", tmp_path / "o", "--noise-type", "symmetric", "--noise-rate", "1.5") == 2
    assert "noise.rate" in capsys.readouterr().err
    assert call(inject_noise, tmp_path / "nowhere", "--out", tmp_path / "o", *SPEC_ARGS) == 2
    assert "no manifest" in capsys.readouterr().err
    assert file_bytes(train) == before and not (tmp_path / "o" / "manifest.json").exists()

    # A damaged source is not silently turned into a "verified" noisy copy.
    damaged = train / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert call(inject_noise, train, "--out", tmp_path / "o", *SPEC_ARGS) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "sha256" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")], "staging left behind"


def test_inject_agrees_with_load_time_noise(train, tmp_path):
    """The training loader's load-time noise over the clean shards gives the labels that
    inject_noise baked in; and load-time noise over the noisy shards changes nothing
    (it keys on .clean.cls)."""
    from nrd_dist.data.shards import ShardStream

    out = tmp_path / "noisy"
    assert call(inject_noise, train, "--out", out, *SPEC_ARGS) == 0

    def loader_labels(folder: Path, noise) -> dict[str, tuple[int, int]]:
        urls = [str(p) for p in sorted(folder.glob("*.tar"))]
        stream = ShardStream(urls, lambda image: image, num_classes=10, channels=1, train=False, noise=noise)
        return {s["key"]: (s["label"], s["clean_label"]) for s in stream}

    baked = {key: (int(f["cls"]), int(f["clean.cls"])) for key, f in samples(out).items()}
    assert loader_labels(train, SPEC) == baked
    assert loader_labels(out, None) == baked
    assert loader_labels(out, SPEC) == baked
    assert sum(label != clean for label, clean in baked.values()) > 80


def test_inject_matches_make_shards_byte_for_byte(tmp_path):
    """make_shards with --noise-* and make_shards clean + inject_noise give identical shards."""
    images = tmp_path / "images"
    for i in range(30):
        (images / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        (images / f"class{i % 3}" / f"{i:03d}.png").write_bytes(png(i))
    spec = ["--noise-type", "symmetric_exclusive", "--noise-rate", "0.5", "--noise-seed", "11"]
    common = ["folder", "--src", images, "--shard-size", 12, "--quiet"]
    assert call(make_shards, *common, "--out", tmp_path / "clean") == 0
    assert call(make_shards, *common, "--out", tmp_path / "baked", *spec) == 0
    assert call(inject_noise, tmp_path / "clean" / "train", "--out", tmp_path / "injected", *spec) == 0
    baked = json.loads((tmp_path / "baked" / "train" / "manifest.json").read_text())
    injected = json.loads((tmp_path / "injected" / "manifest.json").read_text())
    assert injected["shards"] == baked["shards"]  # names, counts, sha256, sizes
    assert injected["noise_report"] == baked["noise_report"] and injected["noise_report"]["realised_rate"] > 0
    for entry in baked["shards"]:
        assert (tmp_path / "injected" / entry["name"]).read_bytes() == (
            tmp_path / "baked" / "train" / entry["name"]
        ).read_bytes()


def test_inject_into_shards_without_clean_labels(tmp_path, capsys):
    """No .clean.cls: the .cls is the clean label, written as .clean.cls; the manifest says so."""
    fields = [(f"s_{i:03d}", {"png": png(i), "cls": str(i % 10).encode()}) for i in range(40)]
    src = write_shards(tmp_path / "src", [fields[:25], fields[25:]])
    out = tmp_path / "out"
    assert (
        call(
            inject_noise,
            src,
            "--out",
            out,
            "--noise-type",
            "asymmetric",
            "--noise-rate",
            "0.6",
            "--noise-map",
            "{0: 6, 2: 4}",
        )
        == 0
    )
    assert '"clean_labels_from_cls": 40' in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["derived_from"]["clean_labels_from_cls"] == 40
    assert manifest["noise"] == {"type": "asymmetric", "rate": 0.6, "seed": 0, "map": {"0": 6, "2": 4}}
    keys = [key for key, _ in fields]
    clean = np.arange(40) % 10
    noisy = apply_noise(keys, clean, {"type": "asymmetric", "rate": 0.6, "seed": 0, "map": {0: 6, 2: 4}}, 10)
    flipped = noisy != clean
    assert flipped.any() and set(clean[flipped]) <= {0, 2}
    for name in ("train-000000.tar", "train-000001.tar"):
        names = [n for n, _ in members(out / name)]
        assert names[:3] == [names[0], names[0].replace(".png", ".cls"), names[0].replace(".png", ".clean.cls")]
    got = samples(out)
    assert [int(got[k]["cls"]) for k in keys] == noisy.tolist()
    assert [got[k]["clean.cls"] for k in keys] == [f["cls"] for _, f in fields]
    assert [got[k]["png"] for k in keys] == [f["png"] for _, f in fields]


# ----------------------------------------------------------------------------- verify_shards


def _flip_byte(folder: Path) -> str:
    path = folder / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    return path.name


def _truncate(folder: Path) -> str:
    path = folder / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:100_000])
    return path.name


def _remove(folder: Path) -> str:
    (folder / "train-000000.tar").unlink()
    return "train-000000.tar"


def _extra(folder: Path) -> str:
    shutil.copy(folder / "train-000000.tar", folder / "train-000003.tar")
    return "train-000003.tar"


def _wrong_count(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["count"] = 106
    manifest["num_samples"] = 319
    write_manifest(folder, manifest)
    return "train-000001.tar"


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_flip_byte, ["sha256"]),
        (_truncate, ["bytes, the manifest says 358400", "samples, the manifest says 106"]),
        (_remove, ["missing"]),
        (_extra, ["extra tar file"]),
        (_wrong_count, ["holds 107 samples, the manifest says 106"]),
    ],
)
def test_verify_finds_damage(train, capsys, damage, expected):
    assert call(verify_shards, train) == 0
    assert capsys.readouterr().out == f"{train}: 3 shards, 320 samples: OK\n"
    name = damage(train)
    assert call(verify_shards, train) == 1
    lines = capsys.readouterr().out.splitlines()
    problems, summary = lines[:-1], lines[-1]
    assert problems and "problem" in summary, lines
    for needle in expected:
        assert any(line.startswith(f"{train / name}: ") and needle in line for line in problems), (needle, lines)


def test_verify_deep_checks_images_labels_and_keys(train, tmp_path, capsys):
    assert call(verify_shards, train, "--deep") == 0
    assert "(deep): OK" in capsys.readouterr().out
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["class_counts"] = [32] * 10
    write_manifest(train, manifest)
    assert call(verify_shards, train, "--deep") == 1
    assert "class_counts" in capsys.readouterr().out

    def sample(i, label=None, image=None):
        label = i % 10 if label is None else label
        return (f"s_{i:03d}", {"png": image or png(i), "cls": str(label).encode()})

    bad = write_shards(
        tmp_path / "bad",
        [
            [sample(0), sample(1, label=12), sample(2), sample(3, image=b"not an image")],
            [sample(4), sample(2, label=-1), sample(5)],
        ],
    )
    assert call(verify_shards, bad) == 0  # structurally sound: only --deep sees these
    capsys.readouterr()
    assert call(verify_shards, bad, "--deep") == 1
    lines = capsys.readouterr().out.splitlines()
    shard0, shard1 = bad / "train-000000.tar", bad / "train-000001.tar"
    assert any(line.startswith(f"{shard0}: sample 's_001': label 12 out of range [0, 10)") for line in lines), lines
    assert any(line.startswith(f"{shard1}: sample 's_002': duplicate key (also in {shard0})") for line in lines), lines
    assert any(line.startswith(f"{shard1}: sample 's_002': label -1 out of range") for line in lines), lines
    assert any(line.startswith(f"{shard0}: sample 's_003': .png cannot be decoded") for line in lines), lines
    assert lines[-1].endswith("(deep): 4 problems"), lines


def test_verify_without_a_manifest_is_an_error(tmp_path, capsys):
    assert call(verify_shards, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{tmp_path}/manifest.json: no manifest" in err


# ----------------------------------------------------------------------------- remote (S3)


@pytest.mark.slow
def test_s3_inject_and_verify(train, tmp_path, s3_server, capsys):
    bucket = f"inject-{uuid.uuid4().hex[:12]}"
    s3_server.upload(train, f"s3://{bucket}/fmnist/train")
    env = {**os.environ, **s3_server.env}
    secret = s3_server.storage_options["secret"]

    proc = run_tool(
        "inject_noise", f"s3://{bucket}/fmnist/train", "--out", f"s3://{bucket}/fmnist/noisy", *SPEC_ARGS, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    proc = run_tool("verify_shards", f"s3://{bucket}/fmnist/noisy", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.endswith(f"s3://{bucket}/fmnist/noisy: 3 shards, 320 samples: OK\n")
    assert secret not in proc.stdout + proc.stderr

    # Remote and local give the same shards; the manifest names the remote source.
    fs = s3_server.fs()
    remote = json.loads(fs.cat_file(f"{bucket}/fmnist/noisy/manifest.json"))
    assert call(inject_noise, train, "--out", tmp_path / "local", *SPEC_ARGS) == 0
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert remote["shards"] == local["shards"] and remote["noise_report"] == local["noise_report"]
    assert remote["derived_from"]["url"] == f"s3://{bucket}/fmnist/train"
    assert remote["derived_from"]["shards"] == local["derived_from"]["shards"]
    assert sorted(fs.ls(f"{bucket}/fmnist/noisy")) == sorted(
        f"{bucket}/fmnist/noisy/{n}" for n in ["manifest.json", *(s["name"] for s in local["shards"])]
    )

    # Refused without --force, remotely too.
    capsys.readouterr()
    assert call(inject_noise, f"s3://{bucket}/fmnist/train", "--out", f"s3://{bucket}/fmnist/noisy", *SPEC_ARGS) == 2
    assert "already holds manifest.json" in capsys.readouterr().err

    # One flipped byte on the server; found through the environment's credentials and
    # through --storage-options alike, naming the shard's URL.
    shard = f"{bucket}/fmnist/noisy/train-000001.tar"
    data = bytearray(fs.cat_file(shard))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".png")][50]
    data[image.offset_data + image.size // 2] ^= 0x01  # bit rot inside an image: only sha256 sees it
    fs.pipe_file(shard, bytes(data))
    assert call(verify_shards, f"s3://{bucket}/fmnist/noisy") == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"s3://{shard}: sha256 ") and lines[1].endswith(": 1 problem")
    # --deep also names the damaged sample
    assert (
        call(
            verify_shards,
            f"s3://{bucket}/fmnist/noisy",
            "--deep",
            "--storage-options",
            json.dumps(s3_server.storage_options),
        )
        == 1
    )
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"s3://{shard}: sample '{image.name.split('.')[0]}': .png cannot be decoded")
    assert lines[1].startswith(f"s3://{shard}: sha256 ") and lines[2].endswith("(deep): 2 problems")
    assert secret not in captured.out + captured.err


@pytest.mark.slow
def test_s3_secrets_never_printed(tmp_path, s3_server, capsys):
    secret = s3_server.storage_options["secret"]
    options = json.dumps(s3_server.storage_options)
    env = {**os.environ, **s3_server.env}

    # An unreachable folder whose URL contains the secret: a clean error, secret redacted.
    proc = run_tool(
        "verify_shards",
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/{secret}/train",
        "--storage-options",
        options,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: s3://no-such-bucket-") and "Traceback" not in proc.stderr
    assert secret not in proc.stdout + proc.stderr and "***" in proc.stderr

    # In-process, the same policy: bad JSON, an option s3fs rejects, a failed upload.
    bucket = f"secrets-{uuid.uuid4().hex[:12]}"
    assert call(verify_shards, f"s3://{bucket}/x", "--storage-options", options[:-1]) == 2
    assert (
        call(
            verify_shards,
            f"s3://{bucket}/x",
            "--storage-options",
            json.dumps({**s3_server.storage_options, "no_such_option": secret}),
        )
        == 2
    )
    src = write_shards(tmp_path / "src", [[("s_000", {"png": png(0), "cls": b"1"})]])
    assert (
        call(inject_noise, src, "--out", f"s3://{bucket}/missing-bucket/out", *SPEC_ARGS, "--storage-options", options)
        == 2
    )
    captured = capsys.readouterr()
    assert captured.err.count("error: ") == 3, captured.err
    assert secret not in captured.out + captured.err

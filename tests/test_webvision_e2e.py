"""End to end on a WebVision-shaped dataset: a fixture tree in WebVision 1.0's real
layout (and ILSVRC2012-val with the devkit) goes through tools/make_shards.py, then
configs/webvision_rn50.yaml trains ResNet-50 for a few steps on it (smaller images and
batch by override) and evaluates on both validation sets."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_train
from webvision_fixture import make_imagenet_val, make_webvision_tree


def make_shards(*args):
    proc = subprocess.run(
        [sys.executable, "tools/make_shards.py", *map(str, args), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_webvision_config_trains_on_sharded_fixture_and_evaluates_both_val_sets(tmp_path):
    classes = 5
    tree = make_webvision_tree(
        tmp_path / "webvision", [i % 8 for i in range(48)], [i % 8 for i in range(16)], sizes=(40, 90)
    )  # labels 5-7: classes outside --classes 5, dropped
    wnids = tree.wnids
    make_imagenet_val(tmp_path / "ilsvrc" / "val", [wnids[i % 10] for i in range(20)], wnids)
    data = tmp_path / "shards"
    make_shards(
        "webvision",
        "--src",
        tree.root,
        "--out",
        data / "webvision",
        "--classes",
        classes,
        "--resize-shorter",
        48,
        "--shard-size",
        10,
    )
    make_shards(
        "imagenet-val",
        "--src",
        tmp_path / "ilsvrc" / "val",
        "--out",
        data / "imagenet-val",
        "--webvision-info",
        tree.info,
        "--classes",
        classes,
        "--resize-shorter",
        48,
    )
    manifest = json.loads((data / "webvision" / "train" / "manifest.json").read_text())
    assert manifest["num_classes"] == classes and manifest["num_samples"] == 30  # 48 x 5/8

    out = tmp_path / "run"
    proc = run_train(
        [
            REPO / "configs" / "webvision_rn50.yaml",
            f"data.train={data}/webvision/train/train-*.tar",
            f"data.val.webvision={data}/webvision/val/val-*.tar",
            f"data.val.imagenet={data}/imagenet-val/val/val-*.tar",
            f"data.num_classes={classes}",
            f"run.output_dir={out}",
            "data.batch_size=4",
            "data.workers=1",
            "data.shuffle_buffer=16",
            "data.augment.image_size=32",
            "data.augment.resize_size=40",
            "optim.epochs=1",
            "eval.every_epochs=1",
            "log.every_steps=1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 // 4
    val = summary["val"]
    # every validation image of the 5 classes, counted once: 10 of 16 WebVision, 10 of 20 ImageNet
    assert set(val) == {"webvision", "imagenet"}
    for name in val:
        assert 0 <= val[name]["student"]["last_top1"] <= 100 and "teacher" in val[name]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval" in m]
    assert evals and {"webvision", "imagenet"} <= set(evals[-1]["eval"])
    assert evals[-1]["eval"]["webvision"]["student"]["count"] == 10
    assert evals[-1]["eval"]["imagenet"]["student"]["count"] == 10

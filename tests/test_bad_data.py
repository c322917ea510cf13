"""Bad training data under real 2-rank torchrun runs: skipped, counted and logged with
sample key and shard URL; the budget stops every rank at the same step (no rank left
waiting in a collective); a truncated shard read by one rank only never hangs the job."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO
from nrd_dist.data.writer import ShardWriter
from nrd_dist.testing.processes import free_port, read_tail

DEMO = REPO / "configs" / "fmnist_demo.yaml"


def copy_shards(fmnist_small, tmp_path) -> Path:
    train = tmp_path / "train"
    shutil.copytree(Path(fmnist_small["root"]) / "train", train)
    return train


def torchrun(tmp_path, train, out, *extra):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        free_port(),
        "-m",
        "nrd_dist.train",
        DEMO,
        f"data.train={train}/train-{{000000..000002}}.tar",
        f"run.output_dir={out}",
        "data.val={}",
        "data.batch_size=16",
        "data.workers=1",
        "optim.epochs=2",
        "eval.label_correction_samples=0",
        "checkpoint.every_steps=0",
        "log.every_steps=1",
        "engine.timeout_s=120",
        *extra,
    ]


@pytest.mark.slow
def test_a_truncated_shard_on_one_rank_is_reported_and_never_hangs(fmnist_small, tmp_path, processes):
    train = copy_shards(fmnist_small, tmp_path)
    shard = train / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # ~70 of its 107 samples lost
    out = tmp_path / "run"
    proc = processes.start(torchrun(tmp_path, train, out, "data.max_bad_fraction=0.2"), tmp_path / "log.txt")
    assert processes.wait_all(timeout=300) == [0], read_tail(proc.log_path)
    log = Path(proc.log_path).read_text()
    assert f"skipped truncated shard: - in {shard}" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (320 // 32)  # every step of both epochs, on both ranks
    assert summary["bad_data"]["bad"] >= 2  # read once per epoch, by whichever rank it was dealt to


@pytest.mark.slow
def test_corrupt_samples_beyond_the_budget_stop_every_rank_with_a_clear_message(fmnist_small, tmp_path, processes):
    train = copy_shards(fmnist_small, tmp_path)
    # Rewrite shard 0 with 20 of its images corrupted (their pixels' checksums fail).
    import webdataset as wds

    shard = train / "train-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    (tmp_path / "rewritten").mkdir()
    writer = ShardWriter(tmp_path / "rewritten", "train", 1000)
    for i, sample in enumerate(samples):
        image = bytearray(sample["png"])
        if i < 20:
            image[image.index(b"IDAT") + 12] ^= 0x01
        writer.write(sample["__key__"], {"png": bytes(image), "cls": sample["cls"], "clean.cls": sample["clean.cls"]})
    writer.close()
    shutil.copy(tmp_path / "rewritten" / "train-000000.tar", shard)
    out = tmp_path / "run"
    proc = processes.start(torchrun(tmp_path, train, out, "data.max_bad_fraction=0.01"), tmp_path / "log.txt")
    codes = processes.wait_all(timeout=300)
    log = Path(proc.log_path).read_text()
    assert codes[0] != 0, log[-3000:]
    assert "bad sample: sample 'train_000000' in " in log and "fails its CRC" in log
    # both ranks stop with the budget's message (same decision, same step): none hangs
    assert "error (rank 0): bad training data exceeded data.max_bad_fraction=0.01" in log
    assert "error (rank 1): bad training data exceeded data.max_bad_fraction=0.01" in log

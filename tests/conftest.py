"""Shared fixtures: small shard sets of real Fashion-MNIST images."""

import gzip
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nrd_dist.data.noise import noise_report
from nrd_dist.data.writer import ShardWriter, write_manifest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def read_fmnist(split: str, n: int, offset: int = 0):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8).astype(np.int64)
    return images[offset:offset + n], labels[offset:offset + n]


def write_split(out: Path, split: str, images, labels, per_shard: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, split, per_shard)
    keys = []
    for i, (image, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        keys.append(f"{split}_{i:06d}")
        writer.write(keys[-1], {"png": buf.getvalue(), "cls": str(int(label)).encode(),
                                "clean.cls": str(int(label)).encode()})
    shards = writer.close()
    write_manifest(out, {"dataset": "fashion-mnist", "split": split, "num_samples": len(keys),
                         "num_classes": 10, "shards": [vars(s) for s in shards],
                         "noise": None, "noise_report": noise_report(labels, labels, 10)})
    return out


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """Clean real Fashion-MNIST shards: train 3 shards (107 + 107 + 106 images, so they do
    not divide by 2 ranks x 2 workers), test 240 + 7 (does not divide by 2 ranks)."""
    root = tmp_path_factory.mktemp("fmnist_small")
    images, labels = read_fmnist("train", 320)
    write_split(root / "train", "train", images, labels, 107)
    images, labels = read_fmnist("test", 247)
    write_split(root / "test", "test", images, labels, 240)
    return {"root": root, "train": str(root / "train" / "train-{000000..000002}.tar"),
            "test": str(root / "test" / "test-{000000..000001}.tar"), "test_count": 247}


def run_train(args, cwd=REPO, timeout=600):
    """The real entry point in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "nrd_dist.train", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcessGroup:
    """Processes started in their own sessions, stopped (with all their children) by
    their own PIDs when the test ends, passed or failed."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, log_path, cwd=REPO, env=None):
        import os

        log = open(log_path, "w")
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        proc.log_path = log_path
        proc.log_file = log
        self.procs.append(proc)
        return proc

    def wait_all(self, timeout):
        import time

        deadline = time.time() + timeout
        for proc in self.procs:
            remaining = max(deadline - time.time(), 1)
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"timed out after {timeout}s: {proc.args}\n{read_tail(proc.log_path)}")
        return [p.returncode for p in self.procs]

    def stop(self):
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait()
            proc.log_file.close()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, found by PID: launchers start their
    workers in sessions of their own, so killing the launcher's group is not enough."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def read_tail(path, chars=4000):
    return Path(path).read_text(errors="replace")[-chars:]


@pytest.fixture
def processes():
    group = ProcessGroup()
    yield group
    group.stop()

"""Shared fixtures: small shard sets of real Fashion-MNIST images, process groups
stopped by PID, and a real S3 server (moto in server mode) on loopback
(nrd_dist/testing/s3_server.py, which benchmarks/streaming.py uses too); and
``load_benchmark`` for the tests of the benchmark scripts."""

import ast
import gzip
import importlib.util
import io
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nrd_dist.data.noise import noise_report
from nrd_dist.data.writer import ShardWriter, write_manifest
from nrd_dist.testing.processes import kill_tree, read_tail
from nrd_dist.testing.s3_server import S3Server

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/{name}.py`` as the module ``name``, without editing sys.path.

    benchmarks/ is a folder of scripts, not a package: run as a script, a benchmark finds
    its siblings (``from sweep_report import ...``) because Python puts the script's own
    folder first on sys.path. Here the file is loaded by path and registered in
    sys.modules under its name (dataclasses look their module up there), after the
    siblings it imports anywhere in the file, so that those imports find them there.
    A second call returns the module loaded by the first."""
    path = BENCHMARKS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != path:
            raise ImportError(f"cannot load {path}: the module name {name!r} is taken by {loaded!r}")
        return loaded
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported = [node.module]
        else:
            continue
        for sibling in imported:
            if sibling != name and (BENCHMARKS / f"{sibling}.py").is_file():
                load_benchmark(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def read_fmnist(split: str, n: int, offset: int = 0):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8).astype(np.int64)
    return images[offset : offset + n], labels[offset : offset + n]


def write_split(out: Path, split: str, images, labels, per_shard: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, split, per_shard)
    keys = []
    for i, (image, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        keys.append(f"{split}_{i:06d}")
        writer.write(
            keys[-1], {"png": buf.getvalue(), "cls": str(int(label)).encode(), "clean.cls": str(int(label)).encode()}
        )
    shards = writer.close()
    write_manifest(
        out,
        {
            "dataset": "fashion-mnist",
            "split": split,
            "num_samples": len(keys),
            "num_classes": 10,
            "shards": [vars(s) for s in shards],
            "noise": None,
            "noise_report": noise_report(labels, labels, 10),
        },
    )
    return out


@pytest.fixture(scope="session", autouse=True)
def temporary_folders(tmp_path_factory):
    """Every temporary folder of the session goes when it ends, passed or failed.

    * TMPDIR (for the processes the tests start) and ``tempfile.tempdir`` (for this one)
      point inside pytest's session folder: launchers and trainers that a test SIGKILLs
      cannot remove their own (torchrun's ``torchelastic_*``, multiprocessing's
      ``pymp-*``), and so does the inductor cache of the compiled tests.
    * This folder goes when the session ends; pytest's whole session folder then goes
      in ``pytest_sessionfinish`` below."""
    import os
    import shutil
    import tempfile

    path = tmp_path_factory.mktemp("tmp")
    # Inductor's cache is named explicitly: inductor fixes its folder in the environment
    # the first time it is asked, and a suite run was seen leaving one in /tmp (so later
    # runs on that machine compiled warm, unlike CI's).
    redirected = {"TMPDIR": str(path), "TORCHINDUCTOR_CACHE_DIR": str(path / "torchinductor")}
    saved = {name: os.environ.get(name) for name in redirected}, tempfile.tempdir
    os.environ.update(redirected)
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        for name, value in saved[0].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = saved[1]
        shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session):
    """pytest's session folder is removed at the end, passed or failed, unless
    ``--basetemp`` named it. Under pytest-xdist (``make test``) the controller names each
    worker's folder inside its own with ``--basetemp``, so the controller removes them all.
    (pytest's retention policy "none" would remove it as well, but it also drops the lock
    that stops a concurrent session, e.g. another worktree's ``make test``, from deleting
    this session's folders while it runs.)"""
    import shutil

    config = session.config
    if hasattr(config, "workerinput") or config.option.basetemp is not None:
        return  # an xdist worker (its controller removes the folder) or a folder the user named
    factory = getattr(config, "_tmp_path_factory", None)  # pytest's own, as the fixture returns it
    if factory is not None:
        shutil.rmtree(factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """Clean real Fashion-MNIST shards: train 3 shards (107 + 107 + 106 images, so they do
    not divide by 2 ranks x 2 workers), test 240 + 7 (does not divide by 2 ranks)."""
    root = tmp_path_factory.mktemp("fmnist_small")
    images, labels = read_fmnist("train", 320)
    write_split(root / "train", "train", images, labels, 107)
    images, labels = read_fmnist("test", 247)
    write_split(root / "test", "test", images, labels, 240)
    return {
        "root": root,
        "train": str(root / "train" / "train-{000000..000002}.tar"),
        "test": str(root / "test" / "test-{000000..000001}.tar"),
        "test_count": 247,
    }


@pytest.fixture(scope="session")
def nrd_run(fmnist_small, tmp_path_factory):
    """A 2-epoch NRD run (40% symmetric load-time noise) with a teacher, trained by the
    real entry point: what the diagnostics tools and the sweep's ``diagnose`` read."""
    out = tmp_path_factory.mktemp("diagnostics") / "run"
    proc = run_train(
        [
            REPO / "configs" / "fmnist_demo.yaml",
            f"data.train={fmnist_small['train']}",
            f"data.val.fmnist_test={fmnist_small['test']}",
            f"run.output_dir={out}",
            "data.noise.rate=0.4",
            "optim.epochs=2",
            "data.batch_size=32",
            "data.workers=1",
            "eval.label_correction_samples=0",
            "eval.every_epochs=2",
            "checkpoint.every_steps=1000",
            "log.every_steps=10",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_train(args, cwd=REPO, timeout=600):
    """The real entry point in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "nrd_dist.train", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ProcessGroup:
    """Processes started in their own sessions, stopped (with all their children) by
    their own PIDs when the test ends, passed or failed."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, log_path, cwd=REPO, env=None):
        import os

        log = open(log_path, "w")
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
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
            except subprocess.TimeoutExpired as err:
                self.stop()
                raise AssertionError(f"timed out after {timeout}s: {proc.args}\n{read_tail(proc.log_path)}") from err
        return [p.returncode for p in self.procs]

    def stop(self):
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait()
            proc.log_file.close()


@pytest.fixture
def processes():
    group = ProcessGroup()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server on a free loopback port for the whole session; tests
    use buckets of their own. Credentials for this process come from the environment,
    as users' would."""
    import os

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log").start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

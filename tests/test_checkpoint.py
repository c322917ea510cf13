"""Checkpoints: atomic writes, exact resume after a real SIGKILL, config checks,
non-finite handling.

Tests that share a trained fixture, or belong together, are classes: `make test`
(pytest-xdist `--dist loadscope`) runs each class, and the module's remaining
functions, in one worker, so the launches spread over both workers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_train
from nrd_dist.testing.processes import free_port, kill_tree, read_tail

DEMO = REPO / "configs" / "fmnist_demo.yaml"


def args(fmnist_small, out, *extra):
    return [
        DEMO,
        f"data.train={fmnist_small['train']}",
        f"data.val.fmnist_test={fmnist_small['test']}",
        f"run.output_dir={out}",
        "data.batch_size=32",
        "data.workers=1",
        "optim.epochs=2",
        "eval.label_correction_samples=0",
        "checkpoint.every_steps=3",
        "checkpoint.keep=3",
        "log.every_steps=1",
        *extra,
    ]


def final_state(out):
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / latest / "shared.pt", map_location="cpu", weights_only=True)


def last_step(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


ENGINES = {"ddp": [], "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"]}


@pytest.fixture(scope="module")
def uninterrupted(fmnist_small, tmp_path_factory):
    """``uninterrupted(engine)``: the run folder of one uninterrupted two-epoch run per
    engine, trained on first use and shared by the tests that compare against it (the
    killed-and-resumed run) or only need a finished run (export, resume checks)."""
    runs = {}

    def run(engine: str):
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{engine}")
            proc = run_train(args(fmnist_small, out, *ENGINES[engine]))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[engine] = out
        return runs[engine]

    return run


class TestResumeMatchesAnUninterruptedRun:
    """Checked against one uninterrupted two-epoch run per engine (`uninterrupted`)."""

    @pytest.mark.slow
    @pytest.mark.parametrize("engine", list(ENGINES))
    def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(
        self, fmnist_small, tmp_path, processes, engine, uninterrupted
    ):
        from nrd_dist.tools.export_model import export_state

        reference = uninterrupted(engine)
        engine = ENGINES[engine]
        out = tmp_path / "killed"
        victim = processes.start(
            [sys.executable, "-m", "nrd_dist.train", *args(fmnist_small, out, *engine)], tmp_path / "a.log"
        )
        deadline = time.time() + 240
        while last_step(out) < 8 and victim.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert victim.poll() is None, "the run ended before it could be killed"
        os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its DataLoader worker, mid-epoch
        victim.wait()
        killed_at = last_step(out)
        assert 8 <= killed_at < 10  # inside epoch 0 (10 steps per epoch), after the step-6 checkpoint

        proc = run_train(args(fmnist_small, out, *engine))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout and "at step 6 (epoch 0, batch 6" in proc.stdout
        assert final_state(reference)["step"] == final_state(out)["step"] == 20
        for which in ("student", "teacher"):  # consolidated from ZeRO-3 shards where needed
            a, b = export_state(reference, which), export_state(out, which)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"{which} {k}"
        # metrics.jsonl holds each step once: the redone steps replaced the lost ones
        steps = [
            json.loads(line)["step"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 20
        assert len(list((out / "checkpoints").glob("step_*"))) == 3  # checkpoint.keep

    @pytest.mark.slow
    def test_changed_config_refuses_to_resume_unless_forced(self, fmnist_small, tmp_path, uninterrupted):
        out = tmp_path / "run"
        shutil.copytree(uninterrupted("ddp"), out)  # a finished two-epoch run, written to `out`
        proc = run_train(args(fmnist_small, out, "optim.epochs=3", "loss.name=ce", "data.noise.rate=0.2"))
        assert proc.returncode != 0
        assert "checkpoint.resume" in proc.stderr
        assert "loss.name: checkpoint 'nrd' -> now 'ce'" in proc.stderr
        assert "data.noise.rate: checkpoint 0.4 -> now 0.2" in proc.stderr
        proc = run_train(args(fmnist_small, out, "optim.epochs=3"))  # only the length changed: resumes
        assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]
        assert final_state(out)["step"] == 30

    @pytest.mark.slow
    @pytest.mark.parametrize("engine", list(ENGINES))
    def test_export_model_loads_into_the_bare_model_and_reproduces_the_run(
        self, fmnist_small, tmp_path, engine, uninterrupted
    ):
        from nrd_dist.data.augment import build_policy
        from nrd_dist.data.shards import ShardStream, expand_urls, make_loader
        from nrd_dist.models import build_model

        out = uninterrupted(engine)
        summary = json.loads((out / "summary.json").read_text())
        stream = ShardStream(
            expand_urls(fmnist_small["test"]), build_policy("fmnist").eval, 10, channels=1, train=False
        )
        images, labels = zip(*[(b["image"], b["label"]) for b in make_loader(stream, 64, 0, drop_last=False)])
        images, labels = torch.cat(images), torch.cat(labels)
        for which in ("student", "teacher"):
            exported = tmp_path / f"{which}.pt"
            proc = subprocess.run(
                [sys.executable, "tools/export_model.py", out, "--which", which, "--out", exported],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            model = build_model("small_cnn", 10, 1)
            model.load_state_dict(torch.load(exported, weights_only=True))  # strict: every key, nothing else
            model.eval()
            with torch.no_grad():
                top1 = 100.0 * int((model(images).argmax(1) == labels).sum()) / len(labels)  # exact, in float64
            assert top1 == pytest.approx(summary["val"]["fmnist_test"][which]["last_top1"], abs=1e-6)


@pytest.mark.slow
def test_killed_while_writing_leaves_the_previous_checkpoint(fmnist_small, tmp_path):
    """A real SIGKILL in the middle of writing the second checkpoint's shared.pt."""
    out = tmp_path / "run"
    script = f"""
import os, signal, sys
import torch
import nrd_dist.checkpoint as ckpt
real_save = torch.save
count = {{"n": 0}}
def dying_save(obj, path, *a, **k):
    if str(path).endswith("shared.pt.tmp"):
        count["n"] += 1
        if count["n"] == 2:  # the second checkpoint: write half a file, then die
            with open(path, "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
torch.save = dying_save
from nrd_dist.train import main
sys.exit(main({[str(a) for a in args(fmnist_small, out, "optim.epochs=1")]!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000000003"
    assert list(root.glob("step_000000006.tmp"))  # the half-written one, never renamed
    proc = run_train(args(fmnist_small, out, "optim.epochs=1"))  # checkpoints at steps 3 and 6 of 10
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3 (epoch 0, batch 3" in proc.stdout
    assert not list(root.glob("*.tmp"))  # cleaned up


def test_checkpointer_saves_and_restores_explicit_state(tmp_path):
    """In one process: the train state, the named components, the engine's part and the
    RNG go into the layout tools and older runs read (shared.pt keys), and come back."""
    import random

    from nrd_dist.checkpoint import Checkpointer
    from nrd_dist.config import load_config
    from nrd_dist.engines import LocalEngine
    from nrd_dist.models import build_model
    from nrd_dist.train_state import TrainState

    cfg = load_config(DEMO, [f"run.output_dir={tmp_path}"])

    def build():
        torch.manual_seed(0)
        engine = LocalEngine(cfg)
        model = engine.prepare_module(build_model("mlp", 10, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine.setup(model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        return engine, scheduler

    engine, scheduler = build()
    engine.step(engine.model(torch.rand(4, 1, 28, 28)).sum(), scheduler)
    state = TrainState(step=7, epoch=1, batches_in_epoch=3, history={"val/student": [(1, 42.5)]}, nonfinite_skipped=2)
    path = Checkpointer(cfg, engine, state, {"teacher": None, "scheduler": scheduler}).save()
    draws = (random.random(), torch.rand(3))  # what the restored RNGs must draw again
    shared = torch.load(path / "shared.pt", weights_only=True)
    assert set(shared) == {
        "step",
        "epoch",
        "batches_in_epoch",
        "history",
        "nonfinite_skipped",
        "world_size",
        "fingerprint",
        "teacher",
        "scheduler",
        "scaler",
        "student",
        "optimizer",
    }
    assert (path / "rank0.pt").exists() and (path / "COMPLETE").exists()

    fresh_engine, fresh_scheduler = build()
    fresh = TrainState()
    resumed = Checkpointer(cfg, fresh_engine, fresh, {"teacher": None, "scheduler": fresh_scheduler}).resume()
    assert resumed.path == path and resumed.written_by == 1
    assert fresh == state
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    for a, b in zip(fresh_engine.module.parameters(), engine.module.parameters()):
        assert torch.equal(a, b)
    assert str(fresh_engine.optimizer.state_dict()) == str(engine.optimizer.state_dict())
    assert random.random() == draws[0] and torch.equal(torch.rand(3), draws[1])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_policy(fmnist_small, tmp_path, policy):
    out = tmp_path / policy
    # an absurd learning rate overflows the weights within a few steps
    # (skip: no step checkpoints, so the run meets the non-finite losses, not the
    # checkpoint's own refusal to write non-finite weights)
    every = 1 if policy == "stop" else 0
    proc = run_train(
        args(
            fmnist_small,
            out,
            "optim.lr=1e30",
            "loss.name=ce",
            f"train.nonfinite={policy}",
            "train.nonfinite_budget=2",
            f"checkpoint.every_steps={every}",
        )
    )
    assert proc.returncode == 1
    if policy == "stop":  # either the loss or, first, the checkpoint's weight check stops it
        assert (
            "train.nonfinite=stop" in proc.stderr and "batch sample keys ['train_" in proc.stderr
        ) or "the weights are not finite; no checkpoint written" in proc.stderr, proc.stderr[-2000:]
    else:
        assert "exceeded train.nonfinite_budget=2" in proc.stderr
        assert "skipped non-finite loss" in proc.stdout
    latest = out / "checkpoints" / "latest"
    if latest.exists():  # whatever was written holds finite weights only
        state = final_state(out)
        assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


@pytest.mark.slow
def test_export_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/export_model.py", tmp_path, "--out", tmp_path / "x.pt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr
    (tmp_path / "checkpoints" / "step_000010").mkdir(parents=True)  # a save cut short: no COMPLETE marker
    proc = subprocess.run(
        [sys.executable, "tools/export_model.py", tmp_path, "--out", tmp_path / "x.pt", "--checkpoint", "step_000010"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "step_000010: incomplete checkpoint" in proc.stderr
    half_renamed = tmp_path / "checkpoints" / "step_000000020.tmp"  # COMPLETE written, rename not yet done
    half_renamed.mkdir()
    (half_renamed / "COMPLETE").write_text("step_000000020\n")
    proc = subprocess.run(
        [
            sys.executable,
            "tools/export_model.py",
            tmp_path,
            "--out",
            tmp_path / "x.pt",
            "--checkpoint",
            half_renamed.name,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "step_000000020.tmp: incomplete checkpoint" in proc.stderr


class TestLaunchersRecoverFromALostWorker:
    """torchrun restarts a killed rank; an elastic job shrinks when a node leaves."""

    @pytest.mark.slow
    def test_torchrun_restarts_a_killed_worker_and_the_result_is_bitwise_identical(
        self, fmnist_small, tmp_path, processes
    ):
        """torchrun --max-restarts 2 with 2 ranks; one rank is SIGKILLed mid-epoch; the group
        restarts, resumes from the latest checkpoint and ends bitwise where an uninterrupted
        run ends."""
        import psutil

        def torchrun(port, restarts, out):
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--max-restarts",
                restarts,
                "-m",
                "nrd_dist.train",
                *[str(a) for a in args(fmnist_small, out, "data.batch_size=8")],
            ]

        reference = tmp_path / "uninterrupted"
        ref = processes.start(torchrun(free_port(), "0", reference), tmp_path / "ref.log")
        assert processes.wait_all(timeout=400) == [0], read_tail(ref.log_path)

        out = tmp_path / "killed"
        agent = processes.start(torchrun(free_port(), "2", out), tmp_path / "agent.log")
        deadline = time.time() + 300
        while last_step(out) < 7 and agent.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        workers = [p for p in psutil.Process(agent.pid).children() if "nrd_dist.train" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        killed_at = last_step(out)
        workers[1].send_signal(signal.SIGKILL)  # one rank dies mid-epoch (20 steps per epoch)
        assert 7 <= killed_at < 20
        assert processes.wait_all(timeout=400) == [0, 0], read_tail(agent.log_path)
        log = (tmp_path / "agent.log").read_text()
        assert "resumed from" in log  # the restarted group continued from the latest checkpoint
        a, b = final_state(reference), final_state(out)
        assert a["step"] == b["step"] == 40
        for k in a["student"]:
            assert torch.equal(a["student"][k], b["student"][k]), f"student {k}"
        for k in a["teacher"]["model"]:
            assert torch.equal(a["teacher"]["model"][k], b["teacher"]["model"][k]), f"teacher {k}"

    @pytest.mark.slow
    @pytest.mark.parametrize("engine", list(ENGINES))  # ZeRO-1/2 shrinking: test_zero_state_moves_...
    def test_elastic_survivor_continues_at_the_smaller_world_size(self, fmnist_small, tmp_path, processes, engine):
        """torchrun --nnodes 1:2: two agents form the job; one agent (and its worker) is
        killed; the survivor re-forms the job alone and finishes from the last checkpoint
        (under ZeRO from its world-size-independent copy)."""
        port = free_port()
        out = tmp_path / "run"
        agents = []
        for node in (0, 1):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "1:2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "elastic-test",
                "--rdzv-conf",
                "last_call_timeout=3",
                "--max-restarts",
                "3",
                "-m",
                "nrd_dist.train",
                *[str(a) for a in args(fmnist_small, out, "data.batch_size=8", *ENGINES[engine])],
            ]
            agents.append(processes.start(cmd, tmp_path / f"agent{node}.log"))
        deadline = time.time() + 300
        while last_step(out) < 10 and all(a.poll() is None for a in agents) and time.time() < deadline:
            time.sleep(0.02)
        # The rendezvous store lives in whichever agent bound the endpoint first (on a
        # cluster: the endpoint host, which stays); the node that leaves is the other one.
        import psutil

        def hosts_store(agent):
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in psutil.Process(agent.pid).net_connections(kind="tcp")
            )

        survivor, leaving = (0, 1) if hosts_store(agents[0]) else (1, 0)
        kill_tree(agents[leaving].pid)  # that node leaves: its agent and its worker die
        killed_at = last_step(out)
        assert 10 <= killed_at < 40, "the node must leave mid-run (20 steps per epoch, 2 epochs)"
        agents[leaving].wait()
        assert processes.wait_all(timeout=400)[survivor] == 0, read_tail(agents[survivor].log_path)
        log = (tmp_path / f"agent{survivor}.log").read_text()
        both = log + (tmp_path / f"agent{leaving}.log").read_text()
        assert "world size 2" in both  # logged by rank 0 of the 2-node job, on either node
        assert "world size 1" in log  # the survivor alone
        assert "it was written by 2 ranks" in log  # resumed at the smaller world size
        summary = json.loads((out / "summary.json").read_text())
        assert summary["val"]["fmnist_test"]["student"]["last_top1"] > 0
        assert final_state(out)["world_size"] == 1


ZERO_MOVES = [(1, 2, 1), (2, 2, 1), (2, 2, 3), (3, 2, 3)]  # (stage, saved by, loaded by) ranks


@pytest.fixture(scope="module")
def zero_moves(tmp_path_factory):
    """The states of ZERO_MOVES, written and loaded by real torchrun launches: one launch
    per world size, each running all of its stages (a DeepSpeed start costs ~10 s here)."""
    from conftest import ProcessGroup

    out = tmp_path_factory.mktemp("zero_moves")
    launches = [("save", 2, sorted({stage for stage, by, _ in ZERO_MOVES if by == 2}))]
    launches += [
        ("load", ranks, sorted({stage for stage, _, by in ZERO_MOVES if by == ranks}))
        for ranks in sorted({by for _, _, by in ZERO_MOVES})
    ]
    processes = ProcessGroup()
    try:
        for mode, ranks, stages in launches:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(ranks),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                free_port(),
                "tests/dist/zero_portable.py",
                mode,
                out,
                *stages,
            ]
            proc = processes.start(cmd, out / f"{mode}-{ranks}.log")
            assert processes.wait_all(timeout=300)[-1] == 0, read_tail(proc.log_path)
    finally:
        processes.stop()
    return out


class TestZeroStateAcrossWorldSizes:
    """ZeRO optimizer state saved by one number of ranks and loaded by another."""

    @pytest.mark.slow
    @pytest.mark.parametrize("stage,saved_by,loaded_by", ZERO_MOVES)
    def test_zero_state_moves_to_another_world_size_exactly(self, zero_moves, stage, saved_by, loaded_by):
        """ZeRO partitions written by one number of ranks, loaded by another (3 ranks: the
        parameters' sizes are not multiples of 3, so the last partition is padded). The
        loaded weights and momentum round-trip exactly, and the next step equals plain torch
        SGD from the same weights and momentum on the same global batch."""
        from nrd_dist.models import build_model

        out = zero_moves / f"stage{stage}"
        saved = torch.load(out / "portable.pt", weights_only=True)
        loaded = torch.load(out / f"after_load_{loaded_by}.pt", weights_only=True)
        momentum = saved["optimizer_state"]["momentum_buffer"]
        assert set(momentum) == set(saved["params"]) and all(m.abs().sum() > 0 for m in momentum.values())
        for name in saved["params"]:
            assert torch.equal(loaded["round_trip"]["params"][name], saved["params"][name]), name
            assert torch.equal(loaded["round_trip"]["optimizer_state"]["momentum_buffer"][name], momentum[name]), name

        model = build_model("mlp", 10, 1)
        model.load_state_dict({**saved["params"], **saved["buffers"]})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        for name, param in model.named_parameters():
            optimizer.state[param]["momentum_buffer"] = momentum[name].clone()
        x, y = torch.load(out / "batch.pt", weights_only=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after = loaded["after_step"]
        for name, param in model.named_parameters():
            assert (param.detach() - saved["params"][name]).abs().max() > 1e-4, "the step must move the weights"
            # equal up to the order of the gradient reduction over the ranks (measured <= 3e-8)
            assert torch.allclose(param.detach(), after["params"][name], rtol=0, atol=1e-6), name
            assert torch.allclose(
                optimizer.state[param]["momentum_buffer"],
                after["optimizer_state"]["momentum_buffer"][name],
                rtol=0,
                atol=1e-6,
            ), name

    @pytest.mark.slow
    def test_zero_checkpoint_without_portable_copy_names_the_world_sizes(self, fmnist_small, tmp_path, processes):
        out = tmp_path / "run"
        zero = ["engine.backend=deepspeed", "engine.zero_stage=1", "checkpoint.zero_portable=false", "optim.epochs=1"]
        cmd = [
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
            *map(str, args(fmnist_small, out, *zero)),
        ]
        proc = processes.start(cmd, tmp_path / "two.log")
        assert processes.wait_all(timeout=300) == [0], read_tail(proc.log_path)
        latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
        assert (latest / "deepspeed").is_dir() and not (latest / "zero_portable.pt").exists()
        one = run_train(args(fmnist_small, out, *zero[:-1], "optim.epochs=2"))
        assert one.returncode != 0
        assert "ZeRO-1 optimizer partitions of 2 ranks" in one.stderr and "not 1" in one.stderr, one.stderr[-2000:]
        assert "checkpoint.zero_portable" in one.stderr

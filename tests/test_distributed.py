"""Real multi-process runs: torchrun (gloo) and the DeepSpeed launcher, on this machine.

Every launch is a real process group of 2 ranks over loopback; nothing is mocked.
"""

import json
import sys

import pytest

from conftest import REPO
from nrd_dist.testing.processes import free_port, read_tail

ENGINES = {
    "ddp": ["engine.backend=ddp"],
    # DDP with engine.compile (real inductor in both ranks): what a GPU cluster run would
    # use; compared with the same eager 1-process curve as the others
    "ddp_compiled": ["engine.backend=ddp", "engine.compile=true"],
    "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def single_process_curve(tmp_path_factory):
    """The 1-process reference: same global batch, seed and data."""
    import subprocess

    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run(
        [sys.executable, "tests/dist/engine_steps.py", out, "engine.backend=ddp"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


class TestTwoRanksMatchOneProcess:
    """Each engine's two-rank run against the same one-process curve (`single_process_curve`)."""

    @pytest.mark.slow
    @pytest.mark.parametrize("engine", list(ENGINES))
    def test_two_ranks_match_one_and_keep_the_teacher_in_sync(self, engine, single_process_curve, tmp_path, processes):
        out = tmp_path / "out"
        cmd = TORCHRUN + [
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            free_port(),
            "tests/dist/engine_steps.py",
            out,
            *ENGINES[engine],
        ]
        proc = processes.start(cmd, tmp_path / "log.txt")
        assert processes.wait_all(timeout=300) == [0], read_tail(proc.log_path)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        for arch in ("mlp", "small_cnn"):
            r0, r1 = ranks[0][arch], ranks[1][arch]
            # student, teacher and loss compiled (nn.Module.compile) exactly when asked
            assert r0["compiled"] == r1["compiled"] == [engine == "ddp_compiled"] * 3
            # the teacher: an EMA of the gathered student weights of every step, to 1e-6 ...
            assert r0["teacher_max_diff"] < 1e-6 and r1["teacher_max_diff"] < 1e-6
            # ... and bitwise identical on both ranks
            assert r0["checksum"] == r1["checksum"]
            # a teacher perturbed on rank 1 stops the run with a message naming the ranks
            if arch == "small_cnn" or engine != "zero3":
                assert r0["divergence_detected"] and "rank 1 differs from rank 0" in r0["divergence_detected"]
        # equivalence with one process on the same global batch (mlp: no BatchNorm, so the
        # split cannot matter); measured differences are ~1e-7 (reduction order)
        for step, (two, one) in enumerate(zip(ranks[0]["mlp"]["losses"], single_process_curve["mlp"]["losses"])):
            assert two == pytest.approx(one, abs=1e-5), f"step {step}"


def demo_args(fmnist_small, out, *extra):
    return [
        "configs/fmnist_demo.yaml",
        f"data.train={fmnist_small['train']}",
        f"data.val.fmnist_test={fmnist_small['test']}",
        f"run.output_dir={out}",
        "data.batch_size=32",
        "data.workers=1",
        "optim.epochs=2",
        "eval.label_correction_samples=64",
        "log.every_steps=2",
        *extra,
    ]


def check_run(out, fmnist_small, world_size, steps_per_epoch):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * steps_per_epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 2
    for r in evals:  # exact evaluation: every val sample counted once over the ranks
        for model in ("student", "teacher"):
            assert r["eval"]["fmnist_test"][model]["count"] == fmnist_small["test_count"]
    assert summary["label_correction"]["counts"]["clean"] + summary["label_correction"]["counts"]["mislabeled"] == 64
    return summary


@pytest.mark.slow
def test_two_torchrun_agents_train_the_demo(fmnist_small, tmp_path, processes):
    """Two torchrun agents (two 'nodes') meet at a c10d rendezvous on loopback, each
    started by launchers/torchrun_multinode.sh as on a real cluster. 3 training shards
    over 2 ranks x 2 workers: no hang, the same number of steps on both ranks."""
    port = free_port()
    out = tmp_path / "run"
    env = {
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "RDZV_ID": "nrd-test",
        "MAX_RESTARTS": "0",
        "PYTHON": sys.executable,
        "CONFIG": "configs/fmnist_demo.yaml",
    }
    for node in (0, 1):
        cmd = ["bash", "launchers/torchrun_multinode.sh", *demo_args(fmnist_small, out, "data.workers=2")[1:]]
        processes.start(cmd, tmp_path / f"agent{node}.log", env=env)
    codes = processes.wait_all(timeout=420)
    logs = "\n".join(read_tail(tmp_path / f"agent{n}.log") for n in (0, 1))
    assert codes == [0, 0], logs
    assert "world size 2" in logs
    check_run(out, fmnist_small, 2, 320 // (32 * 2))


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes(fmnist_small, tmp_path, processes, monkeypatch):
    """The DeepSpeed launcher, two 'nodes' on this machine (--no_ssh with --node_rank),
    each started by launchers/deepspeed_launch.sh with its NODE_RANK and the script's
    default ZERO_STAGE (2; the other stages under the launcher's engine: the two_ranks
    tests, and ZeRO-3 end to end in test_checkpoint.py)."""
    monkeypatch.delenv("ZERO_STAGE", raising=False)
    stage = 2
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    out = tmp_path / "run"
    for node in (0, 1):
        env = {
            "HOSTFILE": str(hostfile),
            "NODE_RANK": str(node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "CONFIG": "configs/fmnist_demo.yaml",
            "DEEPSPEED": str(REPO / ".venv" / "bin" / "deepspeed"),
        }
        cmd = ["bash", "launchers/deepspeed_launch.sh", *demo_args(fmnist_small, out)[1:]]
        processes.start(cmd, tmp_path / f"node{node}.log", env=env)
    codes = processes.wait_all(timeout=420)
    logs = "\n".join(read_tail(tmp_path / f"node{n}.log") for n in (0, 1))
    assert codes == [0, 0], logs
    assert "world size 2" in logs
    summary = check_run(out, fmnist_small, 2, 320 // (32 * 2))
    assert (out / "config.yaml").read_text().count(f"zero_stage: {stage}") == 1
    assert summary["steps"] > 0
    # on CPU DeepSpeed's shared-memory kernels (inference only) are not JIT-compiled, and
    # torch's deprecation of the collectives ZeRO calls is not repeated at every step
    full_logs = "".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert "world size 2" in full_logs and "deepspeed_shm_comm" not in full_logs
    assert "all_gather_into_tensor` is deprecated" not in full_logs
    assert "reduce_scatter_tensor` is deprecated" not in full_logs


@pytest.mark.slow
def test_deepspeed_gradient_accumulation_equals_the_full_batch(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "tests/dist/grad_accum.py"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["max_diff"] < 1e-6  # 2 micro-batches of 4 == one batch of 8
    assert result["scheduler_steps"] == 1 and result["lr"] == pytest.approx(0.05)  # one optimizer step

"""The train entry point end to end on real Fashion-MNIST images, and its parts."""

import json
import math

import pytest
import torch
import yaml

from conftest import REPO, run_train
from nrd_dist.config import OptimConfig, load_config
from nrd_dist.metrics import ClassificationMeter
from nrd_dist.schedule import lr_multiplier
from nrd_dist.testing.processes import free_port

DEMO = REPO / "configs" / "fmnist_demo.yaml"


def small_run(fmnist_small, out, *extra):
    return [
        DEMO,
        f"data.train={fmnist_small['train']}",
        f"data.val.fmnist_test={fmnist_small['test']}",
        f"run.output_dir={out}",
        "data.batch_size=32",
        "data.workers=1",
        "data.shuffle_buffer=64",
        "optim.epochs=2",
        "log.every_steps=3",
        "eval.label_correction_samples=96",
        "eval.label_correction_views=2",
        *extra,
    ]


@pytest.mark.slow
def test_nrd_run_writes_the_output_contract(fmnist_small, tmp_path):
    out = tmp_path / "run"
    proc = run_train(small_run(fmnist_small, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clean fmnist_test top-1: student" in proc.stdout
    # config.yaml is the resolved config, loadable as is
    resolved = load_config(out / "config.yaml")
    assert resolved.loss.name == "nrd" and resolved.optim.epochs == 2
    assert resolved.data.noise.rate == 0.4
    # metrics.jsonl: epoch and step everywhere, top1 per val set after each evaluation
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("epoch" in r and "step" in r for r in records)
    evals = [r for r in records if "top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1]
    steps_per_epoch = 320 // 32
    assert [r["step"] for r in evals] == [steps_per_epoch, 2 * steps_per_epoch]
    for r in evals:
        assert 0 <= r["top1"]["fmnist_test"] <= 100
        assert r["eval"]["fmnist_test"]["teacher"]["count"] == fmnist_small["test_count"]  # each sample once
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    val = summary["val"]["fmnist_test"]
    for model in ("student", "teacher"):
        assert val[model]["best_top1"] >= val[model]["last_top1"]
        assert 0 <= val[model]["ece"] <= 1
    assert val["student"]["last_top1"] == evals[-1]["top1"]["fmnist_test"]
    assert summary["wall_time_s"] > 0 and summary["train_samples_per_s"] > 0
    assert summary["steps"] == 2 * steps_per_epoch
    for plot in ("reliability_fmnist_test.png", "accuracy.png", "label_correction.png"):
        assert plot in summary["plots"]
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    correction = summary["label_correction"]
    counts = correction["counts"]
    assert counts["clean"] + counts["mislabeled"] == 96
    assert 0.2 < counts["mislabeled"] / 96 < 0.55  # 40% symmetric noise flips ~36%
    for model in ("student", "teacher"):
        for mode in ("plain", "augmix_ensemble"):
            assert set(correction[model][mode]) == {"clean", "mislabeled"}


@pytest.mark.slow
def test_baseline_runs_without_teacher(fmnist_small, tmp_path):
    out = tmp_path / "ce"
    proc = run_train(small_run(fmnist_small, out, "loss.name=ce", "loss.pi=null", "optim.epochs=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val"]["fmnist_test"]) == {"student"}  # no teacher kept or evaluated
    assert set(summary["label_correction"]) == {"student", "counts"}


@pytest.mark.slow
def test_train_step_skips_the_teacher_for_baselines_and_uses_views_for_gjs(fmnist_small, tmp_path):
    from nrd_dist.engines import LocalEngine as Engine
    from nrd_dist.train import Trainer, plan_data

    for loss, views, teacher in (("ce", 1, False), ("gjs", 2, False), ("nrd", 1, True), ("ce_nrd", 1, True)):
        overrides = [
            f"data.train={fmnist_small['train']}",
            f"run.output_dir={tmp_path / loss}",
            "data.batch_size=16",
            "data.workers=0",
            f"loss.name={loss}",
        ]
        overrides.append({"gjs": "loss.pi=[0.5, 0.25, 0.25]", "ce": "loss.pi=null"}.get(loss, "loss.pi=[0.3,0.5,0.2]"))
        cfg = load_config(DEMO, overrides)
        cfg.data.val = {}
        trainer = Trainer(cfg, plan_data(cfg), Engine(cfg))
        batch = next(iter(trainer.train_loader))
        assert ("teacher" in batch) is teacher
        assert (trainer.teacher is not None) is teacher
        if views > 1:
            assert len(batch["student"]) == views and batch["student"][0].shape == (16, 1, 28, 28)
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        loss_value = trainer.train_step(batch)
        assert torch.isfinite(loss_value)
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
        trainer.log.close()


def test_bf16_autocast_step_on_cpu(fmnist_small, tmp_path):
    from nrd_dist.engines import LocalEngine as Engine
    from nrd_dist.train import Trainer, plan_data

    cfg = load_config(
        DEMO,
        [
            f"data.train={fmnist_small['train']}",
            f"run.output_dir={tmp_path}",
            "data.batch_size=16",
            "data.workers=0",
            "engine.precision=bf16",
        ],
    )
    cfg.data.val = {}
    trainer = Trainer(cfg, plan_data(cfg), Engine(cfg))
    loss = trainer.train_step(next(iter(trainer.train_loader)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # loss computed in fp32
    assert all(p.dtype == torch.float32 for p in trainer.teacher.parameters())
    trainer.log.close()


@pytest.mark.slow
def test_compiled_nrd_step_matches_the_eager_step(fmnist_small, tmp_path):
    """engine.compile (real inductor, C++ on this CPU): the student, the teacher and the
    loss compiled in place take the same step as the eager ones, and every state-dict key
    (checkpoints, the EMA pairing) stays that of the plain modules."""
    from nrd_dist.engines import LocalEngine as Engine
    from nrd_dist.train import Trainer, plan_data

    def two_steps(compiled: bool):
        overrides = [
            f"data.train={fmnist_small['train']}",
            f"run.output_dir={tmp_path / str(compiled)}",
            "data.batch_size=16",
            "data.workers=0",
            f"engine.compile={str(compiled).lower()}",
        ]
        cfg = load_config(DEMO, overrides)
        cfg.data.val = {}
        trainer = Trainer(cfg, plan_data(cfg), Engine(cfg))
        start = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        batches = iter(trainer.train_loader)
        losses = [float(trainer.train_step(next(batches))) for _ in range(2)]
        trainer.log.close()
        # compiled exactly when asked: otherwise this would compare eager with eager
        modules = (trainer.engine.module, trainer.teacher.module, trainer.loss_fn)
        assert [getattr(m, "_compiled_call_impl", None) is not None for m in modules] == [compiled] * 3
        return losses, start, trainer.engine.module.state_dict(), trainer.teacher.state_dict()["model"]

    eager_losses, eager_start, eager_student, eager_teacher = two_steps(False)
    losses, start, student, teacher = two_steps(True)
    assert list(student) == list(eager_student) and list(teacher) == list(eager_teacher)
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    # Updates are compared relative to their size, not element by element: fused kernels
    # round differently, and an activation within ~1e-6 of ReLU's kink (1 in ~200,000 here)
    # then lands on the other side, which moves a layer's gradient by ~0.5% (measured:
    # compiled vs eager updates differ by at most 0.8% per tensor, the losses by 1e-6). A
    # wrong step (a missing term, a lost update) differs by tens of percent.
    for name, before in eager_start.items():
        if not before.is_floating_point():
            continue
        eager_update = eager_student[name].float() - before.float()
        update = student[name].float() - start[name].float()
        assert torch.allclose(start[name], before), name  # both runs start from the same weights
        assert (update - eager_update).norm() <= 0.05 * eager_update.norm() + 1e-7, name
        eager_update = eager_teacher[name].float() - before.float()
        update = teacher[name].float() - start[name].float()
        assert (update - eager_update).norm() <= 0.05 * eager_update.norm() + 1e-7, name


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "optim.lrr: unknown key (did you mean 'lr'?)"),
        ("loss.pi=[0.5, 0.6, 0.1]", "loss.pi: weights must be non-negative and sum to 1"),
        ("data.noise.rate=2", "data.noise.rate: noise rate must lie in [0, 1]"),
        (
            "data.train=/nonexistent/train-{000000..000003}.tar",
            "data.train: shard '/nonexistent/train-000000.tar' does not exist",
        ),
        (
            "data.val.fmnist_test=/nonexistent/test-*.tar",
            "data.val.fmnist_test: no shard matches '/nonexistent/test-*.tar'",
        ),
    ],
)
def test_config_errors_stop_before_training(fmnist_small, tmp_path, capsys, override, message):
    from nrd_dist.train import main

    out = tmp_path / "never"
    args = [
        DEMO,
        f"data.train={fmnist_small['train']}",
        f"data.val.fmnist_test={fmnist_small['test']}",
        f"run.output_dir={out}",
        override,
    ]
    # main() in this process (the entry point's code; run_train's tests cover the fresh
    # interpreter): an exception it did not turn into the message would fail this test.
    assert main([str(a) for a in args]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not out.exists()  # nothing started


def test_uncountable_shards_need_samples_per_epoch(fmnist_small, tmp_path):
    import shutil

    from nrd_dist.config import ConfigError
    from nrd_dist.train import plan_data

    shutil.copy(fmnist_small["root"] / "train" / "train-000000.tar", tmp_path / "x-000000.tar")
    cfg = load_config(DEMO, [f"data.train={tmp_path / 'x-000000.tar'}", "data.val={}"])
    with pytest.raises(ConfigError, match="data.samples_per_epoch: cannot count"):
        plan_data(cfg)
    cfg = load_config(DEMO, [f"data.train={tmp_path / 'x-000000.tar'}", "data.val={}", "data.samples_per_epoch=160"])
    assert plan_data(cfg).train_samples == 160


def test_schedules():
    def lr(schedule, step, spe=10, **kw):
        return lr_multiplier(OptimConfig(schedule=schedule, epochs=10, **kw), spe)(step)

    assert lr("multistep", 0, milestones=[0.5, 0.75]) == 1.0
    assert lr("multistep", 49, milestones=[0.5, 0.75]) == 1.0
    assert lr("multistep", 50, milestones=[0.5, 0.75]) == pytest.approx(0.1)
    assert lr("multistep", 75, milestones=[5, 7.5]) == pytest.approx(0.01)  # epochs, same thing
    assert lr("cosine", 0) == 1.0 and lr("cosine", 50) == pytest.approx(0.5) and lr("cosine", 100) == 0.0
    assert lr("step_gamma", 25, gamma=0.9) == pytest.approx(0.81)
    assert lr("constant", 99) == 1.0
    warm = [lr("cosine", s, warmup_epochs=1) for s in range(12)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0) and warm[10] == 1.0
    assert all(a < b for a, b in zip(warm[:9], warm[1:10]))


def test_meter_topk_ece_and_exact_merge():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.4, 0.35, 0.25]])
    target = torch.tensor([0, 1, 1, 2])
    meter = ClassificationMeter(num_bins=10, topk=(1, 2))
    meter.update(probs, target)
    m = meter.compute()
    assert m["top1"] == 50.0 and m["top2"] == 75.0 and m["count"] == 4
    # bins: 0.9 correct -> |0.9-1|; 0.5 wrong -> 0.5; 0.7 correct -> 0.3; 0.4 wrong -> 0.4
    assert m["ece"] == pytest.approx((0.1 + 0.5 + 0.3 + 0.4) / 4)
    # two "ranks" each see half; summing their states gives the single-pass result
    a, b = ClassificationMeter(10, (1, 2)), ClassificationMeter(10, (1, 2))
    a.update(probs[:1], target[:1])
    b.update(probs[1:], target[1:])
    merged = ClassificationMeter(10, (1, 2))
    merged.all_reduce(lambda _: a.state() + b.state())
    assert merged.compute() == m


def test_config_reference_matches_schema_and_readme():
    from nrd_dist.config_reference import HELP, leaf_keys, render_markdown

    keys = [k for k, _ in leaf_keys()]
    assert sorted(keys) == sorted(HELP), "every config key needs a line in nrd_dist/config_reference.HELP"
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    embedded = readme.split(start)[1].split(end)[0]
    assert embedded == render_markdown(), (
        "README config reference is stale: python -m nrd_dist.config_reference --update README.md"
    )


def test_shipped_configs_have_valid_keys():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert yaml.safe_load(path.read_text())  # non-empty
        assert cfg.loss.name


@pytest.mark.slow
def test_engine_settings_this_machine_cannot_run_fail_early(fmnist_small, tmp_path):
    out = tmp_path / "never"
    proc = run_train(
        [
            DEMO,
            f"data.train={fmnist_small['train']}",
            f"data.val.fmnist_test={fmnist_small['test']}",
            f"run.output_dir={out}",
            "engine.precision=fp16",
        ],
        timeout=120,
    )
    assert proc.returncode == 2 and "engine.precision: fp16 needs a GPU" in proc.stderr
    assert not out.exists()


def test_ddp_engine_settings(monkeypatch):
    """The DDP wrapper gets the configured bucket size and bucket-view gradients, and the
    model is channels_last on CPU (a real gloo process group of one, in this process)."""
    import torch.distributed as dist

    from nrd_dist.engines import DDPEngine
    from nrd_dist.models import build_model

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    cfg = load_config(DEMO, ["engine.ddp_bucket_cap_mb=7"])
    engine = DDPEngine(cfg)
    try:
        model = engine.prepare_module(build_model("small_cnn", 10, 1))
        engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert engine.model.bucket_bytes_cap == 7 * 1024 * 1024
        assert engine.model.gradient_as_bucket_view
        conv = model[0][3].weight  # 32 -> 32 channels: the two layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        engine.model(engine.to_device(torch.rand(4, 1, 28, 28))).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()

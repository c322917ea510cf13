"""``python -m nrd_dist.train CONFIG [key=value ...]``: train and evaluate one model.

The step (docs/design.md section 1), per rank::

    x_s, x_t = student view, teacher view (AugMix) of the same images
    student_logits = f(x_s; theta)                  with gradient
    teacher_probs  = softmax(f(x_t; theta_ema))     no gradient, eval mode
    loss = build_loss(...)(student_logits, y, teacher_probs)
    optimizer step; theta_ema <- lerp(theta_ema, theta, 1 - decay)

Baselines (``loss.name: ce`` ...) build no teacher view, run no teacher forward and keep
no teacher. Outputs go to ``run.output_dir`` (docs/design.md section 3): ``config.yaml``,
``metrics.jsonl``, ``tensorboard/``, PNG plots and ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nrd_dist.checkpoint import Checkpointer, NonFiniteWeightsError, Resumed
from nrd_dist.config import Config, ConfigError, dump_config, load_config, to_dict
from nrd_dist.data import storage
from nrd_dist.data.augment import TrainViews, build_policy
from nrd_dist.data.bad_data import BadDataBudget, BadDataError, bad_reports
from nrd_dist.data.shards import (
    ShardError,
    ShardStream,
    StreamSpec,
    expand_urls,
    make_loader,
    manifest_counts,
    set_epoch,
)
from nrd_dist.data.storage import StorageError
from nrd_dist.data.writer import MANIFEST_NAME
from nrd_dist.engines import Engine, build_engine
from nrd_dist.evaluate import EvalContext, LabelCorrectionViews, evaluate, label_correction
from nrd_dist.losses import build_loss
from nrd_dist.metrics import bar_chart, line_plot, reliability_diagram
from nrd_dist.models import build_model
from nrd_dist.run_log import RunLog, write_json
from nrd_dist.schedule import lr_multiplier
from nrd_dist.teacher import TeacherDivergedError, verify_teacher
from nrd_dist.train_state import TrainState


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- data plan


@dataclass
class DataPlan:
    """Shard URLs resolved and counted before any model is built."""

    train_urls: list[str]
    train_samples: int
    val_urls: dict[str, list[str]]
    shard_counts: dict[str, int]  # URL -> samples, for every shard a manifest lists


def plan_data(cfg: Config) -> DataPlan:
    """Resolve and check every shard URL; raises ShardError/ConfigError naming what is wrong."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (URL, brace pattern or list)")
    storage.configure(cfg.data.storage, cfg.data.retries, cfg.data.retry_backoff_s)
    train_urls = expand_urls(cfg.data.train, "data.train")
    val_urls = {name: expand_urls(url, f"data.val.{name}") for name, url in cfg.data.val.items()}
    for name in cfg.eval.noisy_val:
        if name not in val_urls:
            raise ConfigError(f"eval.noisy_val: {name!r} is not a data.val set ({', '.join(val_urls) or 'none'})")
    counts = manifest_counts(train_urls + [u for urls in val_urls.values() for u in urls])
    samples = cfg.data.samples_per_epoch
    if samples is None:
        unlisted = [u for u in train_urls if u not in counts]
        if unlisted:
            raise ConfigError(
                f"data.samples_per_epoch: cannot count the samples of {unlisted[0]!r} "
                f"(no {MANIFEST_NAME} beside it lists it); set data.samples_per_epoch"
            )
        samples = sum(counts[u] for u in train_urls)
    return DataPlan(train_urls, samples, val_urls, counts)


# ----------------------------------------------------------------------------- the trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _state_field(name: str) -> property:
    """``Trainer.<name>`` reads and writes ``Trainer.state.<name>`` (the loop's counters
    live in the checkpointed :class:`TrainState`; the loop reads better without ``state.``)."""
    return property(
        lambda self: getattr(self.state, name),
        lambda self, value: setattr(self.state, name, value),
        doc=f"``self.state.{name}`` (:class:`TrainState`)",
    )


class Trainer:
    step = _state_field("step")  # batches trained so far
    epoch = _state_field("epoch")  # the epoch being trained
    history = _state_field("history")  # "{val set}/{model}" -> [(epoch, top-1 %)]
    nonfinite_skipped = _state_field("nonfinite_skipped")

    def __init__(self, cfg: Config, plan: DataPlan, engine: Engine):
        self.cfg = cfg
        self.engine = engine
        self.out = Path(cfg.run.output_dir)
        self.log = RunLog(self.out, enabled=engine.is_main)
        seed_everything(cfg.run.seed)

        self.loss_fn = build_loss(cfg.loss.name, **cfg.loss.params())
        self.student_views = self.loss_fn.num_views if self.loss_fn.multi_view else 1

        model = build_model(cfg.model.arch, cfg.data.num_classes, cfg.model.in_channels)
        model = engine.prepare_module(model)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        # The teacher starts from the student's initial weights; under ZeRO-3 it must be
        # copied before DeepSpeed partitions the student.
        template = copy.deepcopy(model) if self.loss_fn.needs_teacher else None
        engine.setup(model, optimizer)
        self.teacher = engine.make_teacher(template) if template is not None else None
        if cfg.engine.compile:
            engine.compile(model, self.teacher.module if self.teacher is not None else None, self.loss_fn)

        self.steps_per_epoch = max(plan.train_samples // (cfg.data.batch_size * engine.world_size), 1)
        # The schedule counts optimizer steps: one per grad_accum_steps batches.
        optimizer_steps = max(self.steps_per_epoch // cfg.engine.grad_accum_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.optim, optimizer_steps))

        aug = cfg.data.augment
        self.policy = build_policy(aug.policy, aug.image_size, aug.resize_size, aug.cutout)
        self.plan = plan
        noise = to_dict(cfg.data.noise) if cfg.data.noise.type != "none" else None
        self.noise = noise
        pin = engine.device.type == "cuda"
        train_stream = self._stream(
            plan.train_urls, TrainViews(self.policy, self.teacher is not None, self.student_views), train=True
        )
        self.train_loader = make_loader(
            train_stream,
            cfg.data.batch_size,
            cfg.data.workers,
            drop_last=True,
            pin_memory=pin,
            persistent=cfg.data.persistent_workers,
        )
        eval_batch = cfg.eval.batch_size or 2 * cfg.data.batch_size
        self.val_loaders = {
            name: make_loader(
                self._stream(urls, self.policy.eval, train=False, noise=name in cfg.eval.noisy_val),
                eval_batch,
                cfg.data.workers,
                drop_last=False,
                pin_memory=pin,
            )
            for name, urls in plan.val_urls.items()
        }
        self.state = TrainState()  # step, data position, history: what checkpoints save besides the components
        self.bad_data = BadDataBudget(cfg.data.max_bad_fraction, plan.train_samples)
        self.checkpointer = Checkpointer(
            cfg, engine, self.state, {"teacher": self.teacher, "scheduler": self.scheduler, "bad_data": self.bad_data}
        )

    def _stream(self, urls, transform, train: bool, noise: bool = True, per_sample_seed: bool = False) -> ShardStream:
        """A stream of this rank's share of ``urls``; ``noise``: apply ``data.noise``."""
        spec = StreamSpec.from_config(
            self.cfg,
            load_time_noise=noise,
            rank=self.engine.rank,
            world_size=self.engine.world_size,
            expected_counts=self.plan.shard_counts,
        )
        return ShardStream(urls, transform, spec, train=train, per_sample_seed=per_sample_seed)

    # ------------------------------------------------------------------ the step

    def train_step(self, batch: dict) -> Optional[torch.Tensor]:
        """One step on ``batch`` (the paper's algorithm; see the module docstring). Returns
        the detached loss (a scalar), or None when the step was skipped (non-finite loss
        under ``train.nonfinite: skip``)."""
        engine = self.engine
        labels = batch["label"].to(engine.device, non_blocking=True)
        with engine.autocast():
            if self.student_views > 1:  # one forward over all views keeps BatchNorm statistics joint
                views = torch.cat([engine.to_device(v) for v in batch["student"]])
                student_logits = list(engine.model(views).chunk(self.student_views))
            else:
                student_logits = engine.model(engine.to_device(batch["student"]))
            teacher_probs = None
            if self.teacher is not None:
                teacher_probs = self.teacher.predict_probs(engine.to_device(batch["teacher"]))
        loss = self.loss_fn(student_logits, labels, teacher_probs)
        if not self.check_step(loss, batch):
            return None  # step skipped (train.nonfinite: skip)
        weights_changed = engine.step(loss, self.scheduler)
        if self.teacher is not None and weights_changed:
            self.teacher.update(engine.module)
        return loss.detach()

    def check_step(self, loss: torch.Tensor, batch: dict) -> bool:
        """Whether to take this step: the loss must be finite and the bad data within its
        budget. Agreed by all ranks through one tiny all-reduce, so they all step, all
        skip, or all stop at the same step."""
        reports = bad_reports(batch)
        for report in reports:
            self.log.warning(f"skipped {report}", self.engine.rank)
        local = torch.tensor([float(not torch.isfinite(loss.detach()).all()), len(reports), len(batch["label"])])
        nonfinite, bad_data, samples = (float(v) for v in self.engine.all_reduce_sum(local))
        self.bad_data.add(int(bad_data), int(samples), f"step {self.step + 1} (epoch {self.epoch})")
        if bad_data:
            self.log.record(epoch=self.epoch, step=self.step, bad_data=self.bad_data.bad)
        return nonfinite == 0 or self.skip_nonfinite(batch)

    def skip_nonfinite(self, batch: dict) -> bool:
        """``train.nonfinite``: stop, or skip the step within the budget (returns False)."""
        where = f"step {self.step + 1} (epoch {self.epoch}); batch sample keys {batch['key'][:8]}"
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite loss at {where} (train.nonfinite=stop)")
        self.nonfinite_skipped += 1
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.log.info(
            f"skipped non-finite loss at {where} ({self.nonfinite_skipped} of "
            f"train.nonfinite_budget={self.cfg.train.nonfinite_budget})"
        )
        self.log.record(epoch=self.epoch, step=self.step, nonfinite_skipped=self.nonfinite_skipped)
        if self.nonfinite_skipped > self.cfg.train.nonfinite_budget:
            raise NonFiniteLossError(
                f"non-finite losses exceeded train.nonfinite_budget={self.cfg.train.nonfinite_budget}; last at {where}"
            )
        return False

    # ------------------------------------------------------------------ the run

    def fit(self) -> dict:
        cfg, log = self.cfg, self.log
        resumed = self.resume()  # continues the latest complete checkpoint, if any
        log.open(resumed_step=self.step if resumed else None)
        if log.enabled:
            dump_config(cfg, self.out / "config.yaml")
        if resumed:
            log.info(
                f"resumed from {resumed.path} at step {self.step} (epoch {self.state.epoch}, "
                f"batch {self.state.batches_in_epoch}; it was written by {resumed.written_by} ranks)"
            )
        if cfg.loss.ignored_params():
            log.info(f"loss {cfg.loss.name} takes no {', '.join(cfg.loss.ignored_params())}: ignored")
        log.info(
            f"training {cfg.model.arch} with loss {cfg.loss.name} on {self.plan.train_samples} samples "
            f"({len(self.plan.train_urls)} shards), {self.steps_per_epoch} steps/epoch x {cfg.optim.epochs} "
            f"epochs, world size {self.engine.world_size}, {self.engine.device}, {self.engine.precision}"
        )
        start = time.time()
        train_time, train_samples = 0.0, 0
        try:
            for epoch in range(self.state.epoch, cfg.optim.epochs):  # from the data position
                epoch_start = time.time()
                seen = self.train_epoch(epoch)
                train_time += time.time() - epoch_start
                train_samples += seen * self.engine.world_size
                if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.optim.epochs:
                    self.run_evaluation(epoch)
                self.state.start_epoch(epoch + 1)
                self.checkpointer.save()
        finally:
            self.train_loader = None  # stops persistent workers (also on an error); frees their memory
        if not hasattr(self, "last_meters"):  # resumed after the last epoch's checkpoint
            self.run_evaluation(cfg.optim.epochs - 1)
        summary = self.finish(time.time() - start, train_samples / max(train_time, 1e-9))
        log.close()
        return summary

    def resume(self) -> Optional[Resumed]:
        """Continue the latest complete checkpoint, if any (``checkpoint.resume``).

        Elastic restart at another world size: the epoch's samples are re-dealt to the
        new ranks, so skip as many of this epoch's samples as were consumed, and put the
        schedule where the new step count says (the RNGs come from the seeds)."""
        resumed = self.checkpointer.resume()
        if resumed is not None and resumed.written_by != self.engine.world_size:
            state = self.state
            state.batches_in_epoch = state.batches_in_epoch * resumed.written_by // self.engine.world_size
            batches_done = state.epoch * self.steps_per_epoch + state.batches_in_epoch
            optimizer_steps = batches_done // self.cfg.engine.grad_accum_steps
            self.scheduler.last_epoch = optimizer_steps - 1
            self.scheduler.step()
        return resumed

    def train_epoch(self, epoch: int) -> int:
        """Epoch ``epoch`` (the data position's, ``state.epoch``), from the data position
        to ``steps_per_epoch`` batches: ``state.batches_in_epoch`` batches were already
        trained on before the checkpoint this run resumed from (0 otherwise). Returns
        the samples this rank trained on."""
        cfg, log = self.cfg, self.log
        skip = self.state.batches_in_epoch
        self.epoch = epoch
        set_epoch(self.train_loader, epoch)
        self.engine.module.train()
        bar = log.progress(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.optim.epochs}")
        window_steps, window_start, seen = 0, time.time(), 0
        pending = torch.zeros((), device=self.engine.device)
        batches = iter(self.train_loader)  # endless: every rank takes exactly steps_per_epoch
        for _ in range(skip):  # the stream is deterministic: re-drawing puts it where it stopped
            next(batches)
        bar.update(skip)
        for batch_index in range(skip, self.steps_per_epoch):
            batch = next(batches)
            loss = self.train_step(batch)
            self.step += 1
            self.state.batches_in_epoch = batch_index + 1
            if self.teacher is not None and cfg.teacher.verify_every and self.step % cfg.teacher.verify_every == 0:
                verify_teacher(self.teacher, self.step, self.engine)
            seen += len(batch["label"])
            if loss is not None:
                pending += loss.float()
                window_steps += 1
            bar.update(1)
            if window_steps and (self.step % cfg.log.every_steps == 0 or batch_index + 1 == self.steps_per_epoch):
                window_loss = float(pending) / window_steps  # one device sync per log interval
                rate = window_steps * len(batch["label"]) * self.engine.world_size / (time.time() - window_start)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.4g}", samples_s=f"{rate:.0f}")
                log.record(epoch=epoch, step=self.step, loss=window_loss, lr=lr, samples_per_s=rate)
                log.info(f"epoch {epoch + 1} step {self.step} loss {window_loss:.4f} lr {lr:.4g} samples/s {rate:.0f}")
                pending.zero_()
                window_steps, window_start = 0, time.time()
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0 and batch_index + 1 < self.steps_per_epoch:
                self.checkpointer.save()
        bar.close()
        del batches  # non-persistent workers stop here, before the next epoch's start
        return seen

    def eval_context(self) -> EvalContext:
        engine, aug = self.engine, self.cfg.data.augment
        size = aug.image_size or {"fmnist": 28, "cifar": 32, "imagenet": 224}[aug.policy]
        return EvalContext(
            engine.to_device,
            engine.autocast,
            engine.all_reduce_sum,
            lockstep=engine.distributed,
            idle_input=torch.zeros(1, self.cfg.model.in_channels, size, size),
            warn=lambda message: self.log.warning(message, engine.rank),
        )

    def predictors(self) -> dict:
        self.engine.module.eval()
        predictors = {"student": self.engine.module}
        if self.teacher is not None:
            predictors["teacher"] = self.teacher.module
        return predictors

    def run_evaluation(self, epoch: int) -> None:
        if not self.val_loaders:
            return
        results, top1 = {}, {}
        for name, loader in self.val_loaders.items():
            set_epoch(loader, 0)
            meters = evaluate(self.predictors(), loader, self.eval_context())
            results[name] = {model: meter.compute() for model, meter in meters.items()}
            top1[name] = results[name]["student"]["top1"]
            for model, metrics in results[name].items():
                self.history.setdefault(f"{name}/{model}", []).append((epoch + 1, metrics["top1"]))
            self.last_meters = getattr(self, "last_meters", {})
            self.last_meters[name] = meters
        self.engine.module.train()
        teacher_top1 = {n: r["teacher"]["top1"] for n, r in results.items() if "teacher" in r}
        self.log.record(epoch=epoch, step=self.step, top1=top1, teacher_top1=teacher_top1, eval=results)
        parts = [
            f"{n}: student {r['student']['top1']:.2f}%"
            + (f", teacher {r['teacher']['top1']:.2f}%" if "teacher" in r else "")
            for n, r in results.items()
        ]
        self.log.info(f"epoch {epoch + 1} step {self.step} top-1 | " + " | ".join(parts))

    def finish(self, wall_time: float, samples_per_s: float) -> dict:
        cfg, log = self.cfg, self.log
        summary: dict = {
            "loss": cfg.loss.name,
            "noise": to_dict(cfg.data.noise),
            "steps": self.step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "bad_data": self.bad_data.state_dict(),
            "epochs": cfg.optim.epochs,
            "wall_time_s": round(wall_time, 2),
            "train_samples_per_s": round(samples_per_s, 1),
            "val": {},
            "plots": [],
        }
        for key, points in self.history.items():
            name, model = key.split("/")
            values = [v for _, v in points]
            entry = summary["val"].setdefault(name, {})
            entry[model] = {
                "best_top1": max(values),
                "last_top1": values[-1],
                "ece": self.last_meters[name][model].compute()["ece"],
                "top5": self.last_meters[name][model].compute()["top5"],
                "reliability": self.last_meters[name][model].reliability(),
            }
        if log.enabled:
            for name, meters in getattr(self, "last_meters", {}).items():
                curves = {
                    f"{m} (ECE {100 * meter.compute()['ece']:.1f}%)": meter.reliability() for m, meter in meters.items()
                }
                title = f"{name}: {cfg.loss.name}, {cfg.data.noise.type} noise {cfg.data.noise.rate}"
                path = reliability_diagram(curves, self.out / f"reliability_{name}.png", title)
                summary["plots"].append(path.name)
            curve = line_plot(
                self.history,
                self.out / "accuracy.png",
                "epoch",
                "clean top-1 (%)",
                f"{cfg.loss.name}, {cfg.data.noise.type} noise {cfg.data.noise.rate}",
            )
            if curve:
                summary["plots"].append(curve.name)
        correction = self.label_correction_analysis()
        if correction is not None:
            summary["label_correction"] = correction
            if log.enabled:
                summary["plots"].append(self.plot_label_correction(correction).name)
        write_json(self.out / "summary.json", summary, enabled=log.enabled)
        for name, entry in summary["val"].items():
            line = ", ".join(
                f"{m} {e['last_top1']:.2f}% (best {e['best_top1']:.2f}%, ECE {100 * e['ece']:.1f}%)"
                for m, e in entry.items()
            )
            log.info(f"clean {name} top-1: {line}")
        log.info(f"outputs in {self.out.resolve()}")
        return summary

    def label_correction_analysis(self) -> Optional[dict]:
        """Table 1 (:func:`nrd_dist.evaluate.label_correction`) on the first
        ``eval.label_correction_samples`` training samples, K = ``eval.label_correction_views``.
        Needs training shards that carry clean labels; skipped (None) otherwise.

        Reporting only: the views are drawn per sample from ``(run.seed, key)`` under a
        forked RNG, so the analysis takes nothing from the RNG training uses, and
        ``tools/diagnose.py`` on the final checkpoint gets the same numbers."""
        cfg = self.cfg
        if cfg.eval.label_correction_samples == 0:
            return None
        views = LabelCorrectionViews(self.policy, cfg.eval.label_correction_views)
        stream = self._stream(self.plan.train_urls, views, train=False, per_sample_seed=True)
        loader = make_loader(stream, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.workers, drop_last=False)
        per_rank = math.ceil(cfg.eval.label_correction_samples / self.engine.world_size)
        result = label_correction(self.predictors(), loader, self.eval_context(), per_rank)
        self.engine.module.train()
        return result if sum(result["counts"].values()) else None

    def plot_label_correction(self, correction: dict) -> Path:
        """``label_correction.png``: one group of bars per subset (clean, mislabeled
        samples), one bar per model and mode."""
        groups = {
            f"{subset} samples (n={correction['counts'][subset]})": {
                f"{model}, {mode.replace('_', ' ')}": accuracy[subset]
                for model, modes in correction.items()
                if model != "counts"
                for mode, accuracy in modes.items()
            }
            for subset in ("clean", "mislabeled")
        }
        return bar_chart(
            groups,
            self.out / "label_correction.png",
            "accuracy against clean labels on training samples",
            "accuracy (%)",
        )


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nrd_dist.train",
        description="Train with NRD or a baseline. Every setting is a config key: "
        "CONFIG (YAML) plus key=value overrides, e.g. optim.epochs=2 loss.name=ce.",
    )
    parser.add_argument("config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (values parsed as YAML)")
    # The DeepSpeed launcher appends --local_rank=N; the engine reads LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_data(cfg)  # every shard URL checked before any model or worker starts
        engine = build_engine(cfg)  # engine settings this machine cannot run fail here
    except (ConfigError, ShardError, ValueError) as err:
        if rank == 0:  # the same message on every rank: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        Trainer(cfg, plan, engine).fit()
    except (
        ShardError,
        StorageError,
        BadDataError,
        NonFiniteLossError,
        NonFiniteWeightsError,
        TeacherDivergedError,
        ConfigError,
    ) as err:
        print(f"error (rank {engine.rank}): {err}", file=sys.stderr)
        return 1
    except BaseException as err:
        # Anything else: name the rank (the launcher interleaves every rank's output),
        # then the traceback.
        print(f"error (rank {engine.rank}): {type(err).__name__}: {err}", file=sys.stderr)
        raise
    finally:
        engine.close()
    if engine.distributed:
        # Every output is written and closed. Skip the interpreter's teardown: now and
        # then a C++ thread of gloo/DeepSpeed aborts there ("terminate called without an
        # active exception", seen once in ~10 ZeRO-3 runs), which would turn a finished
        # run into a failed one for the launcher.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

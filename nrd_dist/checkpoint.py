"""Checkpoints: atomic, on every rank, keep-last-k, and resumable exactly.

Layout under ``run.output_dir/checkpoints/``::

    step_000001200/            a complete checkpoint (renamed into place when complete)
        shared.pt              student, teacher, optimizer, scheduler, scaler, position, config
        rank0.pt, rank1.pt     each rank's RNG states (Python, NumPy, torch, CUDA)
        deepspeed/             DeepSpeed's own files (engine.backend: deepspeed), all ranks
        zero_portable.pt       ZeRO: full fp32 weights + optimizer state, any world size
        COMPLETE
    latest                     the name of the newest complete checkpoint, replaced last

A checkpoint is written under ``step_N.tmp/`` and renamed only when every rank has
finished its part, and ``latest`` is replaced after that, so a process killed at any
moment leaves the previous checkpoint loadable. The data position is ``(epoch,
batches consumed in the epoch)``: the stream is a function of (seed, epoch, rank,
worker, batches consumed), so a resumed run replays nothing and skips nothing.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from nrd_dist import zero_portable
from nrd_dist.config import Config, ConfigError, to_dict

LATEST = "latest"
COMPLETE = "COMPLETE"
PORTABLE = "zero_portable.pt"

# Sections whose change makes a checkpoint meaningless for this run.
RESUME_CRITICAL = ("model", "loss", "data.train", "data.num_classes", "data.noise", "data.augment",
                   "data.batch_size", "engine.backend", "engine.zero_stage")


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The config values that must match for a checkpoint to be resumed."""
    flat = _flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if any(k == c or k.startswith(c + ".") for c in RESUME_CRITICAL)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} -> now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # NumPy's state as plain lists, loadable with weights_only=True
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteWeightsError(RuntimeError):
    pass


class Checkpointer:
    """Saves and restores a Trainer's full state; every rank calls every method."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.engine = trainer.engine
        self.root = Path(trainer.cfg.run.output_dir) / "checkpoints"
        self.keep = trainer.cfg.checkpoint.keep

    # ------------------------------------------------------------------ save

    def save(self, epoch: int, batches_in_epoch: int) -> Optional[Path]:
        t, engine = self.trainer, self.engine
        if not self._weights_finite():
            raise NonFiniteWeightsError(f"step {t.step}: the weights are not finite; no checkpoint written "
                                        "(the previous one stays the latest)")
        name = f"step_{t.step:09d}"
        tmp = self.root / f"{name}.tmp"
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        _atomic_save({"rng": rng_state()}, tmp / f"rank{engine.rank}.pt")
        teacher_state = t.teacher.state_dict() if t.teacher is not None else None  # collective under ZeRO-3
        if engine.cfg.engine.backend == "deepspeed":
            engine.model.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # every rank writes its part
            if self._sharded and t.cfg.checkpoint.zero_portable:
                portable = zero_portable.gather(engine.module, engine.optimizer, engine.is_main)  # collective
                if engine.is_main:
                    _atomic_save(portable, tmp / PORTABLE)
        if engine.is_main:
            shared = {
                "step": t.step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                "world_size": engine.world_size,
                "fingerprint": fingerprint(t.cfg),
                "teacher": teacher_state,
                "scheduler": t.scheduler.state_dict(),
                "scaler": engine.scaler.state_dict(),
                "history": {k: [list(p) for p in v] for k, v in t.history.items()},
                "nonfinite_skipped": t.nonfinite_skipped,
                "bad_data": t.bad_data.state_dict(),
            }
            if engine.cfg.engine.backend != "deepspeed":
                shared["student"] = engine.module.state_dict()
                shared["optimizer"] = engine.optimizer.state_dict()
            _atomic_save(shared, tmp / "shared.pt")
        engine.barrier()  # every rank's part is on disk
        final = self.root / name
        if engine.is_main:
            (tmp / COMPLETE).write_text(name + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.root / LATEST, name + "\n")  # last: only now is it the latest
            self._prune()
        engine.barrier()
        return final

    @property
    def _sharded(self) -> bool:
        """Whether DeepSpeed's files hold per-rank optimizer partitions (ZeRO-1/2/3)."""
        return self.engine.cfg.engine.backend == "deepspeed" and self.engine.cfg.engine.zero_stage > 0

    def _weights_finite(self) -> bool:
        module = self.engine.module  # parameters and floating buffers (BatchNorm statistics)
        tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())
        flag = torch.tensor([0.0 if finite else 1.0])
        return float(self.engine.all_reduce_sum(flag)) == 0

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / COMPLETE).exists() else None

    def resume(self) -> Optional[dict]:
        """Load the latest complete checkpoint, if any; returns its position."""
        t, engine, cfg = self.trainer, self.engine, self.trainer.cfg
        if cfg.checkpoint.resume == "never":
            return None
        path = self.latest()
        if path is None:
            return None
        shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=True)
        differences = config_differences(shared["fingerprint"], fingerprint(cfg))
        if differences and cfg.checkpoint.resume != "force":
            raise ConfigError(
                f"checkpoint.resume: {path} was written with a different config; resuming would be wrong:\n  "
                + "\n  ".join(differences) + "\nuse a new run.output_dir, or checkpoint.resume=force")
        if self._sharded and shared["world_size"] != engine.world_size:
            # DeepSpeed's partitions fit only the world size that wrote them.
            if not (path / PORTABLE).exists():
                raise ConfigError(
                    f"checkpoint.resume: {path} holds ZeRO-{cfg.engine.zero_stage} optimizer partitions of "
                    f"{shared['world_size']} ranks and no {PORTABLE} (checkpoint.zero_portable was false), so it "
                    f"resumes only on {shared['world_size']} ranks, not {engine.world_size}; "
                    "tools/export_model.py still exports its weights")
            portable = torch.load(path / PORTABLE, map_location="cpu", weights_only=True)
            zero_portable.load(engine.module, engine.optimizer, portable)
            engine.model.global_steps = shared["step"] // cfg.engine.grad_accum_steps
        elif engine.cfg.engine.backend == "deepspeed":
            engine.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        else:
            engine.module.load_state_dict(shared["student"])
            engine.optimizer.load_state_dict(shared["optimizer"])
        if t.teacher is not None and shared["teacher"] is not None:
            t.teacher.load_state_dict(shared["teacher"])
        t.scheduler.load_state_dict(shared["scheduler"])
        engine.scaler.load_state_dict(shared["scaler"])
        t.step = shared["step"]
        t.history = {k: [tuple(p) for p in v] for k, v in shared["history"].items()}
        t.nonfinite_skipped = shared["nonfinite_skipped"]
        if "bad_data" in shared:  # checkpoints written before bad-data counting have none
            t.bad_data.load_state_dict(shared["bad_data"])
        epoch, batches = shared["epoch"], shared["batches_in_epoch"]
        rank_file = path / f"rank{engine.rank}.pt"
        if shared["world_size"] == engine.world_size:
            if rank_file.exists():
                set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=True)["rng"])
        else:
            # Elastic restart at another world size: the epoch's samples are re-dealt to
            # the new ranks; skip as many of this epoch's samples as were consumed, and
            # put the schedule where the new step count says (RNGs come from the seeds).
            batches = batches * shared["world_size"] // engine.world_size
            steps_done = epoch * t.steps_per_epoch + batches
            optimizer_steps = steps_done // t.cfg.engine.grad_accum_steps
            t.scheduler.last_epoch = optimizer_steps - 1
            t.scheduler.step()
        return {"path": path, "epoch": epoch, "batches_in_epoch": batches, "world_size": shared["world_size"]}


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root`` (a run's ``checkpoints/``), oldest
    first; ``step_N.tmp`` folders are never complete, whatever they hold."""
    return sorted(p for p in root.glob("step_*")
                  if p.is_dir() and p.suffix != ".tmp" and (p / COMPLETE).exists())


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


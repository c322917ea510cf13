"""Checkpoints: atomic, on every rank, keep-last-k, and resumable exactly.

Layout under ``run.output_dir/checkpoints/``::

    step_000001200/            a complete checkpoint (renamed into place when complete)
        shared.pt              written by rank 0: the train state (step, epoch,
                               batches_in_epoch, history, nonfinite_skipped), the
                               components (teacher, scheduler, bad_data), world_size,
                               fingerprint, and the engine's entries (student, optimizer,
                               scaler: see the engine)
        rank0.pt, rank1.pt     each rank's RNG states (Python, NumPy, torch, CUDA)
        deepspeed/             DeepSpeed's own files (engine.backend: deepspeed), all ranks
        zero_portable.pt       ZeRO: full fp32 weights + optimizer state, any world size
        COMPLETE
    latest                     the name of the newest complete checkpoint, replaced last

A checkpoint is written under ``step_N.tmp/`` and renamed only when every rank has
finished its part, and ``latest`` is replaced after that, so a process killed at any
moment leaves the previous checkpoint loadable.

What is saved is explicit (in the manner of torchtitan's ``CheckpointManager(states=)``):
a :class:`~nrd_dist.train_state.TrainState`, named components with
``state_dict``/``load_state_dict``, each rank's :class:`~nrd_dist.train_state.RNGState`,
and the engine's own part (:meth:`Engine.save_state <nrd_dist.engines.base.Engine.save_state>`,
which knows where DeepSpeed keeps its shards).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from nrd_dist.config import Config, ConfigError, to_dict
from nrd_dist.train_state import RNGState, Stateful, TrainState

if TYPE_CHECKING:
    from nrd_dist.engines.base import Engine

LATEST = "latest"
COMPLETE = "COMPLETE"
SHARED = "shared.pt"  # rank 0's file

# Sections whose change makes a checkpoint meaningless for this run.
RESUME_CRITICAL = (
    "model",
    "loss",
    "data.train",
    "data.num_classes",
    "data.noise",
    "data.augment",
    "data.batch_size",
    "engine.backend",
    "engine.zero_stage",
)


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The config values that must match for a checkpoint to be resumed."""
    flat = _flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if any(k == c or k.startswith(c + ".") for c in RESUME_CRITICAL)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: checkpoint {saved.get(k)!r} -> now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


class NonFiniteWeightsError(RuntimeError):
    pass


@dataclass
class Resumed:
    """Where :meth:`Checkpointer.resume` continued from."""

    path: Path  # the checkpoint folder
    written_by: int  # the world size that wrote it


class Checkpointer:
    """Saves and restores a run's state; every rank calls every method.

    Args:
        cfg: the run's config (``run.output_dir``, ``checkpoint.*``, the fingerprint).
        engine: saves and loads the student, the optimizer and the loss scaler, and
            provides the collectives.
        state: the trainer's progress; ``state.step`` names the checkpoint.
        components: name -> object with ``state_dict``/``load_state_dict``, saved in
            ``shared.pt`` under its name (None: saved as None, nothing loaded). Their
            ``state_dict`` is called on every rank (the ZeRO-3 teacher gathers).
    """

    def __init__(self, cfg: Config, engine: Engine, state: TrainState, components: dict[str, Optional[Stateful]]):
        self.cfg = cfg
        self.engine = engine
        self.state = state
        self.components = components
        self.rank_states: dict[str, Stateful] = {"rng": RNGState()}  # in rank{R}.pt, one per rank
        self.root = Path(cfg.run.output_dir) / "checkpoints"
        self.keep = cfg.checkpoint.keep

    # ------------------------------------------------------------------ save

    def save(self) -> Path:
        """Write a checkpoint of the current state, named by ``state.step``, and make it
        the latest; refuses (NonFiniteWeightsError) if the weights are not finite."""
        engine = self.engine
        if not self._weights_finite():
            raise NonFiniteWeightsError(
                f"step {self.state.step}: the weights are not finite; no checkpoint written "
                "(the previous one stays the latest)"
            )
        name = f"step_{self.state.step:09d}"
        tmp = self.root / f"{name}.tmp"
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        atomic_save({key: s.state_dict() for key, s in self.rank_states.items()}, tmp / f"rank{engine.rank}.pt")
        components = {key: c.state_dict() if c is not None else None for key, c in self.components.items()}
        engine_entries = engine.save_state(tmp)  # collective: DeepSpeed writes its shards here
        if engine.is_main:
            shared = {
                **self.state.state_dict(),
                "world_size": engine.world_size,
                "fingerprint": fingerprint(self.cfg),
                **components,
                **engine_entries,
            }
            atomic_save(shared, tmp / SHARED)
        engine.barrier()  # every rank's part is on disk
        final = self.root / name
        if engine.is_main:
            (tmp / COMPLETE).write_text(name + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(self.root / LATEST, name + "\n")  # last: only now is it the latest
            self._prune()
        engine.barrier()
        return final

    def _weights_finite(self) -> bool:
        """Whether every rank's student is finite (collective)."""
        module = self.engine.module  # parameters and floating buffers (BatchNorm statistics)
        tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())
        flag = torch.tensor([0.0 if finite else 1.0])
        return float(self.engine.all_reduce_sum(flag)) == 0

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
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

    def resume(self) -> Optional[Resumed]:
        """Load the latest complete checkpoint, if any (``checkpoint.resume``).

        The RNG states are restored only at the world size that wrote them; at another
        one the caller re-deals the data position (``state.batches_in_epoch`` counts the
        old world size's batches) and the RNGs continue from the seeds."""
        cfg = self.cfg
        if cfg.checkpoint.resume == "never":
            return None
        path = self.latest()
        if path is None:
            return None
        shared = load_shared(path)
        differences = config_differences(shared["fingerprint"], fingerprint(cfg))
        if differences and cfg.checkpoint.resume != "force":
            raise ConfigError(
                f"checkpoint.resume: {path} was written with a different config; resuming would be wrong:\n  "
                + "\n  ".join(differences)
                + "\nuse a new run.output_dir, or checkpoint.resume=force"
            )
        written_by = shared["world_size"]
        self.engine.load_state(path, shared, written_by=written_by, step=shared["step"])
        for key, component in self.components.items():
            # None: no such component in this run or in the checkpoint (checkpoints
            # written before bad-data counting have no bad_data)
            if component is not None and shared.get(key) is not None:
                component.load_state_dict(shared[key])
        self.state.load_state_dict(shared)
        rank_file = path / f"rank{self.engine.rank}.pt"
        if written_by == self.engine.world_size and rank_file.exists():
            saved = torch.load(rank_file, map_location="cpu", weights_only=True)
            for key, rank_state in self.rank_states.items():
                rank_state.load_state_dict(saved[key])
        return Resumed(path, written_by)


def load_shared(path: Path) -> dict[str, Any]:
    """The ``shared.pt`` of checkpoint folder ``path``, on the CPU."""
    return torch.load(path / SHARED, map_location="cpu", weights_only=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root`` (a run's ``checkpoints/``), oldest
    first; ``step_N.tmp`` folders are never complete, whatever they hold."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp" and (p / COMPLETE).exists())


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then renamed: ``path`` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

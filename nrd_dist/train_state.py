"""What a run has done so far, as checkpointable objects.

:class:`TrainState` holds the trainer's counters and records (step, data position,
evaluation history, skipped steps); :class:`RNGState` this process's random number
generators. Both follow the ``state_dict`` / ``load_state_dict`` protocol of torch
modules, optimizers and schedulers (:class:`Stateful`), which is all the
:class:`~nrd_dist.checkpoint.Checkpointer` relies on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    """Anything a checkpoint can hold: a torch module, optimizer or scheduler, a
    teacher, the bad-data budget, :class:`TrainState`, :class:`RNGState`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """The trainer's progress, identical on every rank.

    ``step``: batches trained since the run began, by each rank (under gradient
    accumulation an optimizer step is ``engine.grad_accum_steps`` of them).

    ``(epoch, batches_in_epoch)``: the data position, 0-based: the next batch to train is
    batch ``batches_in_epoch`` of epoch ``epoch``. The stream is a function of (seed,
    epoch, rank, worker, batches consumed), so a run resumed at this position replays
    nothing and skips nothing.

    ``history``: ``"{val set}/{student|teacher}"`` -> ``[(epoch, top-1 %)]``, one entry
    per evaluation (epoch counted from 1).

    ``nonfinite_skipped``: steps skipped for a non-finite loss (``train.nonfinite: skip``).
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    nonfinite_skipped: int = 0

    def start_epoch(self, epoch: int) -> None:
        """Move the data position to the start of ``epoch``."""
        self.epoch, self.batches_in_epoch = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (``torch.load(weights_only=True)`` reads them back)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}
        self.nonfinite_skipped = state["nonfinite_skipped"]


class RNGState:
    """This process's generators: Python's, NumPy's global, torch's CPU and CUDA ones.
    Each rank has its own, so each rank saves its own."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            # NumPy's state as plain lists, loadable with weights_only=True
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

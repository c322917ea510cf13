"""One process on one device: the plain PyTorch engine, and the base of DDP.

The student is the model as built; a step is ``GradScaler`` backward (loss scaling only
under fp16), optional gradient-norm clipping, the optimizer step and the schedule's step.
The checkpoint holds plain state dicts in ``shared.pt``: ``student``, ``optimizer``,
``scaler``. The collectives are those of a world of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nrd_dist.config import Config
from nrd_dist.engines.base import Engine


class LocalEngine(Engine):
    """Single process on one device (plain ``python``)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = model
        self.model = model
        self.optimizer = optimizer

    def step(self, loss: torch.Tensor, scheduler=None) -> bool:
        """Backward, optional clipping, optimizer step (and the schedule's step); always
        changes the weights (no gradient accumulation outside DeepSpeed)."""
        assert self.optimizer is not None and self.model is not None
        self.scaler.scale(loss).backward()
        clip = self.cfg.optim.clip_grad_norm
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self.replicate_buffers()
        return True

    # ------------------------------------------------------------------ collectives: a world of one

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ checkpoint state

    def save_state(self, folder: Path) -> dict[str, Any]:
        """The plain state dicts, for ``shared.pt``; nothing written under ``folder``."""
        return {
            "scaler": self.scaler.state_dict(),
            "student": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state(self, folder: Path, entries: dict[str, Any], *, written_by: int, step: int) -> None:
        """Any world size: the state dicts are whole."""
        self.module.load_state_dict(entries["student"])
        self.optimizer.load_state_dict(entries["optimizer"])
        self.scaler.load_state_dict(entries["scaler"])

    @classmethod
    def student_from_checkpoint(cls, cfg: Config, folder: Path, entries: dict[str, Any]) -> dict[str, torch.Tensor]:
        return entries["student"]

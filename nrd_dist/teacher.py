"""The EMA teacher (DESIGN.md sections 1 and 2).

``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after optimizer steps, in fp32,
over every floating entry of the student's state dict (weights *and* BatchNorm running
statistics); integer buffers (``num_batches_tracked``) are copied. The teacher never
takes part in autograd: its parameters have ``requires_grad=False`` and its forward runs
under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMATeacher(nn.Module):
    """An exponential moving average of a student model.

    Args:
        student: the (unwrapped) student module; the teacher starts as an fp32 copy of it.
        decay: EMA decay ``beta`` in [0, 1] (paper: 0.99).
        warmup_steps: the first ``warmup_steps`` updates copy the student instead of
            averaging, so an early teacher is not dominated by the random initialisation.
        every: update on every ``every``-th call of :meth:`update` (the others are no-ops).
        bn: ``"eval"`` (running statistics; no collectives in the forward) or ``"batch"``
            (batch statistics; running statistics left to the EMA).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup_steps: int = 0,
                 every: int = 1, bn: str = "eval"):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"teacher.decay: must lie in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"teacher.every: must be >= 1, got {every}")
        if bn not in ("eval", "batch"):
            raise ValueError(f"teacher.bn: must be 'eval' or 'batch', got {bn!r}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.every = every
        self.bn = bn
        self.calls = 0  # update() calls so far, cadence counter
        self.num_updates = 0  # updates actually applied (copies included)
        self.module = copy.deepcopy(student).float()
        self.module.requires_grad_(False)
        if bn == "batch":
            # Batch statistics in the forward, but the forward must not move the running
            # statistics: those belong to the EMA.
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
        self._set_mode()

    def _set_mode(self) -> None:
        self.module.train(self.bn == "batch")

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher's mode is fixed by `bn`, whatever the surrounding model.train() says.
        super().train(mode)
        self._set_mode()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        """Move the teacher toward ``student`` (call after each optimizer step).

        Returns True when an update (EMA or warm-up copy) was applied.
        """
        self.calls += 1
        if self.calls % self.every:
            return False
        floats_t, floats_s, ints_t, ints_s = self._paired_tensors(student)
        if self.num_updates < self.warmup_steps:
            torch._foreach_copy_(floats_t, floats_s)
        elif floats_t:
            # lerp(t, s, w) = t + w (s - t) = decay * t + (1 - decay) * s, one fused kernel
            # per dtype/device group instead of a Python loop over hundreds of tensors.
            torch._foreach_lerp_(floats_t, floats_s, 1.0 - self.decay)
        if ints_t:
            torch._foreach_copy_(ints_t, ints_s)
        self.num_updates += 1
        return True

    def _paired_tensors(self, student: nn.Module):
        teacher_state = self.module.state_dict(keep_vars=True)
        student_state = student.state_dict(keep_vars=True)
        if teacher_state.keys() != student_state.keys():
            missing = sorted(set(teacher_state) ^ set(student_state))[:5]
            raise ValueError(f"teacher and student state dicts differ (e.g. {missing}); "
                             "pass the unwrapped student module")
        floats_t, floats_s, ints_t, ints_s = [], [], [], []
        for name, t in teacher_state.items():
            s = student_state[name].detach()
            if t.is_floating_point():
                floats_t.append(t.data)
                # Mixed-precision students: average in the teacher's fp32.
                floats_s.append(s if s.dtype == t.dtype else s.to(t.dtype))
            else:
                ints_t.append(t.data)
                ints_s.append(s)
        return floats_t, floats_s, ints_t, ints_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for ``x`` ([B, ...] -> [B, C]); no autograd graph."""
        with torch.inference_mode():
            return self.module(x)

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities in fp32, [B, C], usable as a constant in the student's loss.

        Inference-mode tensors cannot be saved for backward, and the JSD's KL(p_t || m)
        term saves ``p_t``; the clone (B x C floats, negligible) makes it a normal tensor.
        """
        with torch.inference_mode():
            probs = torch.softmax(self.module(x).float(), dim=-1)
        return probs.clone()

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # type: ignore[override]
        return {"model": self.module.state_dict(), "calls": self.calls, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True):  # type: ignore[override]
        self.calls = int(state["calls"])
        self.num_updates = int(state["num_updates"])
        return self.module.load_state_dict(state["model"], strict=strict)

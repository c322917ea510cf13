"""The EMA teacher (docs/design.md sections 1 and 2).

``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after optimizer steps, in fp32,
over every floating entry of the student's state dict (weights *and* BatchNorm running
statistics); integer buffers (``num_batches_tracked``) are copied. The teacher never
takes part in autograd: its parameters have ``requires_grad=False`` and its forward runs
without a graph.

:class:`Teacher` is the base of every teacher: the cadence (``every``, ``calls``,
``num_updates``), the decay of each update (optional warm-up copies, then a constant
``decay`` as in the paper, or a ramp toward it: see :func:`ramped_decay`), the range
checks of the settings (:func:`check_teacher_settings`, also behind ``TeacherConfig``),
and the state dict of those counters. A subclass says how the weights are held and
moved:

    _pull_toward(student, weight)   copy (weight None) or lerp toward the student
    full_state()                    the whole teacher state dict (collective if sharded)
    load_full_state(state, strict)  the inverse
    forward(x), predict_probs(x)    logits / fp32 probabilities, no autograd graph

:class:`EMATeacher` holds a replicated fp32 copy (one process, DDP, ZeRO-0/1/2); the
ZeRO-3 teacher, partitioned like its student, lives with the DeepSpeed engine
(:mod:`nrd_dist.engines.deepspeed`). :func:`verify_teacher` checks through the engine's
collectives that every rank holds the same teacher.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import itertools
from typing import Any, Optional

import torch
from torch import nn


def matching_precision(x: torch.Tensor):
    """Half-precision inputs (a DeepSpeed bf16/fp16 student) run the fp32 teacher under
    autocast of that dtype: the student's speed, the teacher's fp32 weights. Otherwise
    the caller's autocast state applies unchanged."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


RAMPS = ("none", "mean_teacher", "power")
BN_MODES = ("eval", "batch")


def check_teacher_settings(
    *,
    decay: float,
    warmup_steps: int,
    every: int,
    bn: str,
    ramp: str,
    ramp_power: float,
    ramp_gamma: float,
    prefix: str = "teacher",
) -> None:
    """The one range check of the teacher's settings, for the teachers' constructors and
    for ``TeacherConfig.validate``; raises ``ValueError("<prefix>.<field>: ...")``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{prefix}.decay: must lie in [0, 1], got {decay}")
    if warmup_steps < 0:
        raise ValueError(f"{prefix}.warmup_steps: must be >= 0, got {warmup_steps}")
    if every <= 0:
        raise ValueError(f"{prefix}.every: must be > 0, got {every}")
    if ramp not in RAMPS:
        raise ValueError(f"{prefix}.ramp: must be one of {', '.join(RAMPS)}, got {ramp!r}")
    if ramp_power <= 0:
        raise ValueError(f"{prefix}.ramp_power: must be > 0, got {ramp_power}")
    if ramp_gamma <= 0:
        raise ValueError(f"{prefix}.ramp_gamma: must be > 0, got {ramp_gamma}")
    if bn not in BN_MODES:
        raise ValueError(f"{prefix}.bn: must be 'eval' or 'batch', got {bn!r}")


def ramped_decay(t: int, decay: float, ramp: str = "none", power: float = 2 / 3, gamma: float = 1.0) -> float:
    """The decay of averaging update ``t`` (0-based, counted after the warm-up copies).

    * ``none``: ``decay``, constant (the NRD paper: 0.99).
    * ``mean_teacher``: ``min(decay, 1 - 1/(t+1))`` (Tarvainen & Valpola 2017). Until the
      cap the teacher is the plain mean of the ``t+1`` student snapshots it has been given.
      (Their code passes the step already incremented, so its first update uses 1/2 and
      averages the teacher's own initialisation in as one more snapshot.)
    * ``power``: ``min(decay, max(0, 1 - (1 + t/gamma)^(-power)))``, the ramp of ema_pytorch
      (``inv_gamma``, ``power``, ``min_value=0``; the NRD authors' code) and of timm's
      ModelEmaV3 (``warmup_gamma``, ``warmup_power``). gamma=1 with power 2/3 reaches 0.99 after
      ~1000 updates, 0.999 after ~31.6k; power 3/4 gets there sooner.

    Both ramps give 0 at ``t = 0``: the first averaging update copies the student.
    """
    if ramp == "none":
        return decay
    if ramp == "mean_teacher":
        return min(decay, 1.0 - 1.0 / (t + 1))
    if ramp == "power":
        return min(decay, max(0.0, 1.0 - (1.0 + t / gamma) ** -power))
    raise ValueError(f"teacher.ramp: must be one of {', '.join(RAMPS)}, got {ramp!r}")


class Teacher(nn.Module, abc.ABC):
    """What every EMA teacher shares: settings, cadence, decay schedule, counters.

    Args:
        decay: EMA decay ``beta`` in [0, 1] (paper: 0.99).
        warmup_steps: the first ``warmup_steps`` updates copy the student instead of
            averaging, so an early teacher is not dominated by the random initialisation.
        every: update on every ``every``-th call of :meth:`update` (the others are no-ops).
        bn: ``"eval"`` (running statistics; no collectives in the forward) or ``"batch"``
            (batch statistics; running statistics left to the EMA).
        ramp, ramp_power, ramp_gamma: the decay ramp after the warm-up (``"none"``: the
            constant ``decay``); see :func:`ramped_decay`.

    Counters: ``calls`` (every :meth:`update` call: the cadence) and ``num_updates``
    (updates applied, warm-up copies included: the position in the decay schedule).
    Both are in the state dict, so a resumed run continues the cadence and the ramp
    where it stopped.

    Update ``n`` (0-based: ``num_updates`` before it) copies the student when
    ``n < warmup_steps``; then the ramp starts at ``t = n - warmup_steps``. Both ramps
    begin with one more copy at ``t = 0``, so warm-up then ramp is ``warmup_steps + 1``
    copies and the ramp from ``t = 1``: exactly ema_pytorch's ``update_after_step =
    warmup_steps`` with ``update_every = 1``. ``t`` counts *applied* updates; ema_pytorch
    counts ``update()`` calls, so its ``update_every = k`` schedule is ``every: k`` with
    ``ramp_gamma = inv_gamma / k`` (and ``update_after_step`` a multiple of k,
    ``warmup_steps = update_after_step / k``).
    """

    sharded = False  # parameters partitioned over the ranks (ZeRO-3), not replicated
    module: nn.Module  # the averaged model, set by the subclass

    def __init__(
        self, decay: float, warmup_steps: int, every: int, bn: str, *, ramp: str, ramp_power: float, ramp_gamma: float
    ):
        check_teacher_settings(
            decay=decay,
            warmup_steps=warmup_steps,
            every=every,
            bn=bn,
            ramp=ramp,
            ramp_power=ramp_power,
            ramp_gamma=ramp_gamma,
        )
        super().__init__()
        self.decay, self.warmup_steps = decay, warmup_steps
        self.ramp, self.ramp_power, self.ramp_gamma = ramp, ramp_power, ramp_gamma
        self.every = every
        self.bn = bn
        self.calls = 0  # update() calls so far, cadence counter
        self.num_updates = 0  # updates actually applied (copies included)

    # ------------------------------------------------------------------ schedule

    def copies(self, update_index: int) -> bool:
        """Warm-up: update ``update_index`` copies the student instead of averaging."""
        return update_index < self.warmup_steps

    def decay_at(self, update_index: int) -> float:
        """The decay of update ``update_index``: 0 for a warm-up copy, else ``ramped_decay``."""
        if self.copies(update_index):
            return 0.0
        return ramped_decay(update_index - self.warmup_steps, self.decay, self.ramp, self.ramp_power, self.ramp_gamma)

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        """Move the teacher toward ``student``, the unwrapped student module (call after
        each optimizer step). Returns True when an update (EMA or warm-up copy) was applied."""
        self.calls += 1
        if self.calls % self.every:
            return False
        n = self.num_updates
        self._pull_toward(student, None if self.copies(n) else 1.0 - self.decay_at(n))
        self.num_updates += 1
        return True

    @abc.abstractmethod
    def _pull_toward(self, student: nn.Module, weight: Optional[float]) -> None:
        """Floating entries: ``lerp(teacher, student, weight)``, or a copy of the
        student when ``weight`` is None (warm-up); integer buffers: copied."""

    # ------------------------------------------------------------------ mode and state

    def train(self, mode: bool = True) -> "Teacher":
        # The teacher's mode is fixed by `bn`, whatever the surrounding model.train() says.
        super().train(mode)
        self.module.train(self.bn == "batch")
        return self

    @abc.abstractmethod
    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole teacher state dict on this rank (collective when ``sharded``)."""

    @abc.abstractmethod
    def load_full_state(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a whole teacher state dict (collective when ``sharded``)."""

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # type: ignore[override]
        """``{"model": full state dict, "calls": int, "num_updates": int}`` (the
        checkpoint's ``teacher`` entry; collective when ``sharded``)."""
        return {"model": self.full_state(), "calls": self.calls, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True):  # type: ignore[override]
        self.calls = int(state["calls"])
        self.num_updates = int(state["num_updates"])
        return self.load_full_state(state["model"], strict=strict)


def teacher_settings(teacher_cfg) -> dict[str, Any]:
    """The keyword arguments of either teacher class from the config's ``teacher``
    section (``nrd_dist.config.TeacherConfig``)."""
    names = ("decay", "warmup_steps", "every", "bn", "ramp", "ramp_power", "ramp_gamma")
    return {name: getattr(teacher_cfg, name) for name in names}


class EMATeacher(Teacher):
    """An exponential moving average of a student model, replicated on every rank.

    Args:
        student: the (unwrapped) student module; the teacher starts as an fp32 copy of it.
        decay, warmup_steps, every, bn, ramp, ramp_power, ramp_gamma: see :class:`Teacher`.
    """

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.99,
        warmup_steps: int = 0,
        every: int = 1,
        bn: str = "eval",
        *,
        ramp: str = "none",
        ramp_power: float = 2 / 3,
        ramp_gamma: float = 1.0,
    ):
        super().__init__(decay, warmup_steps, every, bn, ramp=ramp, ramp_power=ramp_power, ramp_gamma=ramp_gamma)
        self.module = copy.deepcopy(student).float()
        self.module.requires_grad_(False)
        if bn == "batch":
            # Batch statistics in the forward, but the forward must not move the running
            # statistics: those belong to the EMA.
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
        self.module.train(self.bn == "batch")

    def _pull_toward(self, student: nn.Module, weight: Optional[float]) -> None:
        floats_t, floats_s, ints_t, ints_s = self._paired_tensors(student)
        if weight is None:
            torch._foreach_copy_(floats_t, floats_s)
        elif floats_t:
            # lerp(t, s, w) = t + w (s - t) = decay * t + (1 - decay) * s, one fused kernel
            # per dtype/device group instead of a Python loop over hundreds of tensors.
            torch._foreach_lerp_(floats_t, floats_s, weight)
        if ints_t:
            torch._foreach_copy_(ints_t, ints_s)

    def _paired_tensors(self, student: nn.Module):
        """(teacher floats, student floats, teacher ints, student ints), built once per
        student: walking two state dicts costs more Python time than the fused lerp
        itself on a GPU (ResNet-50: ~2 ms against a ~0.1 ms update, measured on an H200).
        The tensors are updated in place by the optimizer and by load_state_dict, so
        the cached references stay valid while the storage signature holds; a student
        in another dtype is re-cast each time."""
        # Rebuilt if any student tensor moved to new storage (``p.data = ...``, as
        # DeepSpeed does when it flattens parameters): cheap to check, silent if missed.
        signature = tuple(t.data_ptr() for t in itertools.chain(student.parameters(), student.buffers()))
        cache = getattr(self, "_pairs", None)
        if cache is not None and cache[0] == signature:
            _, floats_t, floats_s, ints_t, ints_s, casts = cache
            if casts:  # low-precision student: re-read its current values in fp32
                floats_s = [s.detach().to(t.dtype) if cast else s for t, s, cast in zip(floats_t, floats_s, casts)]
            return floats_t, floats_s, ints_t, ints_s
        teacher_state = self.module.state_dict(keep_vars=True)
        student_state = student.state_dict(keep_vars=True)
        if teacher_state.keys() != student_state.keys():
            missing = sorted(set(teacher_state) ^ set(student_state))[:5]
            raise ValueError(
                f"teacher and student state dicts differ (e.g. {missing}); pass the unwrapped student module"
            )
        floats_t, floats_s, ints_t, ints_s, casts, raw_s = [], [], [], [], [], []
        for name, t in teacher_state.items():
            s = student_state[name].detach()
            if t.is_floating_point():
                floats_t.append(t.data)
                raw_s.append(s)
                casts.append(s.dtype != t.dtype)
                # Mixed-precision students: average in the teacher's fp32.
                floats_s.append(s if s.dtype == t.dtype else s.to(t.dtype))
            else:
                ints_t.append(t.data)
                ints_s.append(s)
        self._pairs = (signature, floats_t, raw_s, ints_t, ints_s, casts if any(casts) else [])
        return floats_t, floats_s, ints_t, ints_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for ``x`` ([B, ...] -> [B, C]); no autograd graph."""
        with torch.inference_mode(), matching_precision(x):
            return self.module(x.float())

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities in fp32, [B, C], usable as a constant in the student's loss.

        Inference-mode tensors cannot be saved for backward, and the JSD's KL(p_t || m)
        term saves ``p_t``; the clone (B x C floats, negligible) makes it a normal tensor.
        """
        with torch.inference_mode(), matching_precision(x):
            probs = torch.softmax(self.module(x.float()).float(), dim=-1)
        return probs.clone()

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_full_state(self, state: dict[str, torch.Tensor], strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)


# ----------------------------------------------------------------------------- cross-rank check


def teacher_checksum(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-tensor float64 sums and position-weighted sums: equal states give bitwise
    equal checksums, and a divergence anywhere (even a permutation) changes them."""
    rows = []
    for tensor in state.values():
        flat = tensor.detach().double().flatten().cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) % 97 + 1
        rows.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


class TeacherDivergedError(RuntimeError):
    pass


def verify_teacher(teacher: Teacher, step: int, engine) -> None:
    """Stop the run if the teacher differs between ranks (collective: every rank calls
    it). ``engine`` provides ``distributed`` and ``all_gather`` (an
    :class:`~nrd_dist.engines.base.Engine`)."""
    if not engine.distributed:
        return
    state = teacher.full_state()
    gathered = engine.all_gather(teacher_checksum(state))
    names = list(state)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            row = int((other != gathered[0]).any(dim=1).nonzero()[0])
            raise TeacherDivergedError(
                f"EMA teacher diverged across ranks at step {step}: rank {rank} differs from rank 0 "
                f"first at {names[row]!r} (checksums {other[row].tolist()} vs {gathered[0][row].tolist()}); "
                "the teacher must be identical on every rank"
            )

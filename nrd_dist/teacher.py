"""The EMA teacher (DESIGN.md sections 1 and 2).

``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after optimizer steps, in fp32,
over every floating entry of the student's state dict (weights *and* BatchNorm running
statistics); integer buffers (``num_batches_tracked``) are copied. The teacher never
takes part in autograd: its parameters have ``requires_grad=False`` and its forward runs
under ``torch.inference_mode``.

The decay of each update comes from one rule, :meth:`DecaySchedule.decay_at`, shared by
both teachers: optional warm-up copies, then a constant ``decay`` (the paper) or a ramp
toward it (``ramp``: the mean teacher's or the power ramp of ema_pytorch and timm).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import torch
from torch import nn


def _matching_precision(x: torch.Tensor):
    """Half-precision inputs (a DeepSpeed bf16/fp16 student) run the fp32 teacher under
    autocast of that dtype: the student's speed, the teacher's fp32 weights. Otherwise
    the caller's autocast state applies unchanged."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


RAMPS = ("none", "mean_teacher", "power")


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


class DecaySchedule:
    """Which decay update number ``n`` (0-based: ``num_updates`` before it) uses, for both
    teachers, so the ramp logic exists once.

    Updates ``n < warmup_steps`` copy the student; then the ramp starts at
    ``t = n - warmup_steps``. Both ramps begin with one more copy at ``t = 0``, so warm-up
    then ramp is ``warmup_steps + 1`` copies and the ramp from ``t = 1``: exactly
    ema_pytorch's ``update_after_step = warmup_steps`` with ``update_every = 1``. ``t``
    counts *applied* updates; ema_pytorch counts ``update()`` calls, so its
    ``update_every = k`` schedule is ``every: k`` with ``ramp_gamma = inv_gamma / k`` (and
    ``update_after_step`` a multiple of k, ``warmup_steps = update_after_step / k``). The
    counter is ``num_updates``, which the teacher's state dict saves: a resumed run
    continues the ramp where it stopped.
    """

    def set_schedule(self, decay: float, warmup_steps: int, ramp: str, ramp_power: float,
                     ramp_gamma: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"teacher.decay: must lie in [0, 1], got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"teacher.warmup_steps: must be >= 0, got {warmup_steps}")
        if ramp not in RAMPS:
            raise ValueError(f"teacher.ramp: must be one of {', '.join(RAMPS)}, got {ramp!r}")
        if ramp_power <= 0:
            raise ValueError(f"teacher.ramp_power: must be > 0, got {ramp_power}")
        if ramp_gamma <= 0:
            raise ValueError(f"teacher.ramp_gamma: must be > 0, got {ramp_gamma}")
        self.decay, self.warmup_steps = decay, warmup_steps
        self.ramp, self.ramp_power, self.ramp_gamma = ramp, ramp_power, ramp_gamma

    def copies(self, update_index: int) -> bool:
        """Warm-up: update ``update_index`` copies the student instead of averaging."""
        return update_index < self.warmup_steps

    def decay_at(self, update_index: int) -> float:
        """The decay of update ``update_index``: 0 for a warm-up copy, else ``ramped_decay``."""
        if self.copies(update_index):
            return 0.0
        return ramped_decay(update_index - self.warmup_steps, self.decay, self.ramp,
                            self.ramp_power, self.ramp_gamma)


class EMATeacher(DecaySchedule, nn.Module):
    """An exponential moving average of a student model.

    Args:
        student: the (unwrapped) student module; the teacher starts as an fp32 copy of it.
        decay: EMA decay ``beta`` in [0, 1] (paper: 0.99).
        warmup_steps: the first ``warmup_steps`` updates copy the student instead of
            averaging, so an early teacher is not dominated by the random initialisation.
        every: update on every ``every``-th call of :meth:`update` (the others are no-ops).
        bn: ``"eval"`` (running statistics; no collectives in the forward) or ``"batch"``
            (batch statistics; running statistics left to the EMA).
        ramp, ramp_power, ramp_gamma: the decay ramp after the warm-up (``"none"``: the
            constant ``decay``); see :func:`ramped_decay` and :class:`DecaySchedule`.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup_steps: int = 0,
                 every: int = 1, bn: str = "eval", *, ramp: str = "none", ramp_power: float = 2 / 3,
                 ramp_gamma: float = 1.0):
        super().__init__()
        if every < 1:
            raise ValueError(f"teacher.every: must be >= 1, got {every}")
        if bn not in ("eval", "batch"):
            raise ValueError(f"teacher.bn: must be 'eval' or 'batch', got {bn!r}")
        self.set_schedule(decay, warmup_steps, ramp, ramp_power, ramp_gamma)
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
        if self.copies(self.num_updates):
            torch._foreach_copy_(floats_t, floats_s)
        elif floats_t:
            # lerp(t, s, w) = t + w (s - t) = decay * t + (1 - decay) * s, one fused kernel
            # per dtype/device group instead of a Python loop over hundreds of tensors.
            torch._foreach_lerp_(floats_t, floats_s, 1.0 - self.decay_at(self.num_updates))
        if ints_t:
            torch._foreach_copy_(ints_t, ints_s)
        self.num_updates += 1
        return True

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
            raise ValueError(f"teacher and student state dicts differ (e.g. {missing}); "
                             "pass the unwrapped student module")
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
        with torch.inference_mode(), _matching_precision(x):
            return self.module(x.float())

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities in fp32, [B, C], usable as a constant in the student's loss.

        Inference-mode tensors cannot be saved for backward, and the JSD's KL(p_t || m)
        term saves ``p_t``; the clone (B x C floats, negligible) makes it a normal tensor.
        """
        with torch.inference_mode(), _matching_precision(x):
            probs = torch.softmax(self.module(x.float()).float(), dim=-1)
        return probs.clone()

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # type: ignore[override]
        return {"model": self.module.state_dict(), "calls": self.calls, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True):  # type: ignore[override]
        self.calls = int(state["calls"])
        self.num_updates = int(state["num_updates"])
        return self.module.load_state_dict(state["model"], strict=strict)


class ZeroThreeTeacher(DecaySchedule, nn.Module):
    """The EMA teacher under ZeRO-3 (DESIGN.md section 2): partitioned exactly like the
    student and updated shard-locally, with no full gather per step.

    The teacher is a second DeepSpeed engine (stage 3, fp32, no optimizer). Each update
    lerps every teacher parameter's local partition (``ds_tensor``) toward the student's
    fp32 master partition (``safe_get_local_fp32_param``); buffers (BatchNorm statistics)
    are not partitioned by ZeRO-3 and are averaged like :class:`EMATeacher` does. Its
    forward gathers parameters like any ZeRO-3 forward.
    """

    def __init__(self, template: nn.Module, engine, decay: float = 0.99, warmup_steps: int = 0,
                 every: int = 1, bn: str = "eval", *, ramp: str = "none", ramp_power: float = 2 / 3,
                 ramp_gamma: float = 1.0):
        super().__init__()
        import deepspeed

        if bn != "eval":
            raise ValueError("teacher.bn: only 'eval' is supported with ZeRO-3")
        self.set_schedule(decay, warmup_steps, ramp, ramp_power, ramp_gamma)
        self.every, self.bn = every, bn
        self.calls = 0
        self.num_updates = 0
        self.engine = engine
        template = copy.deepcopy(template).float()
        template.requires_grad_(False)
        self.teacher_engine, *_ = deepspeed.initialize(model=template, config=engine.ds_config(train=False))
        self.module = self.teacher_engine.module
        self.module.eval()

    def train(self, mode: bool = True) -> "ZeroThreeTeacher":
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        from deepspeed.utils import safe_get_local_fp32_param

        self.calls += 1
        if self.calls % self.every:
            return False
        teacher_params = [p.ds_tensor for p in self.module.parameters()]
        student_params = [safe_get_local_fp32_param(p).view(-1) for p in student.parameters()]
        teacher_buffers = [b for b in self.module.buffers()]
        student_buffers = [b.detach() for b in student.buffers()]
        float_t = teacher_params + [b for b in teacher_buffers if b.is_floating_point()]
        float_s = [s.to(t.dtype) for t, s in zip(teacher_params, student_params)]
        float_s += [s.to(t.dtype) for t, s in zip(teacher_buffers, student_buffers) if t.is_floating_point()]
        if self.copies(self.num_updates):
            torch._foreach_copy_(float_t, float_s)
        else:
            torch._foreach_lerp_(float_t, float_s, 1.0 - self.decay_at(self.num_updates))
        for t, s in zip(teacher_buffers, student_buffers):
            if not t.is_floating_point():
                t.copy_(s)
        self.num_updates += 1
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _matching_precision(x):  # ZeRO-3's gather hooks need no_grad, not inference_mode
            return self.module(x.float())

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _matching_precision(x):
            return torch.softmax(self.module(x.float()).float(), dim=-1)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole teacher state, gathered (collective: call on every rank)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:  # type: ignore[override]
        return {"model": self.full_state(), "calls": self.calls, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True):  # type: ignore[override]
        """Load a full (gathered) state into the partitions (collective)."""
        import deepspeed

        self.calls = int(state["calls"])
        self.num_updates = int(state["num_updates"])
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            # every rank loads the same full state; rank 0's copy is what gets partitioned
            return self.module.load_state_dict(state["model"], strict=strict)


def teacher_state(teacher) -> dict[str, torch.Tensor]:
    """The full teacher state on this rank (gathers under ZeRO-3: call on every rank)."""
    if isinstance(teacher, ZeroThreeTeacher):
        return teacher.full_state()
    return teacher.module.state_dict()


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


def verify_teacher(teacher, step: int) -> None:
    """Stop the run if the teacher differs between ranks (collective: every rank calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    state = teacher_state(teacher)
    local = teacher_checksum(state)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    _all_gather(local, gathered)
    names = list(state)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            row = int((other != gathered[0]).any(dim=1).nonzero()[0])
            raise TeacherDivergedError(
                f"EMA teacher diverged across ranks at step {step}: rank {rank} differs from rank 0 "
                f"first at {names[row]!r} (checksums {other[row].tolist()} vs {gathered[0][row].tolist()}); "
                "the teacher must be identical on every rank")


def _all_gather(local: torch.Tensor, out: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        parts = [torch.empty_like(local, device=device) for _ in out]
        dist.all_gather(parts, local.to(device))
        for dst, src in zip(out, parts):
            dst.copy_(src.cpu())
    else:
        dist.all_gather(out, local)

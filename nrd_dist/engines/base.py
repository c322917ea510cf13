"""The engine interface: where the student runs, how a loss becomes an optimizer step,
and how its state reaches a checkpoint.

The train step, the checkpointer and the exporter talk only to this interface, so one
process, DDP and DeepSpeed ZeRO 0-3 share one training loop (in the manner of Lightning
Fabric's ``Strategy``, which owns save and load, and torchtitan's ``parallelisms``)::

    engine.prepare_module(model)            device, memory format, SyncBatchNorm
    engine.setup(model, optimizer)          wraps the model as the backend needs
    engine.make_teacher(template)           the EMA teacher that fits this engine
    with engine.autocast():
        logits = engine.model(engine.to_device(x))
    engine.step(loss, scheduler) -> bool    backward, clip, optimizer step; False inside
                                            a gradient-accumulation window
    engine.module                           the unwrapped student (EMA, evaluation)

    engine.all_reduce_sum(t), engine.all_gather(t), engine.barrier(), engine.close()

    engine.save_state(folder) -> dict       this engine's part of a checkpoint (collective)
    engine.load_state(folder, entries, written_by=, step=)
    engine.consolidated_state_dict()        the full student state dict (collective)
    type(engine).student_from_checkpoint(folder, entries)   offline: no process group

Subclasses: :class:`~nrd_dist.engines.local.LocalEngine` (one process),
:class:`~nrd_dist.engines.ddp.DDPEngine` and
:class:`~nrd_dist.engines.deepspeed.DeepSpeedEngine`. The rank, world size and device
come from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (one process: 0, 1, 0).
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from nrd_dist.config import Config
from nrd_dist.teacher import EMATeacher, Teacher, teacher_settings


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it (fp16 on older GPUs) and fp32 on CPU,
    where bf16 autocast is slower than fp32 without AMX and gains nothing here."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Engine(abc.ABC):
    """Device, precision and the shared helpers; the abstract methods are what each
    backend provides. Every method that says *collective* must be called by every rank,
    in the same order."""

    # channels_last is faster on a GPU and, measured here, on CPU as well (small CNN,
    # PreActResNet-34, ResNet-50; BENCHMARKS.md). An engine sets this False where its
    # CPU path is only tested with contiguous weights.
    channels_last_on_cpu = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if cfg.engine.sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise ValueError("engine.sync_bn: torch's SyncBatchNorm runs on CUDA only; this run is on CPU")
        self.precision = resolve_precision(cfg.engine.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("engine.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.channels_last = self.device.type == "cuda" or self.channels_last_on_cpu
        self.model: Optional[nn.Module] = None  # what the forward calls (possibly wrapped)
        self.module: Optional[nn.Module] = None  # the plain student
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ model and step

    def prepare_module(self, model: nn.Module) -> nn.Module:
        """Device and memory format, before the optimizer is built over its parameters."""
        if self.cfg.engine.sync_bn and self.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @abc.abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Set ``model`` (what the forward calls), ``module`` (the plain student) and
        ``optimizer`` from the prepared student and its optimizer."""

    def make_teacher(self, template: nn.Module) -> Teacher:
        """The EMA teacher for this engine, started from ``template`` (a copy of the
        student taken before :meth:`setup`). Here parameters are replicated on every rank,
        so each rank keeps its own fp32 EMA and they stay identical with no
        communication (checked by :func:`nrd_dist.teacher.verify_teacher`)."""
        return EMATeacher(template, **teacher_settings(self.cfg.teacher))

    def compile(self, *modules: Optional[nn.Module]) -> None:
        """torch.compile in place (nn.Module.compile), after the teacher's copy of the
        student: state-dict keys, parameters and the EMA pairing stay those of the plain
        modules, so checkpoints do not depend on ``engine.compile``. ``None`` is skipped."""
        for module in modules:
            if module is not None:
                module.compile(mode=self.cfg.engine.compile_mode)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch ([B, C, H, W] or any shape) on this rank's device, in the model's layout."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield

    @abc.abstractmethod
    def step(self, loss: torch.Tensor, scheduler=None) -> bool:
        """Backward, optional clipping, optimizer step and the schedule's step; returns
        whether the weights changed (False inside a gradient-accumulation window)."""

    def replicate_buffers(self) -> None:
        """Average floating buffers (BatchNorm running statistics) over the ranks.

        Each rank's forward updates them from its own batch, so without this they differ
        between ranks after every step, and so would every rank's EMA teacher. One small
        coalesced all-reduce per step makes parameters *and* buffers replicated, which
        is what lets every rank keep its own, identical, teacher.
        """
        if not self.distributed:
            return
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
        flat = self.all_reduce_sum(flat) / self.world_size
        offset = 0
        for b in buffers:
            n = b.numel()
            b.data.copy_(flat[offset : offset + n].view_as(b))
            offset += n

    # ------------------------------------------------------------------ collectives

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks, on ``tensor``'s device
        (collective; the input is left unchanged)."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all), indexed by rank, on ``tensor``'s
        device (collective)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait until every rank gets here (collective)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the process group, if any; the engine is unusable afterwards."""

    # ------------------------------------------------------------------ checkpoint state

    @abc.abstractmethod
    def save_state(self, folder: Path) -> dict[str, Any]:
        """Save the student, its optimizer and the loss scaler into checkpoint ``folder``
        (collective; the folder exists). Files the engine writes itself go under
        ``folder``; the returned entries go into the checkpoint's ``shared.pt``, written
        by rank 0 (other ranks' entries are not used)."""

    @abc.abstractmethod
    def load_state(self, folder: Path, entries: dict[str, Any], *, written_by: int, step: int) -> None:
        """Restore what :meth:`save_state` saved (collective). ``entries`` is the loaded
        ``shared.pt``; ``written_by`` the world size that wrote the checkpoint; ``step``
        the batches trained when it was written. Raises ``ConfigError`` when this engine
        cannot load it at this world size."""

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The full student state dict on every rank (collective: engines that partition
        the parameters gather them). Here the parameters are whole on every rank."""
        return self.module.state_dict()

    @classmethod
    @abc.abstractmethod
    def student_from_checkpoint(cls, cfg: Config, folder: Path, entries: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The student's full state dict from checkpoint ``folder`` (``entries``: its
        ``shared.pt``), in one process without a process group (tools/export_model.py)."""

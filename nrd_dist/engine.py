"""Execution engines: where the model runs and how a loss becomes an optimizer step.

The train step talks only to this small interface, so single-process, DDP and (later)
DeepSpeed runs share one loop:

    engine = build_engine(cfg)             # devices, process group, precision
    engine.setup(model, optimizer)         # wraps the model (DDP) as the backend needs
    with engine.autocast():
        logits = engine.model(x)
    engine.step(loss, scheduler)           # backward, unscale, clip, step, zero_grad
    engine.module                          # the unwrapped student (for the EMA teacher)
    engine.all_reduce_sum(tensor)          # exact evaluation across ranks

One process (plain ``python``) or many (``torchrun`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``): NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from nrd_dist.config import Config


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it (fp16 on older GPUs) and fp32 on CPU,
    where bf16 autocast is slower than fp32 without AMX and gains nothing here."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Engine:
    """Single process on one device; also the base of the distributed engines."""

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
        self.precision = resolve_precision(cfg.engine.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("engine.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.channels_last = self.device.type == "cuda"
        self.model: Optional[nn.Module] = None
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = model
        self.model = model
        self.optimizer = optimizer

    def prepare_module(self, model: nn.Module) -> nn.Module:
        """Device and memory format, before the optimizer is built over its parameters."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
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

    def step(self, loss: torch.Tensor, scheduler=None) -> Optional[float]:
        """Backward, optional clipping, optimizer step; returns the gradient norm if clipped."""
        assert self.optimizer is not None and self.model is not None
        self.scaler.scale(loss).backward()
        grad_norm = None
        clip = self.cfg.optim.clip_grad_norm
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return grad_norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DDPEngine(Engine):
    """DistributedDataParallel over a torchrun-launched process group."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = model
        self.optimizer = optimizer
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        # gradient_as_bucket_view saves one gradient-sized copy per step.
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        reduced = tensor.to(device).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_engine(cfg: Config) -> Engine:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.engine.backend == "deepspeed":
        raise ValueError("engine.backend: 'deepspeed' is not available yet in this version; use 'ddp'")
    return DDPEngine(cfg) if world_size > 1 else Engine(cfg)

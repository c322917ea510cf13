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
import warnings
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
        if cfg.engine.sync_bn and self.world_size > 1 and self.device.type != "cuda":
            raise ValueError("engine.sync_bn: torch's SyncBatchNorm runs on CUDA only; this run is on CPU")
        self.precision = resolve_precision(cfg.engine.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("engine.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # channels_last is faster on a GPU and, measured here, on CPU as well (small CNN,
        # PreActResNet-34, ResNet-50; BENCHMARKS.md). Not under DeepSpeed on CPU, whose ZeRO
        # partitioning is only tested here with contiguous weights. On a GPU the inputs are
        # channels_last under DeepSpeed too; ZeRO-1/2 then re-point the weights at its flat
        # (contiguous) buffers, so the layout there is not fully channels_last.
        self.channels_last = self.device.type == "cuda" or cfg.engine.backend != "deepspeed"
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

    def make_teacher(self, template: nn.Module):
        """The EMA teacher for this engine. Parameters are replicated on every rank
        (one process, DDP, ZeRO-1/2), so each rank keeps its own fp32 EMA and they stay
        identical with no communication (checked by ``verify_teacher``)."""
        from nrd_dist.teacher import EMATeacher

        t = self.cfg.teacher
        return EMATeacher(template, t.decay, t.warmup_steps, t.every, t.bn,
                          ramp=t.ramp, ramp_power=t.ramp_power, ramp_gamma=t.ramp_gamma)

    def prepare_module(self, model: nn.Module) -> nn.Module:
        """Device and memory format, before the optimizer is built over its parameters."""
        if self.cfg.engine.sync_bn and self.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def compile(self, *modules: Optional[nn.Module]) -> None:
        """torch.compile in place (nn.Module.compile), after the teacher's copy of the
        student: state-dict keys, parameters and the EMA pairing stay those of the plain
        modules, so checkpoints do not depend on ``engine.compile``. ``None`` is skipped."""
        for module in modules:
            if module is not None:
                module.compile(mode=self.cfg.engine.compile_mode)

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

    def step(self, loss: torch.Tensor, scheduler=None) -> bool:
        """Backward, optional clipping, optimizer step (and the schedule's step); returns
        whether the weights changed (False inside a gradient-accumulation window)."""
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
            b.data.copy_(flat[offset:offset + n].view_as(b))
            offset += n

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
        init_process_group("nccl" if self.device.type == "cuda" else "gloo", collective_timeout(cfg))

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = model
        self.optimizer = optimizer
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        # gradient_as_bucket_view saves one gradient-sized copy per step.
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                             bucket_cap_mb=self.cfg.engine.ddp_bucket_cap_mb)

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


class DeepSpeedEngine(Engine):
    """DeepSpeed with ZeRO stage ``engine.zero_stage`` (0-3); SGD runs through
    ``zero_allow_untested_optimizer``. Under bf16/fp16 DeepSpeed keeps the module in
    half precision with fp32 master weights, so autocast is not used; inputs are cast
    to the module's dtype and the loss is computed in fp32 by the loss itself."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        import logging

        import deepspeed
        from deepspeed.utils import logger as deepspeed_logger

        if self.rank != 0:  # logs from rank 0 only; warnings and errors from every rank
            deepspeed_logger.setLevel(logging.WARNING)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("engine.precision: fp16 needs a GPU")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cpu":
            skip_deepspeed_shm_kernels(deepspeed)
        # DeepSpeed's ZeRO calls the collectives torch 2.14 deprecated under these names;
        # nothing a user can act on, and the warning came back at every step (29 lines in a
        # 20-step ZeRO-3 run: filter changes elsewhere reset Python's once-per-place memory).
        deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
        warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)
        init_process_group(backend, collective_timeout(cfg))
        deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout(cfg))  # adopts the group
        self.autocast_dtype = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def ds_config(self, train: bool = True) -> dict:
        cfg = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.engine.grad_accum_steps if train else 1,
            "zero_optimization": {"stage": cfg.engine.zero_stage if train else 3},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,  # our own logging; DeepSpeed's would be per rank
        }
        if not train:
            # The teacher has no optimizer to refresh gathered copies: every parameter must
            # be gathered from its (EMA-updated) partition at each forward, none persisted.
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # Always explicit: DeepSpeed 0.19 clips to 1.0 when the key is absent, which would
        # silently shrink SGD steps (measured: 0.23x on the first step of the tests' MLP).
        config["gradient_clipping"] = cfg.optim.clip_grad_norm if train and cfg.optim.clip_grad_norm else 0.0
        if train and self.precision == "bf16":
            config["bf16"] = {"enabled": True}
        if train and self.precision == "fp16":
            config["fp16"] = {"enabled": True}
        return config

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import deepspeed

        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                config=self.ds_config())
        self.module = self.model.module

    def make_teacher(self, template: nn.Module):
        if self.cfg.engine.zero_stage == 3:
            from nrd_dist.teacher import ZeroThreeTeacher

            t = self.cfg.teacher
            return ZeroThreeTeacher(template, self, t.decay, t.warmup_steps, t.every, t.bn,
                                    ramp=t.ramp, ramp_power=t.ramp_power, ramp_gamma=t.ramp_gamma)
        return super().make_teacher(template)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        return super().to_device(images).to(self.input_dtype)

    def step(self, loss: torch.Tensor, scheduler=None) -> bool:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)
        self.model.step()  # applies the update only at accumulation boundaries
        if boundary:
            if scheduler is not None:
                scheduler.step()
            self.replicate_buffers()
        return boundary

    all_reduce_sum = DDPEngine.all_reduce_sum
    barrier = DDPEngine.barrier
    close = DDPEngine.close


def skip_deepspeed_shm_kernels(deepspeed) -> None:
    """Keep DeepSpeed's CPU communication backend from JIT-compiling its shared-memory
    all-reduce kernels (``deepspeed_shm_comm``): ~50 s of C++ on 2 cores for each new
    install path, paid by the first run of every fresh venv. They serve only
    ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces through the
    torch process group either way. Marked incompatible, the op is skipped exactly as on a
    machine that cannot build it."""
    compatible_ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible_ops, dict):
        compatible_ops["deepspeed_shm_comm"] = False


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` that survives torchrun restarts.

    Under torchrun's c10d rendezvous the workers share the agent's store, and torch
    (2.14) reuses it across restarts without a per-attempt prefix: a restarted group
    then reads the dead attempt's gloo addresses and fails ("Connection refused" /
    "Connection reset by peer"). Prefixing the store by the restart count fixes that.
    """
    if dist.is_initialized():
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        world_size = int(os.environ["WORLD_SIZE"])
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                    is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"/nrd_dist/attempt_{attempt}", agent_store)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def collective_timeout(cfg: Config) -> datetime.timedelta:
    """A dead rank fails the job after this long instead of hanging it forever."""
    return datetime.timedelta(seconds=cfg.engine.timeout_s)


def build_engine(cfg: Config) -> Engine:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.engine.backend == "deepspeed":
        if "RANK" not in os.environ:  # plain `python`: a world of one for DeepSpeed
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        return DeepSpeedEngine(cfg)
    return DDPEngine(cfg) if world_size > 1 else Engine(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

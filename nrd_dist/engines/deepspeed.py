"""DeepSpeed with ZeRO stage ``engine.zero_stage`` (0-3): the engine, its ZeRO-3 teacher
and its checkpoint state. The only module that imports DeepSpeed (with
:mod:`nrd_dist.engines.deepspeed_portable`, imported from here only).

Precision: under bf16/fp16 DeepSpeed keeps the module in half precision with fp32
master weights, so autocast is not used; inputs are cast to the module's dtype and the
loss is computed in fp32 by the loss itself. SGD runs through
``zero_allow_untested_optimizer``.

Checkpoint files, under the checkpoint folder::

    deepspeed/state/      DeepSpeed's own files, every rank writes its part
    zero_portable.pt      ZeRO-1/2/3 with checkpoint.zero_portable: full fp32 weights and
                          optimizer state gathered on rank 0 (loads at any world size)

and the (disabled) loss scaler's state in ``shared.pt``. DeepSpeed's files load only at
the world size that wrote them; a ZeRO checkpoint read at another world size loads
``zero_portable.pt`` instead.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
from deepspeed.utils import logger as deepspeed_logger
from deepspeed.utils import safe_get_local_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from nrd_dist.checkpoint import atomic_save
from nrd_dist.config import Config, ConfigError
from nrd_dist.engines import deepspeed_portable
from nrd_dist.engines.base import Engine
from nrd_dist.engines.process_group import (
    ProcessGroupCollectives,
    collective_timeout,
    communication_backend,
    init_process_group,
)
from nrd_dist.teacher import Teacher, matching_precision, teacher_settings

DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint files, under the checkpoint folder
TAG = "state"  # DeepSpeed's checkpoint tag (its sub-folder)
PORTABLE = "zero_portable.pt"


class DeepSpeedEngine(ProcessGroupCollectives, Engine):
    """A DeepSpeed engine over the torchrun / DeepSpeed-launcher process group."""

    # Not channels_last under DeepSpeed on CPU, whose ZeRO partitioning is only tested
    # here with contiguous weights. On a GPU the inputs are channels_last under DeepSpeed
    # too; ZeRO-1/2 then re-point the weights at its flat (contiguous) buffers, so the
    # layout there is not fully channels_last.
    channels_last_on_cpu = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if self.rank != 0:  # logs from rank 0 only; warnings and errors from every rank
            deepspeed_logger.setLevel(logging.WARNING)
        backend = communication_backend(self.device)
        if self.device.type == "cpu":
            skip_deepspeed_shm_kernels()
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

    @property
    def sharded(self) -> bool:
        """Whether DeepSpeed's files hold per-rank optimizer partitions (ZeRO-1/2/3)."""
        return self.cfg.engine.zero_stage > 0

    def ds_config(self, train: bool = True) -> dict:
        """DeepSpeed's config for the student (``train``) or for the ZeRO-3 teacher (no
        optimizer, fp32)."""
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

    # ------------------------------------------------------------------ model and step

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config()
        )
        self.module = self.model.module

    def make_teacher(self, template: nn.Module) -> Teacher:
        """ZeRO-3: a teacher partitioned like the student; otherwise the replicated one."""
        if self.cfg.engine.zero_stage == 3:
            return ZeroThreeTeacher(template, self.ds_config(train=False), **teacher_settings(self.cfg.teacher))
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

    # ------------------------------------------------------------------ checkpoint state

    def save_state(self, folder: Path) -> dict[str, Any]:
        """DeepSpeed's files (every rank) and, for ZeRO, the portable copy (gathered to
        rank 0); ``shared.pt`` gets the scaler's state only."""
        self.model.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=TAG)  # every rank writes its part
        if self.sharded and self.cfg.checkpoint.zero_portable:
            portable = self.portable_state()
            if self.is_main:
                atomic_save(portable, folder / PORTABLE)
        return {"scaler": self.scaler.state_dict()}

    def portable_state(self) -> Optional[dict[str, Any]]:
        """ZeRO-1/2/3: the full fp32 weights, buffers and optimizer state keyed by
        parameter name, gathered on rank 0 (None elsewhere); collective. Loads at any
        world size (:meth:`load_portable_state`); see :mod:`.deepspeed_portable`."""
        return deepspeed_portable.gather(self.module, self.optimizer, self.is_main)

    def load_portable_state(self, portable: dict[str, Any]) -> None:
        """Write this rank's slice of a :meth:`portable_state` into the ZeRO partitions
        (collective; every rank passes the whole state)."""
        deepspeed_portable.load(self.module, self.optimizer, portable)

    def load_state(self, folder: Path, entries: dict[str, Any], *, written_by: int, step: int) -> None:
        if self.sharded and written_by != self.world_size:
            self._load_portable(folder, written_by, step)
        else:
            self.model.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=TAG, load_lr_scheduler_states=False)
        self.scaler.load_state_dict(entries["scaler"])

    def _load_portable(self, folder: Path, written_by: int, step: int) -> None:
        """A ZeRO checkpoint of ``written_by`` ranks, at this world size: DeepSpeed's
        partitions fit only the world size that wrote them, the portable copy any."""
        if not (folder / PORTABLE).exists():
            raise ConfigError(
                f"checkpoint.resume: {folder} holds ZeRO-{self.cfg.engine.zero_stage} optimizer partitions of "
                f"{written_by} ranks and no {PORTABLE} (checkpoint.zero_portable was false), so it "
                f"resumes only on {written_by} ranks, not {self.world_size}; "
                "tools/export_model.py still exports its weights"
            )
        self.load_portable_state(torch.load(folder / PORTABLE, map_location="cpu", weights_only=True))
        # DeepSpeed's own count of optimizer steps, which load_checkpoint would restore.
        self.model.global_steps = step // self.cfg.engine.grad_accum_steps

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Under ZeRO-3 the parameters are gathered (copies); otherwise the module's own."""
        if self.cfg.engine.zero_stage == 3:
            return gathered_state_dict(self.module)
        return self.module.state_dict()

    @classmethod
    def student_from_checkpoint(cls, cfg: Config, folder: Path, entries: dict[str, Any]) -> dict[str, torch.Tensor]:
        """ZeRO-0: the module in DeepSpeed's model file; ZeRO-1/2/3 keep the fp32 master
        weights partitioned over the ranks' files: consolidated by DeepSpeed's converter."""
        ds_dir = folder / DEEPSPEED_DIR
        if cfg.engine.zero_stage == 0:
            return torch.load(ds_dir / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
                "module"
            ]
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=TAG))


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a ZeRO-3-partitioned ``module``, as copies (collective)."""
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def skip_deepspeed_shm_kernels() -> None:
    """Keep DeepSpeed's CPU communication backend from JIT-compiling its shared-memory
    all-reduce kernels (``deepspeed_shm_comm``): ~50 s of C++ on 2 cores for each new
    install path, paid by the first run of every fresh venv. They serve only
    ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces through the
    torch process group either way. Marked incompatible, the op is skipped exactly as on a
    machine that cannot build it."""
    compatible_ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible_ops, dict):
        compatible_ops["deepspeed_shm_comm"] = False


class ZeroThreeTeacher(Teacher):
    """The EMA teacher under ZeRO-3 (docs/design.md section 2): partitioned exactly like
    the student and updated shard-locally, with no full gather per step.

    The teacher is a second DeepSpeed engine (stage 3, fp32, no optimizer; ``ds_config``
    from :meth:`DeepSpeedEngine.ds_config` with ``train=False``). Each update lerps every
    teacher parameter's local partition (``ds_tensor``) toward the student's fp32 master
    partition (``safe_get_local_fp32_param``); buffers (BatchNorm statistics) are not
    partitioned by ZeRO-3 and are averaged like :class:`~nrd_dist.teacher.EMATeacher`
    does. Its forward gathers parameters like any ZeRO-3 forward. Settings and counters:
    :class:`~nrd_dist.teacher.Teacher`; ``bn`` must be ``"eval"``.
    """

    sharded = True

    def __init__(
        self,
        template: nn.Module,
        ds_config: dict,
        decay: float = 0.99,
        warmup_steps: int = 0,
        every: int = 1,
        bn: str = "eval",
        *,
        ramp: str = "none",
        ramp_power: float = 2 / 3,
        ramp_gamma: float = 1.0,
    ):
        if bn != "eval":
            raise ValueError("teacher.bn: only 'eval' is supported with ZeRO-3")
        super().__init__(decay, warmup_steps, every, bn, ramp=ramp, ramp_power=ramp_power, ramp_gamma=ramp_gamma)
        template = copy.deepcopy(template).float()
        template.requires_grad_(False)
        self.teacher_engine, *_ = deepspeed.initialize(model=template, config=ds_config)
        self.module = self.teacher_engine.module
        self.module.eval()

    def _pull_toward(self, student: nn.Module, weight: Optional[float]) -> None:
        teacher_params = [p.ds_tensor for p in self.module.parameters()]
        student_params = [safe_get_local_fp32_param(p).view(-1) for p in student.parameters()]
        teacher_buffers = [b for b in self.module.buffers()]
        student_buffers = [b.detach() for b in student.buffers()]
        float_t = teacher_params + [b for b in teacher_buffers if b.is_floating_point()]
        float_s = [s.to(t.dtype) for t, s in zip(teacher_params, student_params)]
        float_s += [s.to(t.dtype) for t, s in zip(teacher_buffers, student_buffers) if t.is_floating_point()]
        if weight is None:
            torch._foreach_copy_(float_t, float_s)
        else:
            torch._foreach_lerp_(float_t, float_s, weight)
        for t, s in zip(teacher_buffers, student_buffers):
            if not t.is_floating_point():
                t.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), matching_precision(x):  # ZeRO-3's gather hooks need no_grad, not inference_mode
            return self.module(x.float())

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), matching_precision(x):
            return torch.softmax(self.module(x.float()).float(), dim=-1)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole teacher state, gathered (collective: call on every rank)."""
        return gathered_state_dict(self.module)

    def load_full_state(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a full (gathered) state into the partitions (collective)."""
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            # every rank loads the same full state; rank 0's copy is what gets partitioned
            return self.module.load_state_dict(state, strict=strict)

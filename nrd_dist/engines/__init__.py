"""Execution engines: where the student runs, how a loss becomes an optimizer step, and
how its state is saved, loaded and consolidated. The interface is
:class:`~nrd_dist.engines.base.Engine` (see :mod:`nrd_dist.engines.base`)::

    engine = build_engine(cfg)             # devices, process group, precision
    engine.setup(model, optimizer)         # wraps the model as the backend needs
    with engine.autocast():
        logits = engine.model(engine.to_device(x))
    engine.step(loss, scheduler)           # backward, clip, step, zero_grad
    engine.module                          # the unwrapped student (for the EMA teacher)
    engine.all_reduce_sum(tensor)          # exact evaluation across ranks

Backends, one module each; only this package chooses between them, and only
:mod:`nrd_dist.engines.deepspeed` imports DeepSpeed (loaded when a config asks for it):

* :class:`LocalEngine` (``local.py``): one process (plain ``python``).
* :class:`DDPEngine` (``ddp.py``): DistributedDataParallel under ``torchrun``
  (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); NCCL on GPU, gloo on CPU.
* ``DeepSpeedEngine`` (``deepspeed.py``): ZeRO 0-3, its ZeRO-3 teacher, and the
  world-size-portable ZeRO state (``deepspeed_portable.py``).
"""

from __future__ import annotations

import os

from nrd_dist.config import Config
from nrd_dist.engines.base import Engine, resolve_precision
from nrd_dist.engines.ddp import DDPEngine
from nrd_dist.engines.local import LocalEngine

__all__ = ["DDPEngine", "Engine", "LocalEngine", "build_engine", "engine_class", "resolve_precision"]


def engine_class(cfg: Config, world_size: int = 1) -> type[Engine]:
    """The engine class for ``cfg`` at ``world_size`` ranks, without building it (the
    exporter reads checkpoints with it, in one process)."""
    if cfg.engine.backend == "deepspeed":
        from nrd_dist.engines.deepspeed import DeepSpeedEngine  # imports DeepSpeed: only when asked for

        return DeepSpeedEngine
    return DDPEngine if world_size > 1 else LocalEngine


def build_engine(cfg: Config) -> Engine:
    """The engine for ``cfg`` in this process: DeepSpeed when ``engine.backend`` says so
    (a world of one under plain ``python``), else DDP under torchrun with more than one
    rank, else one local process."""
    if cfg.engine.backend == "deepspeed" and "RANK" not in os.environ:
        # plain `python`: a world of one for DeepSpeed, which always wants a process group
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    return engine_class(cfg, int(os.environ.get("WORLD_SIZE", 1)))(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

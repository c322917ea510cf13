"""Choosing and building the engine for a config: the only place that picks a backend."""

from __future__ import annotations

import os

from nrd_dist.config import Config
from nrd_dist.engines.base import Engine
from nrd_dist.engines.ddp import DDPEngine
from nrd_dist.engines.local import LocalEngine


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

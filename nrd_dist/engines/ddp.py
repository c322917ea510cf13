"""DistributedDataParallel over a torchrun-launched process group.

The step, the teacher and the checkpoint state are those of
:class:`~nrd_dist.engines.local.LocalEngine`: DDP replicates the parameters, so every
rank's ``module.state_dict()`` is the whole student. What changes is the wrapper (the
gradient all-reduce in the backward) and the collectives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nrd_dist.config import Config
from nrd_dist.engines.local import LocalEngine
from nrd_dist.engines.process_group import (
    ProcessGroupCollectives,
    collective_timeout,
    communication_backend,
    init_process_group,
)


class DDPEngine(ProcessGroupCollectives, LocalEngine):
    """One process per device; joins the process group at construction."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        init_process_group(communication_backend(self.device), collective_timeout(cfg))

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = model
        self.optimizer = optimizer
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        # gradient_as_bucket_view saves one gradient-sized copy per step.
        self.model = DistributedDataParallel(
            model, device_ids=device_ids, gradient_as_bucket_view=True, bucket_cap_mb=self.cfg.engine.ddp_bucket_cap_mb
        )

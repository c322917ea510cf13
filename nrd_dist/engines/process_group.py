"""The torch.distributed process group shared by the multi-process engines.

:func:`init_process_group` joins (or forms) the group that torchrun or the DeepSpeed
launcher describes in the environment; :class:`ProcessGroupCollectives` gives an engine
the interface's collectives over it. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from nrd_dist.config import Config


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
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"/nrd_dist/attempt_{attempt}", agent_store)
        dist.init_process_group(
            backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout
        )
    else:
        dist.init_process_group(backend, timeout=timeout)


def collective_timeout(cfg: Config) -> datetime.timedelta:
    """A dead rank fails the job after this long instead of hanging it forever."""
    return datetime.timedelta(seconds=cfg.engine.timeout_s)


def communication_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class ProcessGroupCollectives:
    """The engine interface's collectives over the default process group: mixed into
    an :class:`~nrd_dist.engines.base.Engine` subclass (which provides ``device``).
    NCCL communicates GPU tensors only, so a CPU tensor makes a round trip to the
    device; the result comes back on the input's device."""

    device: torch.device

    def _communication_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.to(self._communication_device()).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        local = tensor.to(self._communication_device())
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return [part.to(tensor.device) for part in parts]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

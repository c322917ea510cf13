"""A world-size-independent copy of a ZeRO-sharded student and its optimizer state
(used by :class:`nrd_dist.engines.deepspeed.DeepSpeedEngine` only).

DeepSpeed's own checkpoint files hold each rank's partition of the fp32 master weights
and of the optimizer state, laid out for that world size: they load only on as many
ranks as wrote them. An elastic job that lost a node must resume on fewer ranks, so
alongside DeepSpeed's files every ZeRO checkpoint also holds this *portable* state: the
full fp32 master weight of every parameter and the full optimizer state (SGD's
``momentum_buffer``, Adam's moments) keyed by parameter name, gathered to rank 0.
Loading it on any number of ranks writes each rank's slice back into the partitions.

DeepSpeed's universal checkpoint does the same offline, but its converter knows only
Adam's state keys (``exp_avg``/``exp_avg_sq``), not SGD's momentum.

Every public function here is a collective: all ranks call it, in the same order.
``optimizer`` is DeepSpeed's ZeRO optimizer (``engine.optimizer`` after
``deepspeed.initialize``), ``module`` the unwrapped student.

The portable dict: ``params`` {name: full fp32 tensor}, ``buffers`` {name: tensor},
``optimizer_state`` {state key: {name: full tensor}}, ``group_scalars`` {flat group
index: {key: value}}.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn


def _zero_stage(optimizer) -> int:
    return 3 if hasattr(optimizer, "fp32_partitioned_groups_flat") else 2


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, which key the base optimizer's state."""
    if _zero_stage(optimizer) == 3:
        return list(optimizer.fp32_partitioned_groups_flat)
    return list(optimizer.single_partition_of_fp32_groups)


def optimizer_state_keys(optimizer) -> list[str]:
    """Per-element optimizer state names (e.g. ``momentum_buffer``); empty before the
    first optimizer step, since torch creates the state lazily."""
    keys: set[str] = set()
    for flat in _flat_partitions(optimizer):
        for key, value in optimizer.optimizer.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                keys.add(key)
    return sorted(keys)


def gather(module: nn.Module, optimizer, is_main: bool) -> Optional[dict[str, Any]]:
    """The full fp32 weights and optimizer state, on rank 0 (None elsewhere)."""
    keys = optimizer_state_keys(optimizer)
    if keys and _zero_stage(optimizer) < 3:
        # Links each parameter to its slice of the state (DeepSpeed does this after its
        # first step; linking an empty state would stick, hence only once there is one).
        optimizer._lazy_init_hp_params_optimizer_state()
    params: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)  # all-reduce / all-gather over the ranks
        if is_main:
            params[name] = full.detach().cpu().clone()
        for key in keys:
            value = safe_get_full_optimizer_state(param, key)
            if is_main:
                states[key][name] = value.detach().cpu().clone()
    if not is_main:
        return None
    scalars = {}  # per-group scalars such as Adam's step count, identical on every rank
    for index, flat in enumerate(_flat_partitions(optimizer)):
        scalars[index] = {
            k: v.detach().cpu().clone() if torch.is_tensor(v) else v
            for k, v in optimizer.optimizer.state.get(flat, {}).items()
            if k not in keys
        }
    buffers = {name: b.detach().cpu().clone() for name, b in module.named_buffers()}  # replicated, not sharded
    return {"params": params, "buffers": buffers, "optimizer_state": states, "group_scalars": scalars}


def load(module: nn.Module, optimizer, portable: dict[str, Any]) -> None:
    """Write each rank's slice of ``portable`` into its ZeRO partitions (any world size)."""
    named = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(portable["params"]))
    unexpected = sorted(set(portable["params"]) - set(named))
    if missing or unexpected:
        raise ValueError(f"portable ZeRO state does not fit the model: missing {missing}, unexpected {unexpected}")
    keys = sorted(portable["optimizer_state"])
    base = optimizer.optimizer
    for index, flat in enumerate(_flat_partitions(optimizer)):
        state = base.state[flat]  # created here, as torch would at the first step
        for key in keys:
            state[key] = torch.zeros_like(flat)
        state.update(portable["group_scalars"].get(index, {}))
    stage = _zero_stage(optimizer)
    if stage < 3:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in named.items():
        _set_full(optimizer, param, portable["params"][name])
        for key in keys:
            _set_full(optimizer, param, portable["optimizer_state"][key][name], key)
    for name, buffer in module.named_buffers():
        buffer.data.copy_(portable["buffers"][name])
    # The working (low-precision or fp32) weights follow their new fp32 masters.
    if stage < 3:
        optimizer.update_lp_params()
    else:
        for sub_group in range(len(optimizer.fp32_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)


def _set_full(optimizer, param: nn.Parameter, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Copy this rank's slice of the full ``value`` into the fp32 master (``key`` None)
    or into the optimizer state ``key``."""
    value = value.to(_flat_partitions(optimizer)[0].device)
    if _zero_stage(optimizer) < 3:
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    # DeepSpeed 0.19's stage-3 setter slices the unpadded value, so it fails on the last
    # rank whenever the parameter's size is not a multiple of the world size: pad first.
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = optimizer._get_param_partition_rank(param)
    world = optimizer._get_param_partition_world_size(param)
    padded = torch.zeros(partition.numel() * world, dtype=partition.dtype, device=partition.device)
    padded[: value.numel()] = value.flatten()
    partition.data.copy_(padded.narrow(0, partition.numel() * rank, partition.numel()))

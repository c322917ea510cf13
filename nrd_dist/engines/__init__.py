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

import importlib
from typing import Any

# Names resolved on first use (PEP 562), so that the config can read
# ``nrd_dist.engines.backends`` (what each backend supports) without importing torch.
_LAZY = {
    "Engine": "nrd_dist.engines.base",
    "resolve_precision": "nrd_dist.engines.base",
    "DDPEngine": "nrd_dist.engines.ddp",
    "LocalEngine": "nrd_dist.engines.local",
    "build_engine": "nrd_dist.engines.factory",
    "engine_class": "nrd_dist.engines.factory",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)

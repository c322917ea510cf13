"""Learning-rate schedules as a per-step multiplier of ``optim.lr`` (for ``LambdaLR``).

* ``multistep``: multiply by ``gamma`` at each milestone; milestones below 1 are
  fractions of the run, others are epochs (``[100, 200]`` of 300 or ``[0.5, 0.75]``).
* ``cosine``: half a cosine from 1 to 0 over the run after the warm-up.
* ``step_gamma``: ``gamma ** epoch`` (per-epoch exponential decay, the GJS WebVision recipe).
* ``constant``.

An optional linear warm-up (``warmup_epochs``) ramps from ``1/warmup_steps`` to 1 first.
Epochs are fractional (``step / steps_per_epoch``) so milestones fall on the right step.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

from nrd_dist.config import OptimConfig


def lr_multiplier(optim: OptimConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total_steps = max(optim.epochs * steps_per_epoch, 1)
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
    milestones = sorted(m * optim.epochs if m < 1 else m for m in optim.milestones)

    def schedule(step: int) -> float:
        epoch = step / steps_per_epoch
        if optim.schedule == "multistep":
            factor = optim.gamma ** bisect.bisect_right(milestones, epoch)
        elif optim.schedule == "cosine":
            progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif optim.schedule == "step_gamma":
            factor = optim.gamma ** math.floor(epoch)
        else:
            factor = 1.0
        if step < warmup_steps:
            factor *= (step + 1) / warmup_steps
        return factor

    return schedule

"""ZeRO state across world sizes, with real DeepSpeed engines.

    python tests/dist/zero_portable.py save OUT STAGE [STAGE ...]  (under torchrun, any world size)
    python tests/dist/zero_portable.py load OUT STAGE [STAGE ...]  (under torchrun, another world size)

For each STAGE in turn (one process group, a fresh model and DeepSpeed engine per
stage, so one launch serves several stages), under OUT/stage{STAGE}:

``save``: 3 SGD steps (momentum, weight decay) on the global batch split over the ranks,
then writes the gathered portable state to portable.pt and the global batch of a 4th
step to batch.pt.

``load``: a fresh engine on another number of ranks loads the portable state, gathers it
again (must round-trip exactly), takes the 4th step, and writes the gathered weights to
after_load_{world}.pt. The test compares that step with plain torch SGD from the same
weights and momentum.
"""

import os
import sys
from pathlib import Path

import torch

from nrd_dist.config import load_config
from nrd_dist.engines import build_engine
from nrd_dist.models import build_model

GLOBAL_BATCH = 12


def batch(step: int):
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def build(stage: int):
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(
        None,
        [
            "engine.backend=deepspeed",
            f"engine.zero_stage={stage}",
            "model.arch=mlp",
            f"data.batch_size={GLOBAL_BATCH // world}",
        ],
    )
    engine = build_engine(cfg)
    torch.manual_seed(0)
    model = engine.prepare_module(build_model("mlp", 10, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    engine.setup(model, optimizer)
    return engine, world


def step(engine, world, number):
    x, y = batch(number)
    per_rank = GLOBAL_BATCH // world
    lo, hi = engine.rank * per_rank, (engine.rank + 1) * per_rank
    loss = torch.nn.functional.cross_entropy(engine.model(engine.to_device(x[lo:hi])), y[lo:hi])
    engine.step(loss)


def run_stage(mode: str, out: Path, stage: int):
    engine, world = build(stage)
    if mode == "save":
        for number in range(3):
            step(engine, world, number)
        state = engine.portable_state()
        if engine.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(state, out / "portable.pt")
            torch.save(batch(3), out / "batch.pt")
    else:
        state = torch.load(out / "portable.pt", weights_only=True)
        engine.load_portable_state(state)
        again = engine.portable_state()
        step(engine, world, 3)
        after = engine.portable_state()
        if engine.is_main:
            torch.save({"round_trip": again, "after_step": after}, out / f"after_load_{world}.pt")
    engine.barrier()
    return engine


def main(mode: str, out: Path, stages: list[int]) -> None:
    for stage in stages:
        engine = run_stage(mode, out / f"stage{stage}", stage)
    engine.close()  # the process group, shared by the stages' engines


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3:]])

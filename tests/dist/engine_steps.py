"""Run a few real optimizer steps under the engine chosen by the overrides and write what
the tests check to OUT/rank{R}.json. Launched by the tests with torchrun (2 processes,
gloo) or plainly (1 process).

    python tests/dist/engine_steps.py OUT [key=value ...]

Part 1 (mlp, no BatchNorm): the global-batch loss of each step; the global batch is
fixed and split over the ranks, so every world size and engine must give the same curve.
Part 2 (small_cnn, with BatchNorm buffers): after the steps, the gathered teacher against
a float64 EMA computed from the gathered student weights of every step; its checksum; and
that a teacher perturbed on one rank is caught by verify_teacher.
"""

import copy
import json
import sys
from pathlib import Path

import torch

from nrd_dist.config import load_config
from nrd_dist.engines import build_engine
from nrd_dist.losses import build_loss
from nrd_dist.models import build_model
from nrd_dist.teacher import TeacherDivergedError, teacher_checksum, verify_teacher

GLOBAL_BATCH = 8
STEPS = 5
DECAY = 0.9


def gathered_student(engine) -> dict:
    return {k: v.detach().clone().cpu() for k, v in engine.consolidated_state_dict().items()}


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g),
        torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g),
        torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
    )


def run(arch: str, overrides: list[str]):
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    per_rank = GLOBAL_BATCH // world
    cfg = load_config(
        None,
        overrides
        + [
            f"model.arch={arch}",
            f"data.batch_size={per_rank}",
            f"teacher.decay={DECAY}",
            "optim.lr=0.05",
            "optim.weight_decay=0.0",
        ],
    )
    engine = RUN_ENGINE if RUN_ENGINE is not None else build_engine(cfg)
    engine.cfg = cfg
    torch.manual_seed(0)
    model = engine.prepare_module(build_model(arch, 10, 1))
    template = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.setup(model, optimizer)
    teacher = engine.make_teacher(template)
    loss_fn = build_loss("nrd", pi=[0.3, 0.5, 0.2], scale=True)
    if cfg.engine.compile:  # as the trainer does: in place, after the teacher's copy
        engine.compile(model, teacher.module, loss_fn)
    reference = {k: v.double() for k, v in gathered_student(engine).items()}
    losses = []
    for step in range(STEPS):
        x_s, x_t, y = global_batch(step)
        lo, hi = engine.rank * per_rank, (engine.rank + 1) * per_rank
        with engine.autocast():
            logits = engine.model(engine.to_device(x_s[lo:hi]))
            probs = teacher.predict_probs(engine.to_device(x_t[lo:hi]))
        loss = loss_fn(logits, y[lo:hi].to(engine.device), probs)
        losses.append(float(engine.all_reduce_sum(loss.detach().float().cpu())) / world)
        engine.step(loss)
        teacher.update(engine.module)
        for k, v in gathered_student(engine).items():
            reference[k] = DECAY * reference[k] + (1 - DECAY) * v.double() if v.is_floating_point() else v.double()
    state = {k: v.detach().cpu().clone() for k, v in teacher.full_state().items()}
    max_diff = max(float((state[k].double() - reference[k]).abs().max()) for k in state)
    checksum = teacher_checksum(state).tolist()
    verify_teacher(teacher, STEPS, engine)  # identical everywhere: must pass
    detected = None
    buffers = [b for b in teacher.module.buffers() if b.is_floating_point()]
    # Under ZeRO-3 (a sharded teacher) each parameter partition lives on one rank only;
    # what all ranks hold alike, and so what can diverge, is the buffers.
    if world > 1 and (buffers or not teacher.sharded):
        if engine.rank == 1:
            with torch.no_grad():
                (buffers[0] if buffers else next(teacher.module.parameters())).add_(1e-3)
        try:
            verify_teacher(teacher, STEPS + 1, engine)
            detected = False
        except TeacherDivergedError as err:
            detected = str(err)
    compiled = [getattr(m, "_compiled_call_impl", None) is not None for m in (model, teacher.module, loss_fn)]
    return {
        "losses": losses,
        "teacher_max_diff": max_diff,
        "checksum": checksum,
        "divergence_detected": detected,
        "compiled": compiled,
    }


RUN_ENGINE = None

if __name__ == "__main__":
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    cfg = load_config(None, overrides)
    RUN_ENGINE = build_engine(cfg)  # one process group for both parts
    results = {"rank": RUN_ENGINE.rank, "world_size": RUN_ENGINE.world_size}
    for arch in ("mlp", "small_cnn"):
        results[arch] = run(arch, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{RUN_ENGINE.rank}.json").write_text(json.dumps(results))
    RUN_ENGINE.close()
    # as nrd_dist.train does: no interpreter teardown after a distributed run (see there)
    sys.stdout.flush()
    __import__("os")._exit(0)

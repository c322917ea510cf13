"""``python tools/export_model.py RUN_DIR --which student|teacher --out FILE.pt [--checkpoint NAME]``

Writes a plain ``state_dict`` of the student or the EMA teacher from the latest complete
checkpoint of a run, or the one ``--checkpoint`` names (any engine: one process, DDP,
DeepSpeed ZeRO 0-3), loadable by the bare model::

    build_model(arch, num_classes, in_channels).load_state_dict(torch.load(FILE))

The run's engine (``nrd_dist.engines``) reads the student from the checkpoint and
consolidates ZeRO shards, in this one process; the teacher is always saved whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from nrd_dist.checkpoint import COMPLETE, LATEST, complete_checkpoints, load_shared
from nrd_dist.config import load_config
from nrd_dist.engines import engine_class


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (missing {pointer})")
    path = root / pointer.read_text().strip()
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path}: incomplete checkpoint")
    return path


CHECKPOINT_HELP = (
    "a folder under RUN_DIR/checkpoints, e.g. step_000000400, or its path (default: the latest complete one)"
)


def resolve_checkpoint(run_dir: Path, choice: Optional[str] = None) -> Path:
    """The checkpoint folder ``choice`` names (a folder name under RUN_DIR/checkpoints, such
    as ``step_000000400``, or a path); the latest complete one when ``choice`` is None."""
    if choice is None:
        return latest_checkpoint(run_dir)
    for path in (Path(choice), run_dir / "checkpoints" / choice):
        if path.is_dir():
            if path.suffix == ".tmp" or not (path / COMPLETE).exists():
                raise FileNotFoundError(f"{path}: incomplete checkpoint (no {COMPLETE} marker)")
            return path
    available = ", ".join(p.name for p in complete_checkpoints(run_dir / "checkpoints")) or "none"
    raise FileNotFoundError(
        f"--checkpoint {choice}: no such checkpoint in {run_dir / 'checkpoints'} (complete ones: {available})"
    )


def export_state(run_dir: Path, which: str, checkpoint: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """``which`` (student or teacher) of ``checkpoint`` (default: the run's latest), as a
    full state dict; the run's engine consolidates a sharded student (no process group)."""
    cfg = load_config(run_dir / "config.yaml")
    path = checkpoint or latest_checkpoint(run_dir)
    shared = load_shared(path)
    if which == "teacher":
        if shared.get("teacher") is None:
            raise ValueError(f"{run_dir}: loss {cfg.loss.name!r} keeps no teacher")
        return shared["teacher"]["model"]  # the teacher's state dict: always whole (Teacher.state_dict)
    return engine_class(cfg).student_from_checkpoint(cfg, path, shared)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="export_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--which", choices=["student", "teacher"], default="teacher")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, metavar="NAME", help=CHECKPOINT_HELP)
    args = parser.parse_args(argv)
    try:
        state = export_state(args.run_dir, args.which, resolve_checkpoint(args.run_dir, args.checkpoint))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote the {args.which} ({len(state)} tensors) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

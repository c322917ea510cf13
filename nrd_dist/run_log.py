"""Run outputs on rank 0: ``metrics.jsonl``, TensorBoard events, console lines, progress.

Every other rank gets a logger that does nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._metrics = None
        self._tb = None

    def open(self, resumed_step: Optional[int] = None) -> None:
        """Start metrics.jsonl afresh, or, resuming from a checkpoint at ``resumed_step``,
        keep the records up to it (the steps after it are about to be redone)."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        kept = []
        if resumed_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        kept.append(line)
                except ValueError:  # a line cut by the crash
                    pass
        # Line-buffered: a crash loses at most the line being written.
        self._metrics = open(path, "w", buffering=1)
        for line in kept:
            self._metrics.write(line + "\n")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resumed_step)

    def record(self, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl and scalar fields to TensorBoard."""
        if not self.enabled:
            return
        fields = {"time": round(time.time(), 3), **fields}
        self._metrics.write(json.dumps(fields, default=_jsonable) + "\n")
        step = fields.get("step", 0)
        for tag, value in _flatten(fields).items():
            if tag not in ("time", "step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(tag, value, step)

    def info(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)  # keeps an active progress bar intact
            sys.stdout.flush()

    def warning(self, message: str, rank: int) -> None:
        """From every rank (what one rank saw, e.g. a corrupt sample, only it can say)."""
        print(f"[nrd_dist] warning (rank {rank}): {message}", file=sys.stderr, flush=True)

    def progress(self, total: int, desc: str):
        """A tqdm bar on rank 0 when stderr is a terminal (log files get the log lines
        only); a no-op object elsewhere."""
        from tqdm import tqdm

        show = self.enabled and sys.stderr.isatty()
        return tqdm(
            total=total,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not show,
            file=sys.stderr,
            mininterval=0.5,
        )

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(fields: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json(path: Path, data: Any, enabled: bool = True) -> Optional[Path]:
    if not enabled:
        return None
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path

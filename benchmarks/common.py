"""What the benchmark scripts share."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN_SHARDS = REPO / "data" / "fmnist" / "train"  # written by `make demo`


def local_shards(folder: Path) -> list[str]:
    """The tar shards in ``folder``, sorted; exits with a clear message when there are none.
    Also pins torch to one intra-op thread: the loaders' work is per sample, and the
    benchmark's own process must not compete with its DataLoader workers."""
    shards = sorted(str(p) for p in Path(folder).glob("*.tar"))
    if not shards:
        print(f"error: no shards in {folder} (run `make demo` or tools/make_shards.py)", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    return shards

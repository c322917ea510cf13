"""Classification metrics that add up exactly across batches and ranks.

:class:`ClassificationMeter` keeps only sums (top-k hits and, per confidence bin, the
count, the summed confidence and the summed correctness), so a distributed evaluation
all-reduces one small tensor and the result is exact: top-1, top-5 and the 15-bin
expected calibration error (ECE, Guo et al. 2017) as on a single process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ECE_BINS = 15


class ClassificationMeter:
    """Accumulates top-1/top-5 hits and calibration bins over ``update`` calls."""

    def __init__(self, num_bins: int = ECE_BINS, topk: tuple[int, ...] = (1, 5)):
        self.num_bins = num_bins
        self.topk = topk
        # [hits per k..., count]; bins: [count, sum confidence, sum correct] per bin
        self.hits = torch.zeros(len(topk) + 1, dtype=torch.float64)
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """``probs``: [B, C] probabilities; ``target``: [B] class indices."""
        probs = probs.detach().float().cpu()
        target = target.detach().cpu()
        k_max = min(max(self.topk), probs.shape[1])
        top = probs.topk(k_max, dim=1).indices
        match = top == target[:, None]
        for i, k in enumerate(self.topk):
            self.hits[i] += match[:, :k].any(dim=1).sum()
        self.hits[-1] += len(target)
        confidence, prediction = probs.max(dim=1)
        correct = (prediction == target).double()
        # Bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for a max.
        index = (confidence.double() * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1
        self.bins[0].index_add_(0, index, torch.ones_like(correct))
        self.bins[1].index_add_(0, index, confidence.double())
        self.bins[2].index_add_(0, index, correct)

    def state(self) -> torch.Tensor:
        """All sums as one flat tensor (what a distributed evaluation all-reduces)."""
        return torch.cat([self.hits, self.bins.flatten()])

    def load_state(self, flat: torch.Tensor) -> None:
        n = len(self.hits)
        self.hits = flat[:n].clone()
        self.bins = flat[n:].reshape(3, self.num_bins).clone()

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.load_state(reduce_sum(self.state()))

    @property
    def count(self) -> int:
        return int(self.hits[-1])

    def compute(self) -> dict[str, float]:
        """``top1``/``top5`` in percent, ``ece`` in [0, 1], ``count`` samples."""
        n = max(self.count, 1)
        out = {f"top{k}": 100.0 * float(self.hits[i]) / n for i, k in enumerate(self.topk)}
        counts, conf, correct = self.bins
        out["ece"] = float(((conf - correct).abs()).sum() / n)
        out["count"] = self.count
        return out

    def reliability(self) -> dict[str, list[float]]:
        """Per-bin accuracy, mean confidence and count (for the reliability diagram)."""
        counts, conf, correct = self.bins
        safe = counts.clamp_min(1)
        return {"accuracy": (correct / safe).tolist(), "confidence": (conf / safe).tolist(), "count": counts.tolist()}


def reliability_diagram(curves: dict[str, dict], path: Path, title: str = "") -> Path:
    """Plot per-bin accuracy against confidence for one or more models (PNG).

    ``curves`` maps a label (e.g. ``"student (ECE 3.1%)"``) to :meth:`reliability` output.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for label, curve in curves.items():
        n = len(curve["count"])
        centres = [(b + 0.5) / n for b in range(n)]
        points = [(c, a) for c, a, k in zip(curve["confidence"], curve["accuracy"], curve["count"]) if k > 0]
        ax.bar(centres, curve["accuracy"], width=1.0 / n, alpha=0.35, edgecolor="none")
        if points:
            ax.plot(*zip(*points), "o-", ms=3, label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bar_chart(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: ``groups[group][series] = value`` (used by the label-correction figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(next(iter(groups.values())).keys())
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        values = [groups[g][name] for g in groups]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 125)  # headroom: the legend sits above the bars
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: Optional[dict[str, list[tuple[float, float, float]]]] = None,
) -> Optional[Path]:
    """Lines ``series[name] = [(x, y), ...]`` (accuracy against epoch), each with an optional
    shaded band ``bands[name] = [(x, low, high), ...]`` (e.g. +- one sd over seeds)."""
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
    for name, points in series.items():
        if points:
            (line,) = ax.plot(*zip(*points), "o-", ms=3, label=name)
            if bands and bands.get(name):
                x, low, high = zip(*bands[name])
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (e.g. the
    mislabeled samples): the probability that a random positive scores higher than a
    random negative, ties counting one half (the Mann-Whitney U statistic over
    ``n_pos * n_neg``).

    ``scores``: N finite floats; ``positives``: N booleans. Exact: the rank sums are
    integers (twice the mid-rank of a tie group is an integer), so the only rounding is
    the final division. NaN when there are no positives or no negatives (undefined).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"auroc: {len(scores)} scores for {len(positives)} labels")
    if not np.isfinite(scores).all():
        raise ValueError("auroc: scores must be finite")
    n_pos = int(positives.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # Tie groups [start, end) in sorted order get the mid-rank (start + 1 + end) / 2 (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    twice_rank = np.empty(len(scores), dtype=np.int64)
    twice_rank[order] = np.repeat(starts + 1 + ends, ends - starts)
    twice_u = int(twice_rank[positives].sum()) - n_pos * (n_pos + 1)
    return twice_u / (2 * n_pos * n_neg)


def histograms(
    panels: dict[str, dict[str, np.ndarray]], path: Path, xlabel: str, title: str = "", bins: int = 40
) -> Path:
    """Side-by-side panels of overlaid density histograms (PNG):
    ``panels[panel][series] = 1-D array of values``. Every panel uses the same bin edges
    (over all values), so panels compare directly; empty series are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [np.asarray(v, dtype=np.float64) for panel in panels.values() for v in panel.values() if len(v)]
    everything = np.concatenate(values) if values else np.zeros(1)
    low, high = float(everything.min()), float(everything.max())
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, data in series.items():
            if len(data):
                ax.hist(
                    np.asarray(data, dtype=np.float64),
                    bins=edges,
                    density=True,
                    alpha=0.5,
                    label=f"{label} (n={len(data)})",
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

"""Counting bad training data against ``data.max_bad_fraction``.

The shard stream skips corrupt samples and the rest of truncated shards and reports
them in each batch's ``bad`` field (see :class:`nrd_dist.data.shards.ShardStream`).
Each rank logs its own reports (they name the sample key and shard URL); the counts
are summed over the ranks in the step's one small all-reduce, so every rank takes the
same decision at the same step and a stop never leaves a rank waiting in a collective.
"""

from __future__ import annotations


class BadDataError(RuntimeError):
    pass


def bad_reports(batch: dict) -> list[str]:
    """The reports a batch carries: what this rank's stream skipped since the last batch."""
    return [line for text in batch.get("bad", ()) if text for line in text.split("\n")]


class BadDataBudget:
    """Bad-data events seen so far (all ranks) against a fraction of the samples read.

    The allowance is ``max_fraction x max(samples read, one epoch)``: early in a run one
    bad sample among the first hundred would otherwise be "1%" and stop it.
    """

    def __init__(self, max_fraction: float, samples_per_epoch: int):
        self.max_fraction = max_fraction
        self.samples_per_epoch = samples_per_epoch
        self.bad = 0
        self.read = 0
        self.last_reports: list[str] = []

    def add(self, bad: int, read: int, where: str) -> None:
        """Record the all-rank totals of one step; raises once over the budget."""
        self.bad += bad
        self.read += read + bad
        allowed = self.max_fraction * max(self.read, self.samples_per_epoch)
        if self.bad > allowed:
            raise BadDataError(
                f"bad training data exceeded data.max_bad_fraction={self.max_fraction}: {self.bad} corrupt "
                f"samples / truncated shards among {self.read} read (allowed {allowed:.1f}), at {where}; "
                "the log lists each one with its sample key and shard URL (tools/verify_shards.py --deep "
                "checks a shard set)")

    def state_dict(self) -> dict:
        return {"bad": self.bad, "read": self.read}

    def load_state_dict(self, state: dict) -> None:
        self.bad, self.read = state["bad"], state["read"]

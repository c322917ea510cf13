"""Evaluation passes: clean validation sets and the label-correction analysis.

Both run every model of interest (student, teacher) on one pass over the data, so each
image is decoded once. Sums are all-reduced, so a distributed evaluation that sees each
sample once on some rank gives exactly the single-process numbers.

Ranks hold different numbers of validation batches (shards are dealt, not split), yet a
ZeRO-3 forward is a collective: every rank must run the same number of forwards. The
passes therefore run in lockstep; a rank out of data runs an idle forward on a dummy
input and counts nothing, until every rank is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from nrd_dist.data.bad_data import bad_reports

from nrd_dist.metrics import ClassificationMeter

# name -> function mapping an image batch [B, C, H, W] to logits [B, K]
Predictors = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class EvalContext:
    """What a pass needs from the engine."""

    to_device: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    lockstep: bool = False  # distributed: keep every rank's forward count equal
    idle_input: Optional[torch.Tensor] = None  # [1, C, H, W] for idle forwards
    warn: Callable[[str], None] = print  # reports of skipped bad samples (key, shard URL)


def in_lockstep(batches: Iterable[dict], ctx: EvalContext, stop: Callable[[], bool] = lambda: False
                ) -> Iterator[Optional[dict]]:
    """Yield this rank's batches, then None (idle) until no rank has batches left."""
    iterator = iter(batches)
    while True:
        batch = None if stop() else next(iterator, None)
        if not ctx.lockstep:
            if batch is None:
                return
        elif float(ctx.reduce_sum(torch.tensor([0.0 if batch is None else 1.0]))) == 0:
            return
        yield batch


def _idle_forward(predictors: Predictors, ctx: EvalContext) -> None:
    images = ctx.to_device(ctx.idle_input)
    for predict in predictors.values():
        with ctx.autocast():
            predict(images)


@torch.no_grad()  # not inference_mode: ZeRO-3's parameter gathering must work here
def evaluate(predictors: Predictors, batches: Iterable[dict], ctx: EvalContext) -> dict[str, ClassificationMeter]:
    """Top-1/top-5/ECE of each predictor against ``batch["label"]`` (clean val labels)."""
    meters = {name: ClassificationMeter() for name in predictors}
    for batch in in_lockstep(batches, ctx):
        if batch is None:
            _idle_forward(predictors, ctx)
            continue
        for report in bad_reports(batch):
            ctx.warn(f"evaluation skipped {report}")
        images = ctx.to_device(batch["image"])
        for name, predict in predictors.items():
            with ctx.autocast():
                logits = predict(images)
            meters[name].update(torch.softmax(logits.float(), dim=-1), batch["label"])
    for meter in meters.values():
        meter.all_reduce(ctx.reduce_sum)
    return meters


@torch.no_grad()
def label_correction(predictors: Predictors, batches: Iterable[dict], ctx: EvalContext, max_samples: int) -> dict:
    """Accuracy against the *clean* labels of training samples, split into samples whose
    training label is clean and those that are mislabeled (the paper's Table 1 / Fig. 5):
    once on the plain image and once averaging the softmax over K AugMix teacher views.

    Each batch's ``image`` is ``[plain [B, C, H, W], views [B, K, C, H, W]]``.
    Returns ``{predictor: {"plain"|"augmix_ensemble": {"clean"|"mislabeled": acc %}}, counts}``.
    """
    # per predictor and mode: [correct on clean, n clean, correct on mislabeled, n mislabeled]
    sums = {name: {"plain": torch.zeros(4, dtype=torch.float64), "augmix_ensemble": torch.zeros(4, dtype=torch.float64)}
            for name in predictors}
    seen = 0
    to_device, autocast, reduce_sum = ctx.to_device, ctx.autocast, ctx.reduce_sum
    for batch in in_lockstep(batches, ctx, stop=lambda: seen >= max_samples):
        if batch is None:
            _idle_forward(predictors, ctx)
            continue
        plain, views = batch["image"]
        clean, given = batch["clean_label"], batch["label"]
        keep = clean >= 0
        if not keep.any():
            _idle_forward(predictors, ctx)  # the other ranks may be mid-forward
            continue
        mislabeled = (given != clean)[keep]
        plain, views, clean = to_device(plain[keep]), views[keep], clean[keep]
        b, k = views.shape[:2]
        views = to_device(views.flatten(0, 1))
        for name, predict in predictors.items():
            with autocast():
                plain_pred = predict(plain).argmax(-1).cpu()
                probs = torch.softmax(predict(views).float(), -1).reshape(b, k, -1).mean(1)
            for mode, pred in (("plain", plain_pred), ("augmix_ensemble", probs.argmax(-1).cpu())):
                correct = pred == clean
                sums[name][mode] += torch.tensor([
                    (correct & ~mislabeled).sum(), (~mislabeled).sum(), (correct & mislabeled).sum(), mislabeled.sum(),
                ], dtype=torch.float64)
        seen += int(b)
    result: dict = {}
    for name, modes in sums.items():
        result[name] = {}
        for mode, s in modes.items():
            s = reduce_sum(s)
            result[name][mode] = {
                "clean": 100.0 * float(s[0] / s[1]) if s[1] else float("nan"),
                "mislabeled": 100.0 * float(s[2] / s[3]) if s[3] else float("nan"),
            }
            result["counts"] = {"clean": int(s[1]), "mislabeled": int(s[3])}
    return result

"""Evaluation passes: clean validation sets and the label-correction analysis.

Both run every model of interest (student, teacher) on one pass over the data, so each
image is decoded once. Sums are all-reduced, so a distributed evaluation that sees each
sample once on some rank gives exactly the single-process numbers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from nrd_dist.metrics import ClassificationMeter

# name -> function mapping an image batch [B, C, H, W] to logits [B, K]
Predictors = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


@torch.inference_mode()
def evaluate(predictors: Predictors, batches: Iterable[dict], to_device: Callable, autocast: Callable,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, ClassificationMeter]:
    """Top-1/top-5/ECE of each predictor against ``batch["label"]`` (clean val labels)."""
    meters = {name: ClassificationMeter() for name in predictors}
    for batch in batches:
        images = to_device(batch["image"])
        for name, predict in predictors.items():
            with autocast():
                logits = predict(images)
            meters[name].update(torch.softmax(logits.float(), dim=-1), batch["label"])
    for meter in meters.values():
        meter.all_reduce(reduce_sum)
    return meters


@torch.inference_mode()
def label_correction(predictors: Predictors, batches: Iterable[dict], to_device: Callable, autocast: Callable,
                     reduce_sum: Callable[[torch.Tensor], torch.Tensor], max_samples: int) -> dict:
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
    for batch in batches:
        if seen >= max_samples:
            break
        plain, views = batch["image"]
        clean, given = batch["clean_label"], batch["label"]
        keep = clean >= 0
        if not keep.any():
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

"""Evaluation passes, and the one definition of the label-correction analysis (Table 1).

* :func:`evaluate`: top-1/top-5/ECE on clean validation sets.
* :func:`label_correction`: the paper's Table 1 / Fig. 5 at the end of a run: accuracy
  against the *clean* labels of training samples, split into samples whose training label
  is clean and those that are mislabeled, on the plain image and on the K-view ensemble.

The analysis has one definition, shared with the diagnostics tools (``tools/diagnose.py``
computes the same table afterwards from a checkpoint, and gets the same numbers for the
same samples, K and seed):

* the images: :class:`LabelCorrectionViews`, read by a ``ShardStream`` with
  ``per_sample_seed=True``, so the K views of a sample are drawn from ``(seed, key)``
  whatever the batch, worker or rank that reads it;
* the K-view ensemble: :func:`view_ensemble`, the mean over the views of the softmax
  probabilities (the paper's teacher-augmentation ensembling);
* a prediction: the argmax of :func:`class_log_probs` (plain) or of the ensemble;
* the counting: :class:`Table1`.

Both passes run every model of interest (student, teacher) on one pass over the data, so
each image is decoded once. Sums are all-reduced, so a distributed evaluation that sees
each sample once on some rank gives exactly the single-process numbers.

Ranks hold different numbers of batches (shards are dealt, not split), yet a ZeRO-3
forward is a collective: every rank must run the same number of forwards. The passes
therefore run in lockstep; a rank out of data runs idle forwards on a dummy input, as
many as a real batch takes, and counts nothing, until every rank is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from nrd_dist.data.augment import Policy
from nrd_dist.data.bad_data import bad_reports
from nrd_dist.metrics import ClassificationMeter

# name -> function mapping an image batch [B, C, H, W] to logits [B, classes]
Predictors = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

# The two ways a training sample is predicted in the analysis: the keys of summary.json's
# ``label_correction`` and of diagnose.json's ``table1``.
PLAIN, VIEWS = "plain", "augmix_ensemble"


@dataclass
class EvalContext:
    """What a pass needs from the engine."""

    to_device: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    lockstep: bool = False  # distributed: keep every rank's forward count equal
    idle_input: Optional[torch.Tensor] = None  # [1, C, H, W] for idle forwards
    warn: Callable[[str], None] = print  # reports of skipped bad samples (key, shard URL)


def in_lockstep(batches: Iterable[dict], ctx: EvalContext) -> Iterator[Optional[dict]]:
    """Yield this rank's batches, then None (idle) until no rank has batches left."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not ctx.lockstep:
            if batch is None:
                return
        elif float(ctx.reduce_sum(torch.tensor([0.0 if batch is None else 1.0]))) == 0:
            return
        yield batch


def _idle_forwards(predictors: Predictors, ctx: EvalContext, per_predictor: int) -> None:
    """The forwards of one batch, on the dummy input: ``per_predictor`` per predictor, in
    the order a real batch runs them (all of one predictor's, then the next's)."""
    images = ctx.to_device(ctx.idle_input)
    for predict in predictors.values():
        for _ in range(per_predictor):
            with ctx.autocast():
                predict(images)


@torch.no_grad()  # not inference_mode: ZeRO-3's parameter gathering must work here
def evaluate(predictors: Predictors, batches: Iterable[dict], ctx: EvalContext) -> dict[str, ClassificationMeter]:
    """Top-1/top-5/ECE of each predictor against ``batch["label"]`` (clean val labels)."""
    meters = {name: ClassificationMeter() for name in predictors}
    for batch in in_lockstep(batches, ctx):
        if batch is None:
            _idle_forwards(predictors, ctx, per_predictor=1)
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


# ----------------------------------------------------------------------------- label correction


class LabelCorrectionViews:
    """The analysis' transform: uint8 ``[C, H, W]`` -> ``{"views": float [K, C, S, S]}``,
    K teacher views (AugMix, then the policy's crop and flip), and, with ``plain``,
    ``"plain": float [C, S, S]``, the eval transform.

    The views are drawn first, so they do not depend on whether the plain image is made
    (``find_mislabeled`` skips it). Read it with ``ShardStream(per_sample_seed=True)``:
    the views then depend on ``(seed, key)`` only.
    """

    def __init__(self, policy: Policy, views: int, plain: bool = True):
        if views < 1:
            raise ValueError(f"views: must be >= 1, got {views}")
        self.policy, self.views, self.plain = policy, views, plain

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"views": torch.stack([self.policy.teacher(image) for _ in range(self.views)])}
        if self.plain:
            out["plain"] = self.policy.eval(image)
        return out


def class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension, in float32 whatever the autocast dtype of
    ``logits`` (``[..., classes]``): what predictions and ensembles are made of."""
    return logits.float().log_softmax(-1)


def view_ensemble(view_log_probs: torch.Tensor) -> torch.Tensor:
    """THE K-view ensemble: ``log mean_k p_k``, the log of the mean over the K views of
    the softmax probabilities.

    ``view_log_probs``: ``[B, K, classes]``, each view's :func:`class_log_probs`.
    Returns ``[B, classes]``, normalised (its exp sums to 1 per sample). Computed as
    ``logsumexp_k log p_k - log K``: a probability too small for float32 (the diagnostics'
    ``log p(given label)`` of a confidently rejected label) stays finite instead of
    ``log 0``. Its argmax is the argmax of the mean probabilities.
    """
    return torch.logsumexp(view_log_probs, 1) - math.log(view_log_probs.shape[1])


class Table1:
    """The counts behind the paper's Table 1, per (model, mode).

    A sample counts when its clean label is known (>= 0); it is *mislabeled* when its
    training label differs from its clean label, else *clean*. Per (model, mode) the
    counts are ``float64 [4]``: correct on clean samples, clean samples, correct on
    mislabeled samples, mislabeled samples; "correct" is prediction == clean label.
    float64 holds the counts exactly (up to 2**53) and is what every backend all-reduces.
    Every (model, mode) starts at zero, so every rank holds the same tensors to reduce,
    counted samples or not.
    """

    def __init__(self, models: Iterable[str], modes: Iterable[str] = (PLAIN, VIEWS)):
        modes = tuple(modes)
        # model -> mode -> float64 [4]
        self.counts = {model: {mode: torch.zeros(4, dtype=torch.float64) for mode in modes} for model in models}

    def add(self, model: str, mode: str, prediction: torch.Tensor, given: torch.Tensor, clean: torch.Tensor) -> None:
        """Count one batch. ``prediction``, ``given`` (training label), ``clean`` (clean
        label, -1: unknown): int64 ``[B]`` tensors (or arrays), on any device."""
        prediction, given, clean = (torch.as_tensor(t).cpu() for t in (prediction, given, clean))
        known = clean >= 0
        correct = (prediction == clean)[known]
        mislabeled = (given != clean)[known]
        self.counts[model][mode] += torch.tensor(
            [(correct & ~mislabeled).sum(), (~mislabeled).sum(), (correct & mislabeled).sum(), mislabeled.sum()],
            dtype=torch.float64,
        )

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the counts over ranks (every rank must hold the same models and modes)."""
        for per_mode in self.counts.values():
            for mode, counts in per_mode.items():
                per_mode[mode] = reduce_sum(counts)

    def sample_counts(self) -> dict[str, int]:
        """``{"clean": n, "mislabeled": n}``: the samples counted (the same for every
        model and mode, which all see the same samples)."""
        counts = next((c for per_mode in self.counts.values() for c in per_mode.values()), torch.zeros(4))
        return {"clean": int(counts[1]), "mislabeled": int(counts[3])}

    def accuracies(self, empty: Optional[float] = math.nan) -> dict[str, dict[str, dict[str, Optional[float]]]]:
        """``{model: {mode: {"clean": %, "mislabeled": %}}}``: accuracy against the clean
        labels in percent, ``empty`` for a subset without samples."""

        def percent(correct: torch.Tensor, total: torch.Tensor) -> Optional[float]:
            return 100.0 * float(correct / total) if total else empty

        return {
            model: {
                mode: {"clean": percent(c[0], c[1]), "mislabeled": percent(c[2], c[3])} for mode, c in per_mode.items()
            }
            for model, per_mode in self.counts.items()
        }


def _until_counted(batches: Iterable[dict], max_samples: int) -> Iterator[dict]:
    """``batches`` until they hold ``max_samples`` samples with a known clean label; the
    next batch is read only while fewer have been handed on (so none is read in vain)."""
    counted = 0
    for batch in batches:
        yield batch
        counted += int((batch["clean_label"] >= 0).sum())
        if counted >= max_samples:
            return


def _label_correction_batch(predictors: Predictors, batch: dict, ctx: EvalContext, table: Table1) -> None:
    """Predict and count one batch (``image``: ``{"plain": [B, C, S, S], "views": [B, K,
    C, S, S]}``); samples without a known clean label are left out."""
    known = batch["clean_label"] >= 0
    given, clean = batch["label"][known], batch["clean_label"][known]
    plain = ctx.to_device(batch["image"]["plain"][known])
    views = batch["image"]["views"][known]
    b, k = views.shape[:2]
    views = ctx.to_device(views.flatten(0, 1))
    for name, predict in predictors.items():
        with ctx.autocast():  # two forwards per predictor: what _idle_forwards mirrors
            plain_logits, view_logits = predict(plain), predict(views)
        table.add(name, PLAIN, class_log_probs(plain_logits).argmax(-1), given, clean)
        ensemble = view_ensemble(class_log_probs(view_logits).reshape(b, k, -1))
        table.add(name, VIEWS, ensemble.argmax(-1), given, clean)


@torch.no_grad()
def label_correction(predictors: Predictors, batches: Iterable[dict], ctx: EvalContext, max_samples: int) -> dict:
    """Table 1 on this rank's first ``max_samples`` training samples with a clean label
    (whole batches: a few more when the batch size does not divide it), summed over ranks.

    ``batches``: from a ``ShardStream(train=False, per_sample_seed=True)`` over the
    training shards with :class:`LabelCorrectionViews` (plain image and K views).
    Returns ``{model: {"plain"|"augmix_ensemble": {"clean"|"mislabeled": acc %}},
    "counts": {"clean": n, "mislabeled": n}}`` (NaN for a subset without samples).
    """
    table = Table1(predictors)
    for batch in in_lockstep(_until_counted(batches, max_samples), ctx):
        if batch is not None and (batch["clean_label"] >= 0).any():
            _label_correction_batch(predictors, batch, ctx, table)
        else:  # out of data, or nothing to count: the other ranks may be mid-forward
            _idle_forwards(predictors, ctx, per_predictor=2)
    table.all_reduce(ctx.reduce_sum)
    return {**table.accuracies(), "counts": table.sample_counts()}

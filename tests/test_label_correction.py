"""The one definition of the label-correction analysis (the paper's Table 1) in
nrd_dist.evaluate: the K-view ensemble, the counting, and the in-run pass in lockstep.
tests/test_diagnostics.py checks that a run's in-run analysis and tools/diagnose.py give
the same numbers on a real run."""

import contextlib
import math

import numpy as np
import pytest
import torch

from nrd_dist.evaluate import PLAIN, VIEWS, EvalContext, Table1, class_log_probs, label_correction, view_ensemble


def test_the_ensemble_is_the_log_of_the_mean_of_the_views_softmax():
    logits = torch.randn(64, 5, 10, generator=torch.Generator().manual_seed(0)) * 4
    ensemble = view_ensemble(class_log_probs(logits))
    reference = torch.softmax(logits.double(), -1).mean(1)  # mean over the K = 5 views
    assert ensemble.shape == (64, 10)
    torch.testing.assert_close(ensemble.double().exp(), reference, rtol=1e-5, atol=1e-7)
    assert torch.equal(ensemble.argmax(-1), reference.argmax(-1))
    torch.testing.assert_close(ensemble.exp().sum(-1), torch.ones(64))
    # one view: the ensemble is that view's own prediction
    torch.testing.assert_close(view_ensemble(class_log_probs(logits[:, :1])), class_log_probs(logits[:, 0]))


def test_the_ensemble_keeps_tiny_probabilities_finite():
    """A label every view rejects with p ~ 1e-60 (below float32's range): its log stays
    finite and right, where the mean of float32 probabilities would give log 0."""
    logits = torch.tensor([[[0.0, -140.0], [0.0, -138.0]]])  # [B=1, K=2, classes=2]
    ensemble = view_ensemble(class_log_probs(logits))
    assert torch.isfinite(ensemble).all()
    expected = math.log((math.exp(-140.0) + math.exp(-138.0)) / 2)
    assert float(ensemble[0, 1]) == pytest.approx(expected, rel=1e-6)
    assert float(torch.softmax(logits, -1).mean(1)[0, 1].log()) == -math.inf


def test_table1_counts_clean_and_mislabeled_samples_against_the_clean_label():
    given = torch.tensor([0, 1, 2, 3, 4, 5])
    clean = torch.tensor([0, 1, 9, 9, 4, -1])  # samples 2, 3 mislabeled; 5 unknown
    prediction = torch.tensor([0, 7, 9, 3, 4, 5])  # right on 0, 4 (clean) and 2 (mislabeled)
    table = Table1(["student"], [PLAIN])
    table.add("student", PLAIN, prediction[:3], given[:3], clean[:3])  # in two batches
    table.add("student", PLAIN, prediction[3:].numpy(), given[3:].numpy(), clean[3:].numpy())
    assert table.sample_counts() == {"clean": 3, "mislabeled": 2}
    assert table.accuracies() == {"student": {PLAIN: {"clean": 100 * (2 / 3), "mislabeled": 50.0}}}
    table.all_reduce(lambda counts: 2 * counts)  # two ranks with the same samples
    assert table.sample_counts() == {"clean": 6, "mislabeled": 4}
    assert table.accuracies() == {"student": {PLAIN: {"clean": 100 * (2 / 3), "mislabeled": 50.0}}}

    empty = Table1(["student", "teacher"])
    empty.add("teacher", VIEWS, prediction[:2], given[:2], clean[:2])  # clean samples only
    accuracies = empty.accuracies()
    assert list(accuracies) == ["student", "teacher"] and list(accuracies["teacher"]) == [PLAIN, VIEWS]
    assert accuracies["teacher"][VIEWS]["clean"] == 50.0 and math.isnan(accuracies["teacher"][VIEWS]["mislabeled"])
    assert empty.accuracies(empty=None)["student"][PLAIN] == {"clean": None, "mislabeled": None}


class Recorder(torch.nn.Module):
    """A predictor that counts its forwards; its logits favour class ``image[0, 0, 0]``."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def forward(self, images):
        self.forwards += 1
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 4).float() * 5


def batch_of(classes, given, clean, k=2):
    """A collated label-correction batch whose images each hold their class."""
    classes = torch.tensor(classes, dtype=torch.float32)
    plain = classes[:, None, None, None].expand(-1, 1, 2, 2).clone()
    return {
        "image": {"plain": plain, "views": plain[:, None].expand(-1, k, -1, -1, -1).clone()},
        "label": torch.tensor(given),
        "clean_label": torch.tensor(clean),
        "key": [str(c) for c in given],
    }


def context(lockstep=False, reduce_sum=lambda t: t):
    return EvalContext(
        lambda t: t, contextlib.nullcontext, reduce_sum, lockstep=lockstep, idle_input=torch.zeros(1, 1, 2, 2)
    )


def test_label_correction_counts_whole_batches_up_to_max_samples():
    batches = [
        batch_of([0, 1, 2], [0, 1, 3], [0, 1, 2]),  # 2 clean right, 1 mislabeled right
        batch_of([3, 0], [3, 1], [3, -1]),  # 1 clean right, 1 unknown (not counted)
        batch_of([1], [1], [1]),
    ]  # never read: 4 samples counted before it
    read = []
    result = label_correction({"student": Recorder()}, (read.append(b) or b for b in batches), context(), 4)
    assert len(read) == 2
    assert result["counts"] == {"clean": 3, "mislabeled": 1}
    assert result["student"] == {
        PLAIN: {"clean": 100.0, "mislabeled": 100.0},
        VIEWS: {"clean": 100.0, "mislabeled": 100.0},
    }


def test_an_idle_rank_runs_the_forwards_of_a_real_batch():
    """ZeRO-3 forwards are collectives: a rank out of data must run as many forwards per
    round as a rank with a batch (plain and views: two per predictor)."""
    rounds = []

    def reduce_sum(tensor):  # the other rank: data for 2 rounds; this one: 1
        if tensor.numel() == 1:
            rounds.append(float(tensor))
            return tensor + (1.0 if len(rounds) <= 2 else 0.0)
        return tensor

    predictors = {"student": Recorder(), "teacher": Recorder()}
    label_correction(predictors, [batch_of([0, 1], [0, 1], [0, 1])], context(True, reduce_sum), 100)
    assert rounds == [1.0, 0.0, 0.0]  # a batch, an idle round, the end
    assert [p.forwards for p in predictors.values()] == [4, 4]


def test_a_rank_without_samples_reports_nan_and_zero_counts():
    result = label_correction({"student": Recorder()}, [batch_of([0], [0], [-1])], context(), 10)
    assert result["counts"] == {"clean": 0, "mislabeled": 0}
    assert all(np.isnan(v) for mode in result["student"].values() for v in mode.values())

"""``python tools/find_mislabeled.py RUN_DIR [--views K] [--shards URL] [--out FILE.csv] [--top N]
[--checkpoint NAME]``

Ranks training samples by how much the run's teacher (the student for runs without
one) disagrees with their given label over K AugMix teacher views:

    score = 1 - mean_k p_k(given label)      in [0, 1]; 1: no mass on the given label

Writes a CSV, most suspicious first (ties in ``score`` broken by the finer
``-log mean_k p_k(given label)``, then by key), with columns ``key, shard, given_label,
teacher_label, teacher_confidence, score`` and ``clean_label`` when known (the
``teacher_*`` columns hold the student's prediction for runs without a teacher), and
``FILE.summary.json`` beside it: the model used, counts and, when every sample has a
clean label, precision@k and recall@k of the ranking (k = 1%, 5%, 10% of the samples
and k = the number actually mislabeled) and its AUROC. Works on shards without clean
labels: then only the ranking.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nrd_dist.diagnostics.predictions import (
    SamplePredictions,
    add_arguments,
    describe,
    finite_or_none,
    predict_from_args,
    run_tool,
)
from nrd_dist.evaluate import VIEWS
from nrd_dist.metrics import auroc
from nrd_dist.run_log import write_json

SCORE = "1 - mean_k p_k(given label) over K AugMix teacher views"
FRACTIONS = {"1%": 0.01, "5%": 0.05, "10%": 0.10}


def ranking(predictions: SamplePredictions, model: str) -> tuple[np.ndarray, np.ndarray]:
    """``(order, score)``: sample indices most suspicious first, and the score per sample."""
    log_p_given = predictions.outputs[model][VIEWS].log_p_given
    score = -np.expm1(log_p_given)  # 1 - p, without cancellation for p near 1
    order = np.lexsort((np.asarray(predictions.keys), log_p_given))  # the last key sorts first
    return order, score


def precision_recall_at_k(ranked_mislabeled: np.ndarray) -> list[dict[str, Any]]:
    """Precision and recall of taking the top k as mislabeled, for the k of :data:`FRACTIONS`
    and k = the number of mislabeled samples (where precision equals recall).
    ``ranked_mislabeled``: bool [N], in ranking order."""
    n, positives = len(ranked_mislabeled), int(ranked_mislabeled.sum())
    cutoffs = {name: max(1, round(fraction * n)) for name, fraction in FRACTIONS.items()}
    if positives:
        cutoffs["number mislabeled"] = positives
    found = np.cumsum(ranked_mislabeled)
    return [
        {
            "k": name,
            "samples": k,
            "precision": int(found[k - 1]) / k,
            "recall": int(found[k - 1]) / positives if positives else None,
        }
        for name, k in cutoffs.items()
    ]


def write_ranking(
    predictions: SamplePredictions,
    model: str,
    order: np.ndarray,
    score: np.ndarray,
    path: Path,
    top: Optional[int] = None,
) -> int:
    """The CSV, ``top`` rows at most; returns the number of rows written."""
    out = predictions.outputs[model][VIEWS]
    with_clean = bool((predictions.clean >= 0).any())
    rows = order if top is None else order[:top]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["key", "shard", "given_label", "teacher_label", "teacher_confidence", "score"]
            + (["clean_label"] if with_clean else [])
        )
        for i in rows:
            clean = int(predictions.clean[i])
            writer.writerow(
                [
                    predictions.keys[i],
                    predictions.shards[i],
                    int(predictions.given[i]),
                    int(out.prediction[i]),
                    float(out.confidence[i]),
                    float(score[i]),
                ]
                + ([clean if clean >= 0 else ""] if with_clean else [])
            )
    return len(rows)


def summarize(predictions: SamplePredictions, model: str, order: np.ndarray) -> dict[str, Any]:
    known = int((predictions.clean >= 0).sum())
    summary: dict[str, Any] = {
        "model": model,
        "score": SCORE,
        "clean_labels": predictions.has_clean_labels,
        "clean_labels_known": known,
    }
    if predictions.has_clean_labels:
        mislabeled = predictions.mislabeled
        summary["mislabeled"] = int(mislabeled.sum())
        summary["at_k"] = precision_recall_at_k(mislabeled[order])
        # From -log p (the ranking's own order) rather than 1 - p, which rounds to 1.0 for
        # p below ~1e-16: equal to diagnose.py's augmix_ensemble AUROC.
        summary["auroc"] = finite_or_none(auroc(-predictions.outputs[model][VIEWS].log_p_given, mislabeled))
    elif known:
        summary["note"] = f"clean labels known for {known} of {len(predictions.keys)} samples: no precision/recall"
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="find_mislabeled.py", description=__doc__.split("\n\n")[1].strip())
    add_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the CSV (default: RUN_DIR/diagnose/mislabeled.csv); the summary goes beside it",
    )
    parser.add_argument("--top", type=int, default=None, metavar="N", help="write only the N most suspicious rows")
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        parser.error(f"--top: must be >= 1, got {args.top}")

    def body() -> int:
        run, urls, predictions = predict_from_args(args, "auto", plain=False, require_clean=False)
        (model,) = run.models
        out = args.out or args.run_dir / "diagnose" / "mislabeled.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        order, score = ranking(predictions, model)
        rows = write_ranking(predictions, model, order, score, out, args.top)
        summary = {
            **describe(run, urls, predictions),
            **summarize(predictions, model, order),
            "csv": str(out),
            "rows": rows,
        }
        summary_path = write_json(out.with_name(out.stem + ".summary.json"), summary)
        print(
            f"ranked {len(order)} samples by the {model}'s disagreement with their label over "
            f"{predictions.views} AugMix views: {out} ({rows} rows), {summary_path}"
        )
        for entry in summary.get("at_k", []):
            recall = "-" if entry["recall"] is None else f"{entry['recall']:.3f}"
            print(f"  top {entry['samples']} ({entry['k']}): precision {entry['precision']:.3f}, recall {recall}")
        if summary.get("auroc") is not None:
            print(f"  AUROC {summary['auroc']:.4f}")
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())

"""``python tools/diagnose.py RUN_DIR [--which teacher|student|both] [--views K] [--max-samples N]
[--shards URL] [--out DIR] [--checkpoint NAME]``

The paper's Table 1 and Fig. 1 for a run's latest checkpoint (or the one ``--checkpoint``
names) on its training shards, which must carry clean labels (or the run applied its
noise at load time):

* Table 1: accuracy against the CLEAN labels on clean training samples and on
  mislabeled ones (training label != clean label), on the plain image and with the
  softmax averaged over K AugMix teacher views.
* Fig. 1: histograms of log p(clean label) for clean vs mislabeled samples, plain and
  K-view average; the AUROC of detecting mislabeled samples with the score
  ``-log p(given label)``, plain and K-view average.
* ECE (15 bins) against the clean labels, and a reliability diagram.

Writes ``diagnose.json``, ``samples.csv`` (the per-sample numbers behind it all) and
PNGs into ``--out`` (default ``RUN_DIR/diagnose``), and prints a short table.
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
from nrd_dist.evaluate import PLAIN, VIEWS, Table1
from nrd_dist.metrics import auroc, histograms, reliability_diagram
from nrd_dist.run_log import write_json

MODE_TITLES = {PLAIN: "plain image", VIEWS: "mean over {k} AugMix views"}


def table1(predictions: SamplePredictions) -> Table1:
    """The paper's Table 1 of one pass, counted by the accumulator the run's own
    label-correction analysis uses (:class:`nrd_dist.evaluate.Table1`)."""
    modes = next(iter(predictions.outputs.values()))  # every model has the same modes
    table = Table1(predictions.outputs, modes)
    for name, per_model in predictions.outputs.items():
        for mode, out in per_model.items():
            table.add(name, mode, out.prediction, predictions.given, predictions.clean)
    return table


def log_likelihood_summary(values: np.ndarray) -> dict[str, Optional[float]]:
    """Mean and median of log p(clean label) over a subset; None (JSON null) if empty."""
    if not len(values):
        return {"mean": None, "median": None}
    return {"mean": finite_or_none(float(np.mean(values))), "median": finite_or_none(float(np.median(values)))}


def diagnose(predictions: SamplePredictions) -> dict[str, Any]:
    """Table 1, AUROC, calibration and log-likelihood summaries of one pass (clean labels
    known for every sample). Accuracies in percent; ``None`` where a subset is empty."""
    mislabeled = predictions.mislabeled
    counted = table1(predictions)
    result: dict[str, Any] = {
        "counts": counted.sample_counts(),
        "table1": counted.accuracies(empty=None),
        "auroc": {},
        "calibration": {},
        "clean_label_log_likelihood": {},
    }
    for name, modes in predictions.outputs.items():
        for section in ("auroc", "calibration", "clean_label_log_likelihood"):
            result[section][name] = {}
        for mode, out in modes.items():
            result["auroc"][name][mode] = finite_or_none(auroc(-out.log_p_given, mislabeled))
            result["calibration"][name][mode] = out.meter.compute()
            result["clean_label_log_likelihood"][name][mode] = {
                "clean": log_likelihood_summary(out.log_p_clean[~mislabeled]),
                "mislabeled": log_likelihood_summary(out.log_p_clean[mislabeled]),
            }
    return result


def write_samples_csv(predictions: SamplePredictions, path: Path) -> Path:
    """One row per sample: key, shard, labels and, per model and mode, log p(clean label),
    log p(given label) and the predicted class."""
    columns = [(f"{name}_{mode}", out) for name, modes in predictions.outputs.items() for mode, out in modes.items()]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["key", "shard", "given_label", "clean_label", "mislabeled"]
            + [f"{prefix}_{field}" for prefix, _ in columns for field in ("log_p_clean", "log_p_given", "prediction")]
        )
        mislabeled = predictions.mislabeled
        for i, key in enumerate(predictions.keys):
            row = [key, predictions.shards[i], int(predictions.given[i]), int(predictions.clean[i]), int(mislabeled[i])]
            for _, out in columns:
                row += [float(out.log_p_clean[i]), float(out.log_p_given[i]), int(out.prediction[i])]
            writer.writerow(row)
    return path


def plot(predictions: SamplePredictions, out_dir: Path, title: str) -> list[str]:
    """Fig. 1 (one PNG per model) and the reliability diagram; returns the file names."""
    mislabeled = predictions.mislabeled
    names = []
    for name, modes in predictions.outputs.items():
        panels = {
            f"{name}, {MODE_TITLES[mode].format(k=predictions.views)}": {
                "clean samples": out.log_p_clean[~mislabeled],
                "mislabeled samples": out.log_p_clean[mislabeled],
            }
            for mode, out in modes.items()
        }
        names.append(histograms(panels, out_dir / f"log_likelihood_{name}.png", "log p(clean label)", title).name)
    curves = {}
    for name, modes in predictions.outputs.items():
        for mode, out in modes.items():
            label = f"{name}, {MODE_TITLES[mode].format(k=predictions.views)}"
            curves[f"{label} (ECE {100 * out.meter.compute()['ece']:.1f}%)"] = out.meter.reliability()
    names.append(reliability_diagram(curves, out_dir / "reliability.png", f"{title}: against clean labels").name)
    return names


def table(report: dict[str, Any]) -> str:
    """The printed summary: one line per model and mode."""

    def cell(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    counts = report["counts"]
    lines = [
        f"{report['run_dir']} ({report['checkpoint']}): {report['samples']} training samples, "
        f"{counts['clean']} clean, {counts['mislabeled']} mislabeled; K={report['views']} AugMix views",
        f"{'model':<8} {'mode':<16} {'acc clean':>9} {'acc mislab.':>11} {'AUROC':>6} {'ECE':>6}",
    ]
    for name, modes in report["table1"].items():
        for mode, accuracy in modes.items():
            lines.append(
                f"{name:<8} {mode:<16} {cell(accuracy['clean'], '9.2f')} "
                f"{cell(accuracy['mislabeled'], '11.2f')} {cell(report['auroc'][name][mode], '6.3f')} "
                f"{cell(report['calibration'][name][mode]['ece'], '6.3f')}"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="diagnose.py", description=__doc__.split("\n\n")[1].strip())
    add_arguments(parser)
    parser.add_argument(
        "--which",
        choices=["teacher", "student", "both"],
        default="both",
        help="models to diagnose (both: the student and, if the run has one, the teacher)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/diagnose)")
    args = parser.parse_args(argv)

    def body() -> int:
        run, urls, predictions = predict_from_args(args, args.which, plain=True, require_clean=True)
        out_dir = args.out or args.run_dir / "diagnose"
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = run.cfg
        title = f"{cfg.loss.name}, {run.checkpoint.name}, {cfg.data.noise.type} noise {cfg.data.noise.rate}"
        report = {**describe(run, urls, predictions), **diagnose(predictions)}
        report["plots"] = plot(predictions, out_dir, title)
        report["samples_csv"] = write_samples_csv(predictions, out_dir / "samples.csv").name
        write_json(out_dir / "diagnose.json", report)
        print(table(report))
        print(f"wrote {out_dir / 'diagnose.json'}, samples.csv and {', '.join(report['plots'])}")
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())

"""docs/results/README.md and its plots from the sweep's cell files (benchmarks/noisy_labels.py).

Tables: clean test top-1 at the last epoch (mean +- sd over seeds) and ECE per method and
setting; the selection grid with its noisy-validation scores. Plots: test top-1 against
epoch per method for each setting (the memorization picture), reliability diagrams at
40% and 60% symmetric noise. Diagnostics of the CE and NRD cells: Table 1, AUROC and
precision@k of the mislabeled-sample ranking.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from nrd_dist.metrics import line_plot, reliability_diagram


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def final_cells(results: list[dict], selected: dict[str, Optional[int]]) -> list[dict]:
    """The cells that count: each method's selected grid entry."""
    return [r for r in results if selected.get(r["method"]) == r["grid_index"]]


def table(rows: dict[str, dict[str, list[float]]], settings: list[str], header: str) -> list[str]:
    lines = [f"| {header} | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for name, by_setting in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_sd(by_setting.get(s, [])) for s in settings) + " |")
    return lines


def mean(values: list[float]) -> Optional[float]:
    return statistics.mean(values) if values else None


def number(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def target_lines(top1: dict[str, dict[str, list[float]]], ece: dict[str, dict[str, list[float]]]) -> list[str]:
    """The issue's targets, judged on the means over seeds of the student's last-epoch numbers
    (NRD's teacher alongside): stated whether met or not, and '–' while a cell is missing."""
    def verdict(met: Optional[bool]) -> str:
        return "not yet run" if met is None else ("met" if met else "**not met**")

    def compare(rows, setting, ours, theirs, margin, lower_is_better):
        """NRD's mean against the other method's: at least ``margin`` better when a margin
        is given, else strictly better (lower, for ECE)."""
        a, b = mean(rows.get(ours, {}).get(setting, [])), mean(rows.get(theirs, {}).get(setting, []))
        met = None
        if a is not None and b is not None:
            gain = b - a if lower_is_better else a - b
            met = gain >= margin if margin else gain > 0
        return number(a), number(b), met

    lines = ["## Targets", "", "Judged on the mean over seeds of the student's last-epoch numbers.", "",
             "| target | setting | NRD | other | NRD teacher | verdict |", "|---|---|---|---|---|---|"]
    checks = [("top-1: NRD >= CE + 5 points", top1, "CE", "sym60", 5.0, False),
              ("top-1: NRD > GJS", top1, "GJS", "sym60", 0.0, False),
              ("top-1: NRD > GJS", top1, "GJS", "sym80", 0.0, False)]
    checks += [("ECE: NRD < CE", ece, "CE", setting, 0.0, True) for setting in ("sym40", "sym60", "sym80", "asym40")]
    for name, rows, other, setting, margin, lower in checks:
        ours, theirs, met = compare(rows, setting, "NRD", other, margin, lower)
        teacher = mean(rows.get("NRD (teacher)", {}).get(setting, []))
        lines.append(f"| {name} | {setting} | {ours} | {other} {theirs} | {number(teacher)} | {verdict(met)} |")
    return lines + ["", "ECE alone rewards a model that predicts close to uniform (at 80% noise a model that has",
                    "learned little is 'well calibrated'): read it together with top-1.", ""]


def memorization_lines(cells: list[dict], settings: list[str], labels: dict[str, str]) -> list[str]:
    """How far each method's clean test top-1 falls from its best epoch to its last: the paper's
    point is that robust losses stop the late-training fall that fitting the noise causes."""
    drops: dict[str, dict[str, list[float]]] = {}
    for cell in cells:
        drops.setdefault(labels[cell["method"]], {}).setdefault(cell["setting"], []).append(
            cell["test_top1_best"] - cell["test_top1_last"])
    ordered = {labels[m]: drops[labels[m]] for m in labels if labels[m] in drops}
    return ["## Memorization: best-epoch minus last-epoch clean test top-1 (points)", "",
            "Test accuracy is recorded every 5 epochs; a large drop means the model first learned the clean",
            "signal and then fitted the noisy labels. Reported numbers above are last-epoch, never the best.", "",
            *table(ordered, settings, "method"), ""]


def diagnosis_lines(diagnosed: list[dict], counted: Optional[set[str]] = None) -> list[str]:
    """Table 1 and the mislabeled-detection AUROC per noise setting (tools/diagnose.py), and
    precision@k and recall@k of the ranking tools/find_mislabeled.py writes. A run outside
    ``counted`` (a grid entry the selection did not pick) is marked as such."""
    if not diagnosed:
        return []

    def run_name(report: dict) -> str:
        return report["cell"] + ("" if counted is None or report["cell"] in counted else " (not selected)")

    views = "/".join(str(v) for v in sorted({r.get("views", 10) for r in diagnosed}))
    lines = [f"## Mislabeled training samples (tools/diagnose.py, K = {views} AugMix views)", "",
             "Accuracy against the clean label on training samples whose label is clean / mislabeled, on the plain",
             "image and averaged over the K views; AUROC of detecting mislabeled samples by -log p(given label).", "",
             "| run | model | clean: plain | clean: K views | mislabeled: plain | mislabeled: K views "
             "| AUROC plain | AUROC K views |", "|---|---|---|---|---|---|---|---|"]
    for report in diagnosed:
        for model, modes in report["table1"].items():
            auroc = report["auroc"][model]
            cells = [number(modes[m][subset], 1) for subset in ("clean", "mislabeled")
                     for m in ("plain", "augmix_ensemble")]
            cells += [number(auroc[m], 3) for m in ("plain", "augmix_ensemble")]
            lines.append(f"| {run_name(report)} | {model} | " + " | ".join(cells) + " |")
    ranked = [r for r in diagnosed if "find_mislabeled" in r]
    if ranked:
        lines += ["", f"### Cleaning the data: tools/find_mislabeled.py (K = {views} views)", "",
                  "Training samples ranked by the model's disagreement with their given label (1 - p(given label)",
                  "of the prediction averaged over the K views); precision of taking the top k as mislabeled (k =",
                  f"1/5/10% of the {ranked[0]['samples']:,} samples, and k = the number actually mislabeled, where precision equals",
                  "recall), and the share of all mislabeled samples found in the top 10% (recall@10%). Where",
                  "most labels are wrong (80%) a high precision@k is easy: compare the AUROC.", "",
                  "| run | model | mislabeled | precision@1% | precision@5% | precision@10% | precision@#mislabeled "
                  "| recall@10% | AUROC |", "|---|---|---|---|---|---|---|---|---|"]
        for report in ranked:
            found = report["find_mislabeled"]
            at_k = {entry["k"]: entry for entry in found.get("at_k") or []}
            cells = [number(at_k.get(k, {}).get("precision"), 3) for k in ("1%", "5%", "10%", "number mislabeled")]
            cells.append(number(at_k.get("10%", {}).get("recall"), 3))
            mislabeled = "–" if found.get("mislabeled") is None else found["mislabeled"]
            lines.append(f"| {run_name(report)} | {found['model']} | {mislabeled} | " + " | ".join(cells)
                         + f" | {number(found['auroc'], 3)} |")
    return lines + ["", *rerun_notes(diagnosed)]


def rerun_notes(diagnosed: list[dict]) -> list[str]:
    """Which diagnosed checkpoints come from a retraining (run folders are not committed) and
    whether that retraining landed on the committed result, so a mismatch is never hidden."""
    notes = []
    for report in diagnosed:
        run = report.get("checkpoint_run") or {}
        if not run.get("rerun"):
            continue
        if run.get("reproduces_committed_result"):
            notes.append(f"* {report['cell']}: checkpoint from a retraining at commit {run['commit'][:7]}; "
                         "it reproduced the committed cell's last-epoch numbers exactly.")
        else:
            notes.append(f"* {report['cell']}: checkpoint from a retraining at commit {run['commit'][:7]} that did "
                         f"NOT reproduce the committed cell (its test top-1 {number(run.get('rerun_test_top1_last'), 2)}); "
                         "the rows above describe the retrained model.")
    return notes + [""] if notes else []


def mean_curve(runs: list[list[list[float]]]) -> tuple[list[tuple[float, float]], list[tuple[float, float, float]]]:
    """The mean over seeds of ``[[epoch, top1], ...]`` curves at the epochs all of them have,
    and a +- 1 sd band (empty for one seed)."""
    epochs = sorted(set.intersection(*({e for e, _ in run} for run in runs)))
    by_epoch = [[dict(map(tuple, run))[e] for run in runs] for e in epochs]
    mean = [(e, statistics.mean(v)) for e, v in zip(epochs, by_epoch)]
    if len(runs) < 2:
        return mean, []
    return mean, [(e, m - statistics.stdev(v), m + statistics.stdev(v)) for (e, m), v in zip(mean, by_epoch)]


def write_report(results: list[dict], selected: dict[str, Optional[int]], out: Path, settings: list[str],
                 methods: list[str], labels: dict[str, str], protocol: str, diagnosed: list[dict] = (),
                 status: str = "", reading: str = "") -> Path:
    cells = final_cells(results, selected)
    top1: dict[str, dict[str, list[float]]] = {}
    ece: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        for cell in (c for c in cells if c["method"] == method):
            top1.setdefault(labels[method], {}).setdefault(cell["setting"], []).append(cell["test_top1_last"])
            ece.setdefault(labels[method], {}).setdefault(cell["setting"], []).append(100 * cell["test_ece_last"])
            if "teacher_test_top1_last" in cell:
                name = f"{labels[method]} (teacher)"
                top1.setdefault(name, {}).setdefault(cell["setting"], []).append(cell["teacher_test_top1_last"])
                ece.setdefault(name, {}).setdefault(cell["setting"], []).append(100 * cell["teacher_test_ece_last"])

    lines = ["# Noisy-label benchmark: Fashion-MNIST", "",
             "Produced by `benchmarks/noisy_labels.py` (run, `diagnose`, then `table`); every number below",
             "comes from the cell files in `cells/` and the diagnostics in `diagnose/`, each holding its",
             "exact command. An earlier sweep (v1) was stopped when its model turned out to lose its",
             "hidden units at high noise: [v1](v1/README.md).", "", f"**Status:** {status}", "",
             "## Clean test top-1 (%) at the last epoch", "", *table(top1, settings, "method"), "",
             "## Expected calibration error (%, 15 bins) at the last epoch", "", *table(ece, settings, "method"), "",
             *target_lines(top1, ece), *(["## Reading the results", "", reading.strip(), ""] if reading else []),
             *memorization_lines(cells, settings, labels),
             "## Hyperparameter selection (noisy validation top-1 %, 40% symmetric, seed 0)", "",
             "| method | grid entry | noisy-val top-1 | selected |", "|---|---|---|---|"]
    for method in methods:
        for cell in sorted((r for r in results if r["method"] == method and r["setting"] == "sym40"
                            and r["seed"] == 0), key=lambda r: r["grid_index"]):
            mark = "yes" if selected.get(method) == cell["grid_index"] else ""
            lines.append(f"| {labels[method]} | `{cell['hyperparameters']}` | {cell['noisy_val_top1_last']:.2f} | {mark} |")

    lines += ["", *diagnosis_lines(list(diagnosed), {c["cell"] for c in cells})]
    histograms = sorted((out / "diagnose").glob("*-log_likelihood_*.png"))
    if histograms:
        lines += ["### Fig. 1: log p(clean label) of clean and mislabeled training samples", "",
                  "Plain image (left) and the K-view average (right), from `tools/diagnose.py`:", "",
                  *[f"![{p.stem}](diagnose/{p.name})" for p in histograms], ""]
    plots = []
    for setting in settings:
        series, bands, seed_counts = {}, {}, set()
        for method in methods:
            runs = [c["curves"]["fmnist_test/student"] for c in cells if c["method"] == method and c["setting"] == setting]
            if runs:
                series[labels[method]], bands[labels[method]] = mean_curve(runs)
                seed_counts.add(len(runs))
        low, high = min(seed_counts, default=1), max(seed_counts, default=1)
        seeds = ("seed 0" if high == 1 else f"mean of {low if low == high else f'{low}-{high}'} seeds"
                 f"{'' if low == high else ' per method'}, band ±1 sd")
        path = line_plot(series, out / f"curves_{setting}.png", "epoch", "clean test top-1 (%)",
                         f"Fashion-MNIST, {setting}: student test accuracy per epoch\n({seeds})", bands)
        if path:
            plots.append(f"![{setting}](curves_{setting}.png)")
    for setting in ("sym40", "sym60"):
        curves = {}
        for method in methods:
            cell = next((c for c in cells if c["method"] == method and c["setting"] == setting and c["seed"] == 0), None)
            if cell and "student" in cell["reliability"]:
                curves[f"{labels[method]} (ECE {100 * cell['test_ece_last']:.1f}%)"] = cell["reliability"]["student"]
        if curves:
            reliability_diagram(curves, out / f"reliability_{setting}.png", f"Fashion-MNIST, {setting}, seed 0")
            plots.append(f"![reliability {setting}](reliability_{setting}.png)")
    lines += ["", "## Plots", "", *plots, "", "## Protocol", "", "```", protocol.strip(), "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path

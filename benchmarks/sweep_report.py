"""The results pages and their plots, from the sweeps' cell files alone.

v3 (``benchmarks/sweep_v3.py table``): docs/results/v3/README.md and the index
docs/results/README.md, from the cells in docs/results/v3/cells (``Sweep``, ``write_v3_report``,
``write_index``; the section "sweep v3" below).

v2 (``benchmarks/noisy_labels.py table``): docs/results/v2/README.md (``write_report``).
Tables: clean test top-1 at the last epoch (mean +- sd over seeds) and ECE per method and
setting; the selection grid with its noisy-validation scores. Plots: test top-1 against
epoch per method for each setting (the memorization picture), reliability diagrams at
40% and 60% symmetric noise. Diagnostics of the CE and NRD cells: Table 1, AUROC and
precision@k of the mislabeled-sample ranking.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nrd_dist.metrics import line_plot, reliability_diagram


def write_page(folder: Path, lines: list[str]) -> Path:
    """``folder``/README.md with ``lines``."""
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def mean_sd(values: list[float], digits: int = 2, mark_n: bool = False) -> str:
    """Mean ± sample sd (n=N); a single value alone, with "(n=1)" when ``mark_n``."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}" + (" (n=1)" if mark_n else "")
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def final_cells(results: list[dict], selected: dict[str, Optional[int]]) -> list[dict]:
    """The cells that count: each method's selected grid entry."""
    return [r for r in results if selected.get(r["method"]) == r["grid_index"]]


def table(rows: dict[str, dict[str, list[float]]], settings: list[str], header: str, mark_n: bool = False) -> list[str]:
    lines = [f"| {header} | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for name, by_setting in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(mean_sd(by_setting.get(s, []), mark_n=mark_n) for s in settings) + " |"
        )
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

    lines = [
        "## Targets",
        "",
        "Judged on the mean over seeds of the student's last-epoch numbers.",
        "",
        "| target | setting | NRD | other | NRD teacher | verdict |",
        "|---|---|---|---|---|---|",
    ]
    checks = [
        ("top-1: NRD >= CE + 5 points", top1, "CE", "sym60", 5.0, False),
        ("top-1: NRD > GJS", top1, "GJS", "sym60", 0.0, False),
        ("top-1: NRD > GJS", top1, "GJS", "sym80", 0.0, False),
    ]
    checks += [("ECE: NRD < CE", ece, "CE", setting, 0.0, True) for setting in ("sym40", "sym60", "sym80", "asym40")]
    for name, rows, other, setting, margin, lower in checks:
        ours, theirs, met = compare(rows, setting, "NRD", other, margin, lower)
        teacher = mean(rows.get("NRD (teacher)", {}).get(setting, []))
        lines.append(f"| {name} | {setting} | {ours} | {other} {theirs} | {number(teacher)} | {verdict(met)} |")
    return lines + [
        "",
        "ECE alone rewards a model that predicts close to uniform (at 80% noise a model that has",
        "learned little is 'well calibrated'): read it together with top-1.",
        "",
    ]


def memorization_lines(cells: list[dict], settings: list[str], labels: dict[str, str]) -> list[str]:
    """How far each method's clean test top-1 falls from its best epoch to its last: the paper's
    point is that robust losses stop the late-training fall that fitting the noise causes."""
    drops: dict[str, dict[str, list[float]]] = {}
    for cell in cells:
        drops.setdefault(labels[cell["method"]], {}).setdefault(cell["setting"], []).append(
            cell["test_top1_best"] - cell["test_top1_last"]
        )
    ordered = {labels[m]: drops[labels[m]] for m in labels if labels[m] in drops}
    return [
        "## Memorization: best-epoch minus last-epoch clean test top-1 (points)",
        "",
        "Test accuracy is recorded every 5 epochs; a large drop means the model first learned the clean",
        "signal and then fitted the noisy labels. Reported numbers above are last-epoch, never the best.",
        "",
        *table(ordered, settings, "method"),
        "",
    ]


def diagnosis_lines(diagnosed: list[dict], counted: Optional[set[str]] = None) -> list[str]:
    """Table 1 and the mislabeled-detection AUROC per noise setting (tools/diagnose.py), and
    precision@k and recall@k of the ranking tools/find_mislabeled.py writes. A run outside
    ``counted`` (a grid entry the selection did not pick) is marked as such."""
    if not diagnosed:
        return []

    def run_name(report: dict) -> str:
        return report["cell"] + ("" if counted is None or report["cell"] in counted else " (not selected)")

    views = "/".join(str(v) for v in sorted({r.get("views", 10) for r in diagnosed}))
    lines = [
        f"## Mislabeled training samples (tools/diagnose.py, K = {views} AugMix views)",
        "",
        "Accuracy against the clean label on training samples whose label is clean / mislabeled, on the plain",
        "image and averaged over the K views; AUROC of detecting mislabeled samples by -log p(given label).",
        "",
        "| run | model | clean: plain | clean: K views | mislabeled: plain | mislabeled: K views "
        "| AUROC plain | AUROC K views |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in diagnosed:
        for model, modes in report["table1"].items():
            auroc = report["auroc"][model]
            cells = [
                number(modes[m][subset], 1) for subset in ("clean", "mislabeled") for m in ("plain", "augmix_ensemble")
            ]
            cells += [number(auroc[m], 3) for m in ("plain", "augmix_ensemble")]
            lines.append(f"| {run_name(report)} | {model} | " + " | ".join(cells) + " |")
    ranked = [r for r in diagnosed if "find_mislabeled" in r]
    if ranked:
        lines += [
            "",
            f"### Cleaning the data: tools/find_mislabeled.py (K = {views} views)",
            "",
            "Training samples ranked by the model's disagreement with their given label (1 - p(given label)",
            "of the prediction averaged over the K views); precision of taking the top k as mislabeled (k =",
            f"1/5/10% of the {ranked[0]['samples']:,} samples, and k = the number actually mislabeled, "
            "where precision equals",
            "recall), and the share of all mislabeled samples found in the top 10% (recall@10%). Where",
            "most labels are wrong (80%) a high precision@k is easy: compare the AUROC.",
            "",
            "| run | model | mislabeled | precision@1% | precision@5% | precision@10% | precision@#mislabeled "
            "| recall@10% | AUROC |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for report in ranked:
            found = report["find_mislabeled"]
            at_k = {entry["k"]: entry for entry in found.get("at_k") or []}
            cells = [number(at_k.get(k, {}).get("precision"), 3) for k in ("1%", "5%", "10%", "number mislabeled")]
            cells.append(number(at_k.get("10%", {}).get("recall"), 3))
            mislabeled = "–" if found.get("mislabeled") is None else found["mislabeled"]
            lines.append(
                f"| {run_name(report)} | {found['model']} | {mislabeled} | "
                + " | ".join(cells)
                + f" | {number(found['auroc'], 3)} |"
            )
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
            notes.append(
                f"* {report['cell']}: checkpoint from a retraining at commit {run['commit'][:7]}; "
                "it reproduced the committed cell's last-epoch numbers exactly."
            )
        else:
            notes.append(
                f"* {report['cell']}: checkpoint from a retraining at commit {run['commit'][:7]} that did "
                f"NOT reproduce the committed cell (its test top-1 {number(run.get('rerun_test_top1_last'), 2)}); "
                "the rows above describe the retrained model."
            )
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


def write_report(
    results: list[dict],
    selected: dict[str, Optional[int]],
    out: Path,
    settings: list[str],
    methods: list[str],
    labels: dict[str, str],
    protocol: str,
    diagnosed: list[dict] = (),
    status: str = "",
    reading: str = "",
) -> Path:
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

    lines = [
        "# Noisy-label benchmark: Fashion-MNIST",
        "",
        "Produced by `benchmarks/noisy_labels.py` (run, `diagnose`, then `table`); every number below",
        "comes from the cell files in `cells/` and the diagnostics in `diagnose/`, each holding its",
        "exact command. An earlier sweep (v1) was stopped when its model turned out to lose its",
        "hidden units at high noise: [v1](../v1/README.md).",
        "",
        f"**Status:** {status}",
        "",
        "## Clean test top-1 (%) at the last epoch",
        "",
        *table(top1, settings, "method"),
        "",
        "## Expected calibration error (%, 15 bins) at the last epoch",
        "",
        *table(ece, settings, "method"),
        "",
        *target_lines(top1, ece),
        *(["## Reading the results", "", reading.strip(), ""] if reading else []),
        *memorization_lines(cells, settings, labels),
        "## Hyperparameter selection (noisy validation top-1 %, 40% symmetric, seed 0)",
        "",
        "| method | grid entry | noisy-val top-1 | selected |",
        "|---|---|---|---|",
    ]
    for method in methods:
        for cell in sorted(
            (r for r in results if r["method"] == method and r["setting"] == "sym40" and r["seed"] == 0),
            key=lambda r: r["grid_index"],
        ):
            mark = "yes" if selected.get(method) == cell["grid_index"] else ""
            lines.append(
                f"| {labels[method]} | `{cell['hyperparameters']}` | {cell['noisy_val_top1_last']:.2f} | {mark} |"
            )

    lines += ["", *diagnosis_lines(list(diagnosed), {c["cell"] for c in cells})]
    histograms = sorted((out / "diagnose").glob("*-log_likelihood_*.png"))
    if histograms:
        lines += [
            "### Fig. 1: log p(clean label) of clean and mislabeled training samples",
            "",
            "Plain image (left) and the K-view average (right), from `tools/diagnose.py`:",
            "",
            *[f"![{p.stem}](diagnose/{p.name})" for p in histograms],
            "",
        ]
    plots = []
    for setting in settings:
        series, bands, seed_counts = {}, {}, set()
        for method in methods:
            runs = [
                c["curves"]["fmnist_test/student"] for c in cells if c["method"] == method and c["setting"] == setting
            ]
            if runs:
                series[labels[method]], bands[labels[method]] = mean_curve(runs)
                seed_counts.add(len(runs))
        low, high = min(seed_counts, default=1), max(seed_counts, default=1)
        seeds = (
            "seed 0"
            if high == 1
            else f"mean of {low if low == high else f'{low}-{high}'} seeds"
            f"{'' if low == high else ' per method'}, band ±1 sd"
        )
        path = line_plot(
            series,
            out / f"curves_{setting}.png",
            "epoch",
            "clean test top-1 (%)",
            f"Fashion-MNIST, {setting}: student test accuracy per epoch\n({seeds})",
            bands,
        )
        if path:
            plots.append(f"![{setting}](curves_{setting}.png)")
    for setting in ("sym40", "sym60"):
        curves = {}
        for method in methods:
            cell = next(
                (c for c in cells if c["method"] == method and c["setting"] == setting and c["seed"] == 0), None
            )
            if cell and "student" in cell["reliability"]:
                curves[f"{labels[method]} (ECE {100 * cell['test_ece_last']:.1f}%)"] = cell["reliability"]["student"]
        if curves:
            reliability_diagram(curves, out / f"reliability_{setting}.png", f"Fashion-MNIST, {setting}, seed 0")
            plots.append(f"![reliability {setting}](reliability_{setting}.png)")
    lines += ["", "## Plots", "", *plots, "", "## Protocol", "", "```", protocol.strip(), "```", ""]
    return write_page(out, lines)


# ================================================================== sweep v3 (benchmarks/sweep_v3.py table)

ENSEMBLE = "augmix_ensemble"  # diagnose's name for the mean over the K AugMix views
# PROTOCOL.md's targets. Top-1: NRD's student >= another method's + a margin (points), on
# the means of all seeds. Diagnosis: NRD's teacher above every baseline (K-view numbers).
TOP1_TARGETS = (("sym60", "gjs", 0.0), ("sym80", "gjs", 0.0), ("sym60", "ce", 10.0))
DIAGNOSIS_TARGETS = (
    ("mislabeled", "NRD's teacher: most mislabeled samples predicted right (Table 1, K views)"),
    ("auroc", "NRD's teacher: best AUROC of finding mislabeled samples (K views)"),
)
# (metric, column, digits) of the diagnostics tables
DIAGNOSTICS = (
    ("clean", "clean: accuracy, K views (%)", 1),
    ("mislabeled", "mislabeled: accuracy, K views (%)", 1),
    ("auroc_plain", "AUROC plain", 3),
    ("auroc", "AUROC K views", 3),
    ("precision", "precision@10%", 3),
)
EARLIER = [
    "* [v2](v2/README.md), **superseded by v3**: every method's hyperparameters chosen once, at sym40, and",
    "  reused everywhere; a teacher averaging over several epochs where the paper's averages over a",
    "  fraction of one; one seed in three of its settings. NRD ended above CE but below GJS, GCE and",
    "  SCE at 40-60% symmetric noise. What v3 changed and why: [v3/PROTOCOL.md](v3/PROTOCOL.md).",
    "* [v1](v1/README.md), **superseded by v2**: stopped when `small_cnn` (then without normalization",
    "  before its hidden ReLU) lost every hidden unit under high noise with some losses.",
]


def dig(record: dict, path: tuple[str, ...]):
    """``record[path[0]][path[1]]...``, None where a key is missing."""
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def metric_path(metric: str, model: str) -> tuple[str, ...]:
    """Where a cell file keeps ``metric`` of ``model`` (student or teacher)."""
    prefix = "teacher_" if model == "teacher" else ""
    return {
        "top1": (f"{prefix}test_top1_last",),
        "ece": (f"{prefix}test_ece_last",),
        "best": (f"{prefix}test_top1_best",),
        "clean": ("diagnosis", "table1", model, ENSEMBLE, "clean"),
        "mislabeled": ("diagnosis", "table1", model, ENSEMBLE, "mislabeled"),
        "auroc_plain": ("diagnosis", "auroc", model, "plain"),
        "auroc": ("diagnosis", "auroc", model, ENSEMBLE),
        "precision": ("diagnosis", "ranking", model, "precision_at_10pct"),
    }[metric]


@dataclass
class Sweep:
    """The v3 sweep as its page shows it: the finished cell files, and the grid point
    sweep_v3.py selected per (setting, method) from them (None until that grid is done)."""

    cells: list[dict]
    selected: dict[tuple[str, str], Optional[int]]
    settings: list[str]
    methods: list[str]
    labels: dict[str, str]
    seeds: int = 3  # a mean the targets judge is over this many seeds
    status: str = ""
    reading: str = ""

    def final(self, setting: str, method: str) -> list[dict]:
        """The selected grid point's cells at ``setting`` (not the long runs), by seed."""
        key = (setting, method, self.selected.get((setting, method)))
        return sorted(
            (c for c in self.cells if not c.get("long") and (c["setting"], c["method"], c["grid_index"]) == key),
            key=lambda c: c["seed"],
        )

    def values(self, setting: str, method: str, model: str, metric: str) -> list[float]:
        found = (dig(cell, metric_path(metric, model)) for cell in self.final(setting, method))
        return [value for value in found if value is not None]

    def seed0(self, setting: str, method: str) -> Optional[dict]:
        return next((c for c in self.final(setting, method) if c["seed"] == 0), None)

    def long_run(self, method: str) -> Optional[dict]:
        return next((c for c in self.cells if c.get("long") and c["method"] == method), None)

    def long_title(self) -> Optional[str]:
        """ "SETTING, EPOCHS epochs" of the long runs (Figure 4), None before the first."""
        cell = next((c for c in self.cells if c.get("long")), None)
        return f"{cell['setting']}, {cell['epochs']} epochs" if cell else None

    def grid_at_seed0(self, setting: str, method: str) -> list[dict]:
        """The method's finished grid points at ``setting``, seed 0, in grid order."""
        found = (c for c in self.cells if not c.get("long") and c["seed"] == 0 and c["setting"] == setting)
        return sorted((c for c in found if c["method"] == method), key=lambda c: c["grid_index"])

    def shown_settings(self) -> list[str]:
        """The settings with at least one finished cell, in page order."""
        return [s for s in self.settings if any(c["setting"] == s and not c.get("long") for c in self.cells)]

    def rows(self) -> list[tuple[str, str, str]]:
        """(row label, method, model): every method's student, and its teacher where its cells have one."""
        rows = []
        for method in self.methods:
            rows.append((self.labels[method], method, "student"))
            if any(c["method"] == method and "teacher_test_top1_last" in c for c in self.cells):
                rows.append((f"{self.labels[method]} (teacher)", method, "teacher"))
        return rows

    def label(self, method: str) -> str:
        return self.labels[method]


def v3_table(sweep: Sweep, metric: str, scale: float = 1.0) -> list[str]:
    """Rows = models, columns = the settings shown, cells = mean ± sd (n) of the selected point."""
    settings = sweep.shown_settings()
    rows = {}
    for label, method, model in sweep.rows():
        by_setting = {s: [scale * v for v in sweep.values(s, method, model, metric)] for s in settings}
        if any(by_setting.values()):
            rows[label] = by_setting
    if not rows:
        return ["No setting has its selection made yet (its grid at seed 0 is not complete).", ""]
    return [
        *table(rows, settings, "method", mark_n=True),
        "",
        "Mean ± sample sd over seeds of the selected grid point, n marked; –: not selected yet or not run.",
        "",
    ]


def v3_verdict(met: Optional[bool]) -> str:
    return "pending" if met is None else ("met" if met else "**not met**")


def complete(sweep: Sweep, *series: list[float]) -> bool:
    return all(len(values) == sweep.seeds for values in series)


def top1_target(sweep: Sweep, setting: str, other: str, margin: float) -> str:
    ours = sweep.values(setting, "nrd", "student", "top1")
    theirs = sweep.values(setting, other, "student", "top1")
    met = None
    if complete(sweep, ours, theirs):
        met = round(statistics.mean(ours) - statistics.mean(theirs), 9) >= margin
    name = f"NRD >= {sweep.label(other)}" + (f" + {margin:g} points" if margin else "")
    return (
        f"| {name}: clean test top-1, mean of {sweep.seeds} seeds | {setting} | {mean_sd(ours, mark_n=True)} "
        f"| {sweep.label(other)} {mean_sd(theirs, mark_n=True)} | {v3_verdict(met)} |"
    )


def teacher_target(sweep: Sweep, setting: str, metric: str, name: str) -> str:
    """NRD's teacher against the best baseline (every method but NRD) on ``metric``'s mean."""
    digits = dict((m, d) for m, _, d in DIAGNOSTICS)[metric]
    ours = sweep.values(setting, "nrd", "teacher", metric)
    rivals = {m: sweep.values(setting, m, "student", metric) for m in sweep.methods if m != "nrd"}
    best = max((m for m in rivals if rivals[m]), key=lambda m: statistics.mean(rivals[m]), default=None)
    met = None
    if best is not None and complete(sweep, ours, *rivals.values()):
        met = statistics.mean(ours) > statistics.mean(rivals[best])
    other = f"best baseline: {sweep.label(best)} {mean_sd(rivals[best], digits, True)}" if best else "–"
    return f"| {name} | {setting} | {mean_sd(ours, digits, True)} | {other} | {v3_verdict(met)} |"


def long_best_last(sweep: Sweep, method: str, model: str) -> Optional[tuple[float, float]]:
    """Best and last clean test top-1 of the method's long run, None until it ran."""
    cell = sweep.long_run(method)
    best, last = (dig(cell, metric_path(m, model)) if cell else None for m in ("best", "top1"))
    return None if best is None or last is None else (best, last)


def long_drop(sweep: Sweep, method: str) -> list[float]:
    """[best - last] of the student's long run (points), [] until it ran."""
    found = long_best_last(sweep, method, "student")
    return [found[0] - found[1]] if found else []


def figure4_target(sweep: Sweep) -> str:
    ours, theirs = long_drop(sweep, "nrd"), long_drop(sweep, "gjs")
    met = theirs[0] > ours[0] if ours and theirs else None
    return (
        f"| Figure 4: GJS's last epoch below its best by more than NRD's (long run) | {sweep.long_title() or '–'} "
        f"| best − last {mean_sd(ours, mark_n=True)} | GJS {mean_sd(theirs, mark_n=True)} | {v3_verdict(met)} |"
    )


def v3_target_lines(sweep: Sweep) -> list[str]:
    lines = ["| target | setting | NRD | compared with | verdict |", "|---|---|---|---|---|"]
    lines += [top1_target(sweep, *target) for target in TOP1_TARGETS]
    lines += [
        teacher_target(sweep, setting, metric, name)
        for metric, name in DIAGNOSIS_TARGETS
        for setting in sweep.shown_settings()
    ]
    return [
        *lines,
        figure4_target(sweep),
        "",
        f"From the means over seeds; pending until every number compared has its {sweep.seeds} seeds (the long",
        "runs: their one seed). Baselines: every method but NRD. Nothing is tuned toward these.",
        "",
    ]


def hyperparameters(cell: dict) -> str:
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in cell["hyperparameters"].items())


def selection_lines(sweep: Sweep) -> list[str]:
    """Every grid point's seed-0 noisy-validation top-1 per setting and method, and the pick."""
    if not sweep.shown_settings():
        return []
    lines = [
        "## Selection: noisy-validation top-1 (%) of the student at the last epoch, seed 0",
        "",
        "Per setting and method, the grid point with the highest score is selected (a tie: the earlier",
        "point, the paper's value first); clean test labels choose nothing. pending: the grid is not done.",
        "",
    ]
    for setting in sweep.shown_settings():
        lines += [
            f"### {setting}",
            "",
            "| method | point | hyperparameters | noisy-val top-1 | selected |",
            "|---|---|---|---|---|",
        ]
        for method in sweep.methods:
            chosen = sweep.selected.get((setting, method))
            for cell in sweep.grid_at_seed0(setting, method):
                mark = "pending" if chosen is None else ("**yes**" if chosen == cell["grid_index"] else "")
                lines.append(
                    f"| {sweep.label(method)} | g{cell['grid_index']} | `{hyperparameters(cell)}` "
                    f"| {cell['noisy_val_top1_last']:.2f} | {mark} |"
                )
        lines.append("")
    return lines


def diagnostics_table(sweep: Sweep, setting: str) -> list[str]:
    """One setting's Table 1, AUROC and precision@10% rows, per model with any of them."""
    rows = []
    for label, method, model in sweep.rows():
        cells = [mean_sd(sweep.values(setting, method, model, m), digits, True) for m, _, digits in DIAGNOSTICS]
        if any(c != "–" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    header = "| model | " + " | ".join(column for _, column, _ in DIAGNOSTICS) + " |"
    return [f"### {setting}", "", header, "|---" * (len(DIAGNOSTICS) + 1) + "|", *rows, ""] if rows else []


def diagnostics_lines(sweep: Sweep) -> list[str]:
    """The diagnostics section: a table per setting with a selected point, nothing before."""
    tables = [line for setting in sweep.shown_settings() for line in diagnostics_table(sweep, setting)]
    if not tables:
        return []
    views = "/".join(map(str, sorted({dig(c, ("diagnosis", "views")) for c in sweep.cells} - {None})))
    return [
        f"## Mislabeled training samples (tools/diagnose.py, K = {views or '–'} AugMix views)",
        "",
        "Accuracy against the clean label on the training samples whose given label is clean / wrong",
        "(Table 1, prediction averaged over the K views); AUROC of finding the mislabeled ones by",
        "-log p(given label), on the plain image and over the K views; the share of mislabeled samples in",
        "the top 10% of that ranking. Mean ± sd over seeds of the selected point, n marked.",
        "",
        *tables,
    ]


def figure4_lines(sweep: Sweep) -> list[str]:
    """The long runs' best, last and best-minus-last clean test top-1 (n=1 by design)."""
    rows = []
    for label, method, model in sweep.rows():
        found = long_best_last(sweep, method, model)
        if found:
            best, last = found
            rows.append(f"| {label} | {best:.2f} (n=1) | {last:.2f} (n=1) | {best - last:.2f} (n=1) |")
    if not rows:
        return []
    return [
        f"## Figure 4: long training ({sweep.long_title()}, seed 0)",
        "",
        "| model | best epoch | last epoch | best − last |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def commit_lines(sweep: Sweep) -> list[str]:
    counts = Counter(cell.get("commit", "unknown") for cell in sweep.cells)
    return [
        f"* `{commit}`: {n} cell{'s' * (n != 1)}"
        + (" (**tracked files differed from the commit**)" if commit.endswith("+dirty") else "")
        for commit, n in sorted(counts.items())
    ] or ["* none yet (no cell has finished)"]


def write_v3_report(sweep: Sweep, out: Path) -> Path:
    """``out``/README.md and its plots from ``sweep`` alone."""
    epochs = sorted({c["epochs"] for c in sweep.cells if not c.get("long")})
    bins = next((f", {len(c['reliability']['student']['count'])} bins" for c in sweep.cells if "reliability" in c), "")
    lines = [
        "# Sweep v3: NRD against the baselines on Fashion-MNIST (the paper's regime, per-setting selection)",
        "",
        "Written by `benchmarks/sweep_v3.py table` from the cell files in `cells/` alone (one training run",
        "and its diagnosis each, with its exact command and commit); the protocol, committed before the",
        f"first cell: [PROTOCOL.md](PROTOCOL.md). Epochs per cell: {'/'.join(map(str, epochs)) or 'none run yet'}.",
        "",
        f"**Status:** {sweep.status}",
        "",
        "## Clean test top-1 (%) at the last epoch",
        "",
        *v3_table(sweep, "top1"),
        f"## Expected calibration error (%{bins}) at the last epoch",
        "",
        *v3_table(sweep, "ece", 100.0),
        "## Targets (PROTOCOL.md)",
        "",
        *v3_target_lines(sweep),
        *(["## Reading", "", sweep.reading.strip(), ""] if sweep.reading.strip() else []),
        *selection_lines(sweep),
        *diagnostics_lines(sweep),
        *figure4_lines(sweep),
        *v3_plots(sweep, out),
        "## Protocol and code",
        "",
        "The protocol: [PROTOCOL.md](PROTOCOL.md). The commits the cells record "
        "(`benchmarks/sweep_v3.py reproduce CELL` retrains one):",
        "",
        *commit_lines(sweep),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    return write_page(out, lines)


def write_index(sweep: Sweep, root: Path, v3: str = "v3") -> Path:
    """``root``/README.md: v3 first (status, top-1, targets), then the superseded sweeps."""
    lines = [
        "# Results",
        "",
        "Written by `benchmarks/sweep_v3.py table`; every number comes from the v3 cell files.",
        "",
        f"## Sweep v3 (current): [{v3}/README.md]({v3}/README.md)",
        "",
        f"**Status:** {sweep.status}",
        "",
        "Clean test top-1 (%) of the student at the last epoch (NRD's teacher as its own row):",
        "",
        *v3_table(sweep, "top1"),
        f"Targets ([PROTOCOL.md]({v3}/PROTOCOL.md)):",
        "",
        *v3_target_lines(sweep),
        f"Selection, ECE, diagnostics and plots: [{v3}/README.md]({v3}/README.md).",
        "",
        "## Earlier sweeps (superseded)",
        "",
        *EARLIER,
        "",
    ]
    return write_page(root, lines)


# ------------------------------------------------------------------ v3 plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, drawn: bool = True) -> Optional[Path]:
    """Writes the figure (unless nothing was ``drawn`` on it) and closes it."""
    if drawn:
        fig.savefig(path, bbox_inches="tight")
    pyplot().close(fig)
    return path if drawn else None


def style(sweep: Sweep, method: str, model: str) -> dict:
    """One colour per method in every plot; a teacher dashed in its student's colour."""
    return {"color": f"C{sweep.methods.index(method)}", "linestyle": "--" if model == "teacher" else "-"}


def n_label(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return f"n={low}" if low == high else f"n={low}-{high}"


def legend_below(fig, ax, columns: int = 6) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=max(1, min(columns, len(labels))),
        fontsize=8,
        frameon=False,
    )


def draw_mean_curves(ax, sweep: Sweep, runs: dict[tuple[str, str, str], list[list[list[float]]]]) -> None:
    """Each model's curves: the mean over its runs, a ±1 sd band where there are two or more."""
    for (label, method, model), curves in runs.items():
        mean, band = mean_curve(curves)
        ax.plot(*zip(*mean), marker="o", ms=2.5, label=f"{label} (n={len(curves)})", **style(sweep, method, model))
        if band:
            x, low, high = zip(*band)
            ax.fill_between(x, low, high, color=style(sweep, method, model)["color"], alpha=0.15, linewidth=0)
    ax.grid(alpha=0.3)
    ax.set_xlabel("epoch")


def curve_runs(sweep: Sweep, cells_of, key: str) -> dict[tuple[str, str, str], list]:
    """(label, method, model) -> the ``key`` curves ("VAL_SET/MODEL" with MODEL filled in)."""
    runs = {}
    for label, method, model in sweep.rows():
        name = key.format(model=model)
        curves = [cell["curves"][name] for cell in cells_of(method) if name in cell["curves"]]
        if curves:
            runs[(label, method, model)] = curves
    return runs


def plot_curves(sweep: Sweep, setting: str, path: Path) -> Optional[Path]:
    """Clean test and noisy-validation top-1 against epoch, every model, mean over seeds."""
    panels = [("fmnist_test/{model}", "clean test top-1 (%)"), ("noisy_val/{model}", "noisy-validation top-1 (%)")]
    runs = [curve_runs(sweep, lambda m: sweep.final(setting, m), key) for key, _ in panels]
    if not runs[0]:
        return None
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, panel, (_, ylabel) in zip(axes, runs, panels):
        draw_mean_curves(ax, sweep, panel)
        ax.set_ylabel(ylabel)
    axes[0].set_title("clean test set", fontsize=9)
    axes[1].set_title("noisy validation split (what selection reads)", fontsize=9)
    fig.suptitle(
        f"{setting}: top-1 against epoch, selected point, mean over seeds (n per line), band ±1 sd", fontsize=10
    )
    legend_below(fig, axes[0])
    return save(fig, path)


def plot_long(sweep: Sweep, path: Path) -> Optional[Path]:
    """Figure 4: the long runs' clean test top-1 against epoch (n=1 each)."""
    runs = curve_runs(sweep, lambda m: [c for c in [sweep.long_run(m)] if c], "fmnist_test/{model}")
    if not runs:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    draw_mean_curves(ax, sweep, runs)
    ax.set_ylabel("clean test top-1 (%)")
    ax.set_title(f"Figure 4: {sweep.long_title()}, seed 0 (n=1 per line)", fontsize=10)
    legend_below(fig, ax, columns=4)
    return save(fig, path)


def noise_rate_points(sweep: Sweep, method: str, model: str, metric: str, scale: float) -> list[tuple]:
    """(rate %, mean, sd, n) at each symmetric setting that has the model's numbers."""
    points = []
    for setting in sweep.shown_settings():
        values = [scale * v for v in sweep.values(setting, method, model, metric)]
        noise = next((c.get("noise", {}) for c in sweep.final(setting, method)), {})
        if values and noise.get("type") == "symmetric":
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            points.append((100 * noise["rate"], statistics.mean(values), sd, len(values)))
    return points


def plot_noise_rates(sweep: Sweep, path: Path) -> Optional[Path]:
    """Top-1 and ECE against the symmetric noise rate, per model (mean, error bar ±1 sd)."""
    panels = [("top1", 1.0, "clean test top-1 (%)"), ("ece", 100.0, "ECE (%)")]
    rows = sweep.rows()
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4), dpi=110)
    drawn = False
    for ax, (metric, scale, ylabel) in zip(axes, panels):
        for j, (label, method, model) in enumerate(rows):
            points = noise_rate_points(sweep, method, model, metric, scale)
            if points:
                rate, mean, sd, n = zip(*points)
                dodge = [r + 1.2 * (j - (len(rows) - 1) / 2) for r in rate]  # error bars side by side
                ax.errorbar(
                    dodge,
                    mean,
                    yerr=sd,
                    marker="o",
                    ms=3,
                    capsize=3,
                    label=f"{label} ({n_label(n)})",
                    **style(sweep, method, model),
                )
                drawn = True
        ax.set_xlabel("symmetric noise rate (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Last epoch against noise rate: mean over seeds, error bars ±1 sd (n per line)", fontsize=10)
    legend_below(fig, axes[0])
    return save(fig, path, drawn)


def plot_roc(sweep: Sweep, setting: str, path: Path) -> Optional[Path]:
    """ROC of finding mislabeled training samples, seed 0 of each selected point."""
    fig, ax = pyplot().subplots(figsize=(5.2, 5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    drawn = False
    for label, method, model in sweep.rows():
        cell = sweep.seed0(setting, method)
        roc = dig(cell, ("diagnosis", "ranking", model, "roc")) if cell else None
        if roc:
            auroc = dig(cell, metric_path("auroc", model))
            ax.plot(*zip(*roc), label=f"{label} (AUROC {number(auroc, 3)})", **style(sweep, method, model))
            drawn = True
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate (clean flagged)", ylabel="true positive rate")
    ax.set_title(
        f"{setting}: finding mislabeled training samples by\n-log p(given label), K views; seed 0 (n=1)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path, drawn)


def reliability_panel(top, bottom, curve: dict, colour: str) -> None:
    """Accuracy per confidence bin (bars, empty bins left out) over the bin counts (log scale)."""
    bins = len(curve["count"])
    used = [b for b in range(bins) if curve["count"][b] > 0]
    centres = [(b + 0.5) / bins for b in used]
    top.bar(centres, [curve["accuracy"][b] for b in used], width=1.0 / bins, color=colour, alpha=0.7, edgecolor="white")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.tick_params(labelbottom=False)
    bottom.bar(centres, [curve["count"][b] for b in used], width=1.0 / bins, color="grey", edgecolor="white")
    bottom.set(xlim=(0, 1), yscale="log", xlabel="confidence", ylabel="images")


def plot_reliability(sweep: Sweep, setting: str, path: Path, columns: int = 3) -> Optional[Path]:
    """One panel per model (seed 0), ``columns`` to a row, each with its bin counts below it."""
    models = [
        (label, method, model, cell)
        for label, method, model in sweep.rows()
        for cell in [sweep.seed0(setting, method)]
        if cell and model in cell.get("reliability", {})
    ]
    if not models:
        return None
    rows = -(-len(models) // columns)
    fig = pyplot().figure(figsize=(3.3 * columns, 4.2 * rows), dpi=110)
    grid = fig.add_gridspec(rows, columns, hspace=0.35, wspace=0.4)
    for i, (label, method, model, cell) in enumerate(models):
        pair = grid[i // columns, i % columns].subgridspec(2, 1, height_ratios=[3, 1.2], hspace=0.06)
        top = fig.add_subplot(pair[0])
        reliability_panel(
            top, fig.add_subplot(pair[1]), cell["reliability"][model], style(sweep, method, model)["color"]
        )
        ece = dig(cell, metric_path("ece", model))
        top.set_title(f"{label}: ECE {number(None if ece is None else 100 * ece, 1)}%", fontsize=9)
    bins = len(models[0][3]["reliability"][models[0][2]]["count"])
    fig.suptitle(
        f"{setting}: reliability on the clean test set, last epoch, seed 0 (n=1), {bins} bins;\n"
        "bars: accuracy per confidence bin (empty bins left out), grey: test images per bin",
        fontsize=10,
    )
    return save(fig, path)


def v3_plots(sweep: Sweep, out: Path) -> list[str]:
    """Every plot the cells allow, as markdown image lines under their headings."""
    out.mkdir(parents=True, exist_ok=True)
    settings = sweep.shown_settings()
    groups = [  # (heading, [(file, plot function, its arguments between sweep and path)])
        (
            "Top-1 against epoch (clean test and noisy validation)",
            [(f"curves_{s}.png", plot_curves, [s]) for s in settings],
        ),
        ("Top-1 and ECE against the noise rate", [("noise_rates.png", plot_noise_rates, [])]),
        ("Figure 4: long training", [("long.png", plot_long, [])]),
        ("ROC of finding mislabeled training samples", [(f"roc_{s}.png", plot_roc, [s]) for s in settings]),
        (
            "Reliability diagrams (bin counts below each)",
            [(f"reliability_{s}.png", plot_reliability, [s]) for s in settings],
        ),
    ]
    lines = []
    for heading, plots in groups:
        images = [f"![{name[:-4]}]({name})" for name, plot, args in plots if plot(sweep, *args, out / name)]
        if images:
            lines += [f"### {heading}", "", *images, ""]
    return ["## Plots", "", *lines] if lines else []

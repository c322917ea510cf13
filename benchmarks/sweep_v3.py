"""Sweep v3: NRD against the baselines in the paper's regime, selected per setting.

    .venv/bin/python benchmarks/sweep_v3.py run [--jobs N] [--only PREFIX] [--results DIR] [--runs DIR]
    .venv/bin/python benchmarks/sweep_v3.py list
    .venv/bin/python benchmarks/sweep_v3.py reproduce CELL   # retrain one cell, print the difference
    benchmarks/sweep_v3_background.sh   # the whole sweep in the background, from its own clone
    .venv/bin/python benchmarks/sweep_v3.py table   # RESULTS/README.md, its plots and docs/results/README.md

The protocol (data, budget, EMA regime, grids, selection rule, seeds, what is reported)
is docs/results/v3/PROTOCOL.md, committed before the first v3 cell ran; this file is its
executable form and must agree with it (tests/test_sweep_v3.py checks the grids against
the paper's Table 5 values the protocol quotes).

Each cell is one training run followed by its diagnosis (tools/diagnose.py with K = 10
AugMix views on the 2,000 training samples: Table 1, the AUROC of finding mislabeled
samples, precision of the top of that ranking, an ROC curve). The cell's file
``RESULTS/cells/CELL.json`` is written atomically once both are done and is never
rerun; an interrupted cell resumes from its own checkpoint in ``RUNS/CELL``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "v3"
RUNS = REPO / "runs" / "sweep-v3"

# ------------------------------------------------------------------ the regime (PROTOCOL.md)

SHARDS = "data/fmnist-2k"  # tools/make_shards.py fashion-mnist --shard-size 2000 (made by `run` if missing)
TRAIN_IMAGES = 2000
TRAIN = f"{SHARDS}/train/train-000000.tar"  # the first 2,000 training images
NOISY_VAL = f"{SHARDS}/train/train-000029.tar"  # the last 2,000 training images, noisy labels
TEST = f"{SHARDS}/test/test-{{000000..000004}}.tar"  # all 10,000 clean test images
EPOCHS = 60
LONG_EPOCHS = 240  # the Figure 4 runs: 4x the budget, the same cosine schedule stretched
BATCH = 32
LR = 0.05

# The paper: CIFAR, 50,000 images at batch 128 = 391 steps per epoch, decay 0.99 per step,
# so each epoch keeps 0.99 ** 391 = 2.0% of the teacher's old weights (horizon 100 steps
# = 0.26 epoch). Here an epoch is 2,000 / 32 = 62.5 steps; the decay that keeps the same
# share per epoch, and so the same horizon in epochs, is 0.99 ** (391 / 62.5).
PAPER_STEPS_PER_EPOCH = 391
STEPS_PER_EPOCH = TRAIN_IMAGES / BATCH
TEACHER_DECAY = round(0.99 ** (PAPER_STEPS_PER_EPOCH / STEPS_PER_EPOCH), 4)  # 0.9391

DIAGNOSE_VIEWS = 10
ENSEMBLE = "augmix_ensemble"  # diagnose's name for the K-view mean
PRECISION_AT = 0.10  # precision of the top 10% of the mislabeled ranking

COMMON = [
    f"data.train={TRAIN}",
    f"data.val.fmnist_test={TEST}",
    f"data.val.noisy_val={NOISY_VAL}",
    "eval.noisy_val=[noisy_val]",
    "eval.every_epochs=5",
    f"data.batch_size={BATCH}",
    f"optim.lr={LR}",
    f"teacher.decay={TEACHER_DECAY}",
    "eval.label_correction_samples=0",
    "checkpoint.every_steps=0",
    "checkpoint.keep=1",
    "log.every_steps=1000",
    "data.workers=1",
]

SETTINGS: dict[str, dict[str, Any]] = {
    "sym20": {"type": "symmetric", "rate": 0.2},
    "sym40": {"type": "symmetric", "rate": 0.4},
    "sym60": {"type": "symmetric", "rate": 0.6},
    "sym80": {"type": "symmetric", "rate": 0.8},
    "asym40": {"type": "asymmetric", "rate": 0.4, "map": "fmnist"},
}
# Running order: the settings the targets name first; sym20 only if the budget allows.
SETTING_ORDER = ("sym60", "sym80", "sym40", "asym40", "sym20")
SEEDS = (0, 1, 2)
METHODS = ("ce", "gce", "sce", "gjs", "nrd")
LABELS = {"ce": "CE", "gce": "GCE", "sce": "SCE", "gjs": "GJS", "nrd": "NRD"}
LONG = {"setting": "sym60", "methods": ("ce", "gjs", "nrd"), "seed": 0}

# The paper's Table 5 (CIFAR-10 column of each setting; Fashion-MNIST also has 10
# classes): the value each grid must contain, listed first so that a tie picks it.
TABLE5 = {
    "gce": {"sym20": 0.7, "sym40": 0.7, "sym60": 0.7, "sym80": 0.9, "asym40": 0.1},  # q
    "sce": {
        "sym20": (0.05, 0.1),
        "sym40": (0.1, 0.1),
        "sym60": (0.2, 1.0),
        "sym80": (0.1, 1.0),
        "asym40": (0.2, 1.0),
    },  # alpha, beta
    "gjs": {"sym20": 0.3, "sym40": 0.9, "sym60": 0.1, "sym80": 0.1, "asym40": 0.3},  # pi1
    "nrd": {"sym20": 0.6, "sym40": 0.6, "sym60": 0.5, "sym80": 0.5, "asym40": 0.7},  # pi2 (pi1 = pi3)
}
# The search grids the paper's values come from (GJS paper; NRD: pi2 in 0.1 .. 0.9).
Q_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
SCE_ALPHA_GRID = (0.05, 0.1, 0.2, 0.5)
PI1_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
PI2_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRID_POINTS = 3


def neighbours(value: float, grid: tuple[float, ...], count: int = GRID_POINTS) -> list[float]:
    """``value`` first, then its nearest neighbours by position on ``grid`` (the lower on a
    tie), ``count`` in all: at an end of the grid both come from one side."""
    at = grid.index(value)
    others = sorted((v for v in grid if v != value), key=lambda v: (abs(grid.index(v) - at), v))
    return [value, *others[: count - 1]]


def grid(setting: str, method: str) -> list[dict[str, Any]]:
    """The method's ``GRID_POINTS`` overrides at ``setting``; the Table 5 value first."""
    if method == "ce":  # no loss parameter: the learning rate around the common one
        return [{"optim.lr": lr} for lr in (LR, LR / 2, LR * 2)]
    value = TABLE5[method][setting]
    if method == "gce":
        return [{"loss.q": q} for q in neighbours(value, Q_GRID)]
    if method == "sce":
        alpha, beta = value
        return [{"loss.alpha": a, "loss.beta": beta} for a in neighbours(alpha, SCE_ALPHA_GRID)]
    if method == "gjs":
        return [
            {"loss.pi": [p, round((1 - p) / 2, 4), round((1 - p) / 2, 4)], "loss.scale": True}
            for p in neighbours(value, PI1_GRID)
        ]
    return [
        {"loss.pi": [round((1 - p) / 2, 4), p, round((1 - p) / 2, 4)], "loss.scale": True}  # nrd
        for p in neighbours(value, PI2_GRID)
    ]


# ------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    grid_index: int
    seed: int
    long: bool = False

    @property
    def name(self) -> str:
        return f"{'long-' if self.long else ''}{self.setting}-{self.method}-g{self.grid_index}-s{self.seed}"

    @property
    def epochs(self) -> int:
        return LONG_EPOCHS if self.long else EPOCHS

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return grid(self.setting, self.method)[self.grid_index]


def parse_cell(name: str) -> Cell:
    long = name.startswith("long-")
    setting, method, g, s = name.removeprefix("long-").rsplit("-", 3)
    if setting not in SETTINGS or method not in METHODS or not g.startswith("g") or not s.startswith("s"):
        raise SystemExit(f"not a v3 cell name: {name!r} (e.g. sym60-nrd-g0-s1 or long-sym60-gjs-g0-s0)")
    return Cell(setting, method, int(g[1:]), int(s[1:]), long)


def override_value(value: Any) -> str:
    if isinstance(value, list):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides(cell: Cell, runs: Path) -> list[str]:
    noise = {**SETTINGS[cell.setting], "seed": cell.seed}
    noise_yaml = "{" + ", ".join(f"{k}: {v}" for k, v in noise.items()) + "}"
    return [
        *COMMON,
        f"optim.epochs={cell.epochs}",
        f"loss.name={cell.method}",
        f"data.noise={noise_yaml}",
        f"run.seed={cell.seed}",
        f"run.output_dir={runs / cell.name}",
        *(f"{k}={override_value(v)}" for k, v in cell.hyperparameters.items()),
    ]


def command(cell: Cell, runs: Path) -> list[str]:
    return [sys.executable, "-m", "nrd_dist.train", "configs/fmnist_demo.yaml", *overrides(cell, runs)]


class Results:
    """The finished cells' files in ``RESULTS/cells``."""

    def __init__(self, root: Path):
        self.cells = root / "cells"

    def path(self, cell: Cell) -> Path:
        return self.cells / f"{cell.name}.json"

    def load(self, cell: Cell) -> Optional[dict]:
        path = self.path(cell)
        return json.loads(path.read_text()) if path.exists() else None

    def selected(self, setting: str, method: str) -> Optional[int]:
        """The grid entry with the best last-epoch noisy-validation top-1 of the student at
        seed 0 (a tie: the earlier entry, the paper's value first); None until the whole
        grid is done. Clean test labels choose nothing."""
        scores = []
        for index in range(GRID_POINTS):
            result = self.load(Cell(setting, method, index, 0))
            if result is None:
                return None
            scores.append((result["noisy_val_top1_last"], -index))
        return -max(scores)[1]


def plan(results: Results) -> list[Cell]:
    """Every cell in running order, as far as the finished ones determine it: per setting
    (SETTING_ORDER) its grid at seed 0, then seeds 1 and 2 of each selected entry; the
    Figure 4 runs after the first two settings. Cells that wait on a selection are left
    out until it is made."""
    cells: list[Cell] = []
    for position, setting in enumerate(SETTING_ORDER):
        cells += [Cell(setting, m, i, 0) for i in range(GRID_POINTS) for m in METHODS]
        for method in METHODS:
            index = results.selected(setting, method)
            if index is not None:
                cells += [Cell(setting, method, index, seed) for seed in SEEDS if seed]
        if position == 1:
            cells += long_cells(results)
    return cells


def long_cells(results: Results) -> list[Cell]:
    cells = []
    for method in LONG["methods"]:
        index = results.selected(LONG["setting"], method)
        if index is not None:
            cells.append(Cell(LONG["setting"], method, index, LONG["seed"], long=True))
    return cells


# ------------------------------------------------------------------ running one cell


def source_commit() -> str:
    """The commit of the code that ran (``+dirty`` when tracked files differ from it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def relative(cmd: list[str]) -> str:
    """The command as run from the repository root, without the interpreter."""
    return " ".join(str(c) for c in cmd[1:]).replace(str(REPO) + "/", "")


def read_metrics(run_dir: Path) -> dict:
    """Last-epoch numbers and every curve (val set / model -> [[epoch, top1], ...])."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval" in r]
    curves: dict[str, list[list[float]]] = {}
    ece: dict[str, list[list[float]]] = {}
    for r in evals:
        for val_set, models in r["eval"].items():
            for model, metrics in models.items():
                curves.setdefault(f"{val_set}/{model}", []).append([r["epoch"] + 1, metrics["top1"]])
                ece.setdefault(f"{val_set}/{model}", []).append([r["epoch"] + 1, metrics["ece"]])
    last = evals[-1]["eval"]
    out = {
        "test_top1_last": last["fmnist_test"]["student"]["top1"],
        "test_top1_best": max(p[1] for p in curves["fmnist_test/student"]),
        "test_ece_last": last["fmnist_test"]["student"]["ece"],
        "noisy_val_top1_last": last["noisy_val"]["student"]["top1"],
        "curves": curves,
        "ece_curves": ece,
    }
    if "teacher" in last["fmnist_test"]:
        out["teacher_test_top1_last"] = last["fmnist_test"]["teacher"]["top1"]
        out["teacher_test_ece_last"] = last["fmnist_test"]["teacher"]["ece"]
        out["teacher_test_top1_best"] = max(p[1] for p in curves["fmnist_test/teacher"])
    summary = json.loads((run_dir / "summary.json").read_text())
    out["reliability"] = {model: entry["reliability"] for model, entry in summary["val"]["fmnist_test"].items()}
    return out


def roc_curve(scores: np.ndarray, positive: np.ndarray, points: int = 101) -> list[list[float]]:
    """[[false positive rate, true positive rate], ...] at ``points`` thresholds spread
    over the score quantiles (enough to draw the curve; the AUROC itself is exact)."""
    thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, points)))[::-1]
    pos, neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    curve = [[0.0, 0.0]]
    for t in thresholds:
        flagged = scores >= t
        curve.append(
            [round(float((flagged & ~positive).sum() / neg), 4), round(float((flagged & positive).sum() / pos), 4)]
        )
    return curve


def ranking_numbers(samples_csv: Path) -> dict:
    """Precision of the top PRECISION_AT of each model's ranking by -log p(given label)
    over the K views, and its ROC curve, from diagnose's per-sample file."""
    with open(samples_csv) as f:
        rows = list(csv.DictReader(f))
    mislabeled = np.array([r["mislabeled"] in ("1", "True", "true") for r in rows])
    out: dict[str, Any] = {}
    suffix = f"_{ENSEMBLE}_log_p_given"  # diagnose's column per model: MODEL_MODE_FIELD
    for column in rows[0]:
        if column.endswith(suffix):
            score = -np.array([float(r[column]) for r in rows])
            top = np.argsort(-score, kind="stable")[: max(1, round(PRECISION_AT * len(rows)))]
            out[column.removesuffix(suffix)] = {
                "precision_at_10pct": round(float(mislabeled[top].mean()), 4),
                "roc": roc_curve(score, mislabeled),
            }
    return out


def diagnose(cell: Cell, runs: Path, log: Path) -> dict:
    run_dir = runs / cell.name
    out_dir = run_dir / "diagnose"
    cmd = [sys.executable, "tools/diagnose.py", str(run_dir), "--views", str(DIAGNOSE_VIEWS), "--out", str(out_dir)]
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cell.name}: diagnose failed (exit {proc.returncode}); see {log}")
    report = json.loads((out_dir / "diagnose.json").read_text())
    keep = ("checkpoint", "samples", "views", "counts", "table1", "auroc", "calibration")
    return {
        "command": relative(cmd),
        **{k: report[k] for k in keep if k in report},
        "ranking": ranking_numbers(out_dir / "samples.csv"),
    }


def train_and_diagnose(cell: Cell, runs: Path, env: Optional[dict] = None) -> dict:
    """Runs the cell's training command (resuming its run folder if there is one), then
    its diagnosis; the numbers of the cell file (without commit and timing)."""
    cmd = command(cell, runs)
    log = runs / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cell.name} failed (exit {proc.returncode}); see {log}")
    return {
        "cell": cell.name,
        "setting": cell.setting,
        "noise": SETTINGS[cell.setting],
        "method": cell.method,
        "seed": cell.seed,
        "grid_index": cell.grid_index,
        "hyperparameters": cell.hyperparameters,
        "long": cell.long,
        "epochs": cell.epochs,
        "train_images": TRAIN_IMAGES,
        "batch_size": BATCH,
        "teacher_decay": TEACHER_DECAY,
        "command": relative(cmd),
        **read_metrics(runs / cell.name),
        "diagnosis": diagnose(cell, runs, log),
    }


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cell(cell: Cell, results: Results, runs: Path, jobs: int) -> dict:
    started = time.time()
    result = train_and_diagnose(cell, runs)
    result.update(
        commit=source_commit(),
        wall_time_s=round(time.time() - started, 1),
        omp_num_threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        concurrent_cells=jobs,
    )
    write_atomic(results.path(cell), json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------ commands


def ensure_shards() -> None:
    if not (REPO / TRAIN).exists():
        subprocess.run(
            [
                sys.executable,
                "tools/make_shards.py",
                "fashion-mnist",
                "--out",
                SHARDS,
                "--shard-size",
                str(TRAIN_IMAGES),
                "--quiet",
            ],
            cwd=REPO,
            check=True,
        )


def pending(results: Results, only: str, running: set[str]) -> list[Cell]:
    return [c for c in plan(results) if results.load(c) is None and c.name.startswith(only) and c.name not in running]


def cmd_run(args) -> int:
    """Runs the pending cells in plan order, ``--jobs`` at a time, each in its own process
    (the pool is threads waiting on subprocesses: no Python work runs in parallel here)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    ensure_shards()
    results, runs = Results(args.results), args.runs
    running: dict[Any, Cell] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while True:
            for cell in pending(results, args.only or "", {c.name for c in running.values()}):
                if len(running) >= args.jobs:
                    break
                print(
                    f"[v3] start {cell.name} ({' '.join(overrides(cell, runs)[-len(cell.hyperparameters) :])})",
                    flush=True,
                )
                running[pool.submit(run_cell, cell, results, runs, args.jobs)] = cell
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                result = future.result()  # a failed cell stops the sweep: look at its log
                print(
                    f"[v3] done {cell.name}: test top-1 {result['test_top1_last']:.2f} "
                    f"(noisy val {result['noisy_val_top1_last']:.2f}) in {result['wall_time_s']:.0f} s",
                    flush=True,
                )
    print("[v3] every planned cell is done" if not args.only else f"[v3] cells {args.only}* done")
    return 0


def cmd_list(args) -> int:
    results = Results(args.results)
    for cell in plan(results):
        result = results.load(cell)
        print(f"{cell.name:30s} {'done %.2f' % result['test_top1_last'] if result else 'pending'}")
    return 0


REPRODUCED_KEYS = ("test_top1_last", "noisy_val_top1_last", "test_ece_last", "teacher_test_top1_last")


def cmd_reproduce(args) -> int:
    """Retrains one committed cell from scratch with its recorded thread count and prints
    each number beside the committed one. Exact agreement needs the cell's commit: run it
    from ``git worktree add DIR COMMIT``."""
    cell = parse_cell(args.cell)
    committed = Results(args.results).load(cell)
    if committed is None:
        raise SystemExit(f"{cell.name}: no committed result in {args.results / 'cells'}")
    here = source_commit()
    if committed["commit"] != here:
        print(
            f"[v3] note: this checkout is {here}, the cell ran at {committed['commit']}; "
            f"numbers may differ for that reason alone",
            flush=True,
        )
    runs = args.runs / "reproduce"
    if (runs / cell.name).exists():
        raise SystemExit(f"{runs / cell.name} exists: remove it to retrain from scratch")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if committed.get("omp_num_threads"):  # CPU reductions depend on the thread count
        env["OMP_NUM_THREADS"] = str(committed["omp_num_threads"])
    rerun = train_and_diagnose(cell, runs, env=env)
    differences = 0
    for key in REPRODUCED_KEYS:
        if key in committed:
            same = rerun[key] == committed[key]
            differences += not same
            print(
                f"{key:26s} committed {committed[key]!s:22s} rerun {rerun[key]!s:22s} {'same' if same else 'DIFFERS'}"
            )
    return 1 if differences else 0


# What the tables and plots show, in words: written by the lead once the results are in
# (empty: the page has no "Reading" section). Numbers quoted here must come from the page.
READING = ""


def table_status(results: Results) -> str:
    """Cells done against cells planned: the plan grows as selections are made."""
    planned = plan(results)
    done = sum(results.load(cell) is not None for cell in planned)
    per_setting = len(METHODS) * (GRID_POINTS + len(SEEDS) - 1)
    total = len(SETTING_ORDER) * per_setting + len(LONG["methods"])
    if done == total:
        return f"all {total} cells done."
    return (
        f"in progress: {done} of the {len(planned)} cells planned so far are done ({total} once every "
        f"selection is made; {total - per_setting} without {SETTING_ORDER[-1]}, which runs last and only if "
        f"the budget allows). The tables show finished cells only."
    )


def cmd_table(args) -> int:
    """RESULTS/README.md and its plots, and the results index one folder up, from the cell
    files alone (benchmarks/sweep_report.py)."""
    from sweep_report import Sweep, write_index, write_v3_report

    results = Results(args.results)
    sweep = Sweep(
        cells=[json.loads(p.read_text()) for p in sorted(results.cells.glob("*.json"))],
        selected={(s, m): results.selected(s, m) for s in SETTINGS for m in METHODS},
        settings=list(SETTINGS),
        methods=list(METHODS),
        labels=LABELS,
        seeds=len(SEEDS),
        status=table_status(results),
        reading=READING,
    )
    print(f"wrote {write_v3_report(sweep, args.results)}")
    print(f"wrote {write_index(sweep, args.results.parent, args.results.name)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where cells/ is (default: docs/results/v3)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="run folders (default: runs/sweep-v3)")
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="run every pending cell, in plan order")
    run.add_argument("--only", help="only cells whose name starts with this (e.g. sym60-nrd)")
    run.add_argument("--jobs", type=int, default=1, help="cells at a time (each its own process)")
    sub.add_parser("list", help="the planned cells and their state")
    reproduce = sub.add_parser("reproduce", help="retrain one cell and compare with its committed numbers")
    reproduce.add_argument("cell", help="a cell name, e.g. sym60-nrd-g0-s0")
    sub.add_parser("table", help="write the v3 results page, its plots and the results index from the cells")
    args = parser.parse_args(argv)
    args.results, args.runs = args.results.resolve(), args.runs.resolve()
    return {"run": cmd_run, "list": cmd_list, "reproduce": cmd_reproduce, "table": cmd_table}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())

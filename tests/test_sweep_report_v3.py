"""The v3 results page (`benchmarks/sweep_v3.py table`, benchmarks/sweep_report.py): synthetic
cell files shaped as sweep_v3.py writes them go into a temporary results folder, the real
`table` command writes the page, its plots and the index, and the numbers on the page are
checked against the ones the cells were made with."""

import json
import re

import pytest

from conftest import load_benchmark

sweep_v3 = load_benchmark("sweep_v3")
sweep_report = load_benchmark("sweep_report")
Sweep, write_v3_report = sweep_report.Sweep, sweep_report.write_v3_report

NOISE = {"sym20": 0.2, "sym40": 0.4, "sym60": 0.6, "sym80": 0.8}


def curve(last: float, best: float, epochs: int) -> list[list[float]]:
    """Every 5 epochs: up to ``best`` a third of the way in, then down to ``last``."""
    peak = max(5, 5 * round(epochs / 15))
    points = []
    for epoch in range(5, epochs + 1, 5):
        rise = 10 + (best - 10) * epoch / peak
        fall = best - (best - last) * (epoch - peak) / max(epochs - peak, 1)
        points.append([epoch, round(rise if epoch <= peak else fall, 2)])
    return points


def reliability(accuracy_gap: float) -> dict:
    """15 bins, most test images in the confident ones, accuracy ``accuracy_gap`` below confidence."""
    confidence = [(b + 0.5) / 15 for b in range(15)]
    return {
        "confidence": confidence,
        "accuracy": [max(0.0, c - accuracy_gap) for c in confidence],
        "count": [0, 0, 3, 20, 60, 110, 180, 240, 300, 380, 500, 700, 1100, 2100, 4307],
    }


def roc(auroc: float) -> list[list[float]]:
    """tpr = fpr ** a, whose area is 1 / (1 + a)."""
    power = 1 / auroc - 1
    return [[round(f / 20, 4), round((f / 20) ** power, 4)] for f in range(21)]


def model_diagnosis(top1: float, mislabeled: float, auroc: float) -> dict:
    return {
        "table1": {
            "plain": {"clean": 98.0, "mislabeled": mislabeled - 5},
            "augmix_ensemble": {"clean": 97.0, "mislabeled": mislabeled},
        },
        "auroc": {"plain": auroc - 0.05, "augmix_ensemble": auroc},
        "ranking": {"precision_at_10pct": round(min(1.0, auroc + 0.1), 4), "roc": roc(auroc)},
    }


def make_cell(
    setting,
    method,
    grid_index=0,
    seed=0,
    top1=70.0,
    noisy_val=40.0,
    best=None,
    ece=0.1,
    mislabeled=10.0,
    auroc=0.8,
    teacher=None,
    long=False,
    commit="abc1234",
):
    """A plausible cell file. ``teacher``: the NRD teacher's (top1, mislabeled, auroc); NRD
    cells get one 0.5 points above the student unless given."""
    epochs = 240 if long else 60
    best = top1 + 2 if best is None else best
    models = {"student": model_diagnosis(top1, mislabeled, auroc)}
    cell = {
        "cell": ("long-" if long else "") + f"{setting}-{method}-g{grid_index}-s{seed}",
        "setting": setting,
        "noise": {"type": "symmetric", "rate": NOISE[setting]}
        if setting in NOISE
        else {"type": "asymmetric", "rate": 0.4, "map": "fmnist"},
        "method": method,
        "seed": seed,
        "grid_index": grid_index,
        "long": long,
        "epochs": epochs,
        "hyperparameters": sweep_v3.grid(setting, method)[grid_index],
        "commit": commit,
        "test_top1_last": top1,
        "test_top1_best": best,
        "test_ece_last": ece,
        "noisy_val_top1_last": noisy_val,
        "curves": {
            "fmnist_test/student": curve(top1, best, epochs),
            "noisy_val/student": curve(noisy_val, noisy_val + 1, epochs),
        },
        "reliability": {"student": reliability(ece)},
    }
    if method == "nrd":
        t_top1, t_mislabeled, t_auroc = teacher or (top1 + 0.5, mislabeled + 1, auroc + 0.01)
        models["teacher"] = model_diagnosis(t_top1, t_mislabeled, t_auroc)
        cell.update(
            teacher_test_top1_last=t_top1,
            teacher_test_ece_last=ece / 2,
            teacher_test_top1_best=t_top1 + 1,
            reliability={"student": reliability(ece), "teacher": reliability(ece / 2)},
        )
        cell["curves"].update(
            {
                "fmnist_test/teacher": curve(t_top1, t_top1 + 1, epochs),
                "noisy_val/teacher": curve(noisy_val, noisy_val + 1, epochs),
            }
        )
    cell["diagnosis"] = {
        "views": 10,
        "counts": {"clean": 900, "mislabeled": 1100},
        **{part: {m: d[part] for m, d in models.items()} for part in ("table1", "auroc", "ranking")},
    }
    return cell


@pytest.fixture
def sweep(tmp_path):
    """add(cell) writes a cell file; page() runs `sweep_v3.py table` and returns (page, index)."""
    results = tmp_path / "results" / "v3"

    def add(cell):
        sweep_v3.write_atomic(results / "cells" / f"{cell['cell']}.json", json.dumps(cell))

    def page():
        assert sweep_v3.main(["--results", str(results), "table"]) == 0
        return (results / "README.md").read_text(), (results.parent / "README.md").read_text()

    add.page, add.results = page, results
    return add


def add_setting(sweep, setting, numbers, seeds=3, **common):
    """Every method's grid at seed 0 (point 0 best on noisy validation), then the selected
    point's other seeds; ``numbers[method]`` = per-seed kwargs of make_cell."""
    for method in sweep_v3.METHODS:
        for index in range(3):
            kwargs = (
                {**common, **numbers.get(method, [{}])[0]} if index == 0 else {**common, "noisy_val": 30.0, "top1": 5.0}
            )
            sweep(make_cell(setting, method, index, 0, **kwargs))
        for seed in range(1, seeds):
            sweep(make_cell(setting, method, 0, seed, **common, **numbers.get(method, [{}] * seeds)[seed]))


def row(text, start):
    """The one table row that starts with ``start``."""
    rows = [line for line in text.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


def headline(page):
    """The clean test top-1 section of a page."""
    return page.split("## Clean test top-1")[1].split("## ")[0]


def top1s(*values):
    return [{"top1": v} for v in values]


def test_means_sds_and_n_in_every_headline_cell(sweep):
    add_setting(sweep, "sym60", {"ce": top1s(60.0, 62.0, 64.0)})
    add_setting(sweep, "sym80", {"ce": top1s(30.0)}, seeds=1)
    page, _ = sweep.page()
    top1 = headline(page)
    assert row(top1, "| method |") == "| method | sym60 | sym80 |"  # only the settings that ran
    assert row(top1, "| CE |") == "| CE | 62.00 ± 2.00 (n=3) | 30.00 (n=1) |"
    assert row(top1, "| NRD (teacher) |") == "| NRD (teacher) | 70.50 ± 0.00 (n=3) | 70.50 (n=1) |"
    numbers = [
        cell
        for line in top1.splitlines()
        if line.startswith("| ") and "---" not in line
        for cell in line.strip("|").split("|")[1:]
        if re.search(r"\d", cell) and "sym" not in cell
    ]
    assert numbers and all("(n=" in cell for cell in numbers)
    ece = page.split("## Expected calibration error")[1].split("## ")[0]
    assert row(ece, "| CE |") == "| CE | 10.00 ± 0.00 (n=3) | 10.00 (n=1) |"  # a fraction in the cell, % on the page


def test_grid_points_that_were_not_selected_and_long_runs_stay_out_of_the_means(sweep):
    add_setting(sweep, "sym60", {"gjs": top1s(70.0, 71.0, 72.0)})
    sweep(make_cell("sym60", "gjs", 0, 0, top1=10.0, long=True))
    page, _ = sweep.page()
    assert row(headline(page), "| GJS |") == "| GJS | 71.00 ± 1.00 (n=3) |"


def test_the_selection_table_marks_the_point_sweep_v3_selects(sweep):
    for index, score in enumerate((41.0, 47.5, 44.0)):
        sweep(make_cell("sym40", "nrd", index, 0, noisy_val=score))
    sweep(make_cell("sym40", "gce", 0, 0, noisy_val=50.0))  # its grid is not done: nothing selected yet
    page, _ = sweep.page()
    section = page.split("### sym40")[1].split("## ")[0]
    assert row(section, "| NRD | g1 |") == "| NRD | g1 | `pi=[0.25, 0.5, 0.25], scale=True` | 47.50 | **yes** |"
    assert row(section, "| NRD | g0 |").endswith("| 41.00 |  |") and row(section, "| NRD | g2 |").endswith("|  |")
    assert row(section, "| GCE | g0 |").endswith("| 50.00 | pending |")
    # the headline shows the selected point's seed 0 and nothing of GCE, not selected yet
    assert row(headline(page), "| NRD |") == "| NRD | 70.00 (n=1) |" and "| GCE |" not in headline(page)


TARGETS = {"nrd": top1s(75.0, 76.0, 77.0), "gjs": top1s(74.0, 75.0, 76.0), "ce": top1s(65.0, 66.5, 68.0)}


def test_targets_met_not_met_and_pending_from_the_means(sweep):
    add_setting(sweep, "sym60", TARGETS)
    add_setting(sweep, "sym80", {"nrd": top1s(40.0), "gjs": top1s(30.0)}, seeds=1)
    page, _ = sweep.page()
    # 76 >= 75: met; 76 < 66.5 + 10: not met; sym80 has one seed: pending, however large the gap
    assert row(page, "| NRD >= GJS: clean test top-1, mean of 3 seeds | sym60 |").endswith("| met |")
    assert "76.00 ± 1.00 (n=3) | GJS 75.00 ± 1.00 (n=3)" in row(
        page, "| NRD >= GJS: clean test top-1, mean of 3 seeds | sym60 |"
    )
    assert row(page, "| NRD >= CE + 10 points: clean test top-1, mean of 3 seeds | sym60 |").endswith("| **not met** |")
    assert row(page, "| NRD >= GJS: clean test top-1, mean of 3 seeds | sym80 |").endswith(
        "| 40.00 (n=1) | GJS 30.00 (n=1) | pending |"
    )
    assert row(page, "| Figure 4:").endswith("| pending |")


def test_teacher_targets_compare_with_the_best_baseline(sweep):
    numbers = {
        "nrd": [{"mislabeled": 20.0, "auroc": 0.85, "teacher": (76.0, 30.0, 0.86)}] * 3,
        "gjs": [{"mislabeled": 25.0, "auroc": 0.90}] * 3,
        "ce": [{"mislabeled": 2.0, "auroc": 0.70}] * 3,
    }
    add_setting(sweep, "sym60", numbers)
    add_setting(sweep, "sym40", numbers, seeds=2)
    page, _ = sweep.page()
    mislabeled = row(page, "| NRD's teacher: most mislabeled samples predicted right (Table 1, K views) | sym60 |")
    assert mislabeled.endswith("| 30.0 ± 0.0 (n=3) | best baseline: GJS 25.0 ± 0.0 (n=3) | met |")
    auroc = row(page, "| NRD's teacher: best AUROC of finding mislabeled samples (K views) | sym60 |")
    assert auroc.endswith("| 0.860 ± 0.000 (n=3) | best baseline: GJS 0.900 ± 0.000 (n=3) | **not met** |")
    assert row(page, "| NRD's teacher: most mislabeled samples predicted right (Table 1, K views) | sym40 |").endswith(
        "(n=2) | pending |"
    )
    # the diagnostics table: NRD's teacher and student, means with n
    diagnostics = page.split("## Mislabeled training samples")[1].split("### sym60")[1].split("## ")[0]
    assert (
        row(diagnostics, "| NRD |") == "| NRD | 97.0 ± 0.0 (n=3) | 20.0 ± 0.0 (n=3) | 0.800 ± 0.000 (n=3) "
        "| 0.850 ± 0.000 (n=3) | 0.950 ± 0.000 (n=3) |"
    )
    assert row(diagnostics, "| NRD (teacher) |").startswith("| NRD (teacher) | 97.0 ± 0.0 (n=3) | 30.0 ± 0.0 (n=3) |")


@pytest.mark.parametrize("gjs_best, verdict", [(80.0, "met"), (71.0, "**not met**")])
def test_figure4_compares_best_minus_last_of_the_long_runs(sweep, gjs_best, verdict):
    add_setting(sweep, "sym60", {})
    sweep(make_cell("sym60", "gjs", 0, 0, top1=70.0, best=gjs_best, long=True))  # drop 10 or 1
    sweep(make_cell("sym60", "nrd", 0, 0, top1=75.0, best=77.0, long=True))  # drop 2
    sweep(make_cell("sym60", "ce", 0, 0, top1=50.0, best=70.0, long=True))
    page, _ = sweep.page()
    assert row(page, "| Figure 4:").endswith(
        f"| sym60, 240 epochs | best − last 2.00 (n=1) | GJS {gjs_best - 70:.2f} (n=1) | {verdict} |"
    )
    figure4 = page.split("## Figure 4: long training (sym60, 240 epochs, seed 0)")[1]
    assert row(figure4, "| CE |") == "| CE | 70.00 (n=1) | 50.00 (n=1) | 20.00 (n=1) |"


def test_plots_exist_are_linked_and_not_empty(sweep):
    add_setting(sweep, "sym60", TARGETS)
    add_setting(sweep, "sym40", {}, seeds=1)
    for method in ("ce", "gjs", "nrd"):
        sweep(make_cell("sym60", method, 0, 0, long=True))
    page, _ = sweep.page()
    names = [
        "curves_sym40.png",
        "curves_sym60.png",
        "noise_rates.png",
        "long.png",
        "roc_sym40.png",
        "roc_sym60.png",
        "reliability_sym40.png",
        "reliability_sym60.png",
    ]
    for name in names:
        path = sweep.results / name
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG", name
        assert f"]({name})" in page


def test_the_index_leads_with_v3_and_keeps_v2_and_v1_below(sweep):
    add_setting(sweep, "sym60", TARGETS)
    page, index = sweep.page()
    headings = [line for line in index.splitlines() if line.startswith("## ")]
    assert headings[0].startswith("## Sweep v3") and "(v3/README.md)" in headings[0]
    assert headings[1] == "## Earlier sweeps (superseded)"
    earlier = index.split(headings[1])[1]
    assert "[v2](v2/README.md)" in earlier and "[v1](v1/README.md)" in earlier and "superseded by v3" in earlier
    v3 = index.split(headings[1])[0]
    assert row(v3, "| NRD |") == row(headline(page), "| NRD |")  # the headline top-1 row, the same numbers
    assert "| NRD >= GJS: clean test top-1, mean of 3 seeds | sym60 |" in v3 and "**Status:** in progress: 25 of" in v3


def test_status_protocol_commits_and_the_reading_section(sweep, tmp_path):
    add_setting(sweep, "sym60", {}, commit="04f9328aaaa")
    sweep(make_cell("sym80", "ce", 0, 0, commit="04f9328aaaa+dirty"))
    page, _ = sweep.page()
    assert "**Status:** in progress: 26 of the 88 cells planned so far are done (128 once every" in page
    assert "[PROTOCOL.md](PROTOCOL.md)" in page
    assert "* `04f9328aaaa`: 25 cells" in page and "* `04f9328aaaa+dirty`: 1 cell (**tracked files" in page
    assert "## Reading" not in page  # sweep_v3.READING is empty until the lead writes it
    cells = [json.loads(p.read_text()) for p in sorted((sweep.results / "cells").glob("*.json"))]
    written = Sweep(cells, {}, ["sym60"], list(sweep_v3.METHODS), sweep_v3.LABELS, reading="* NRD wins.")
    text = write_v3_report(written, tmp_path / "other").read_text()
    assert "## Reading\n\n* NRD wins.\n" in text


def test_no_cells_yet_still_writes_a_page(sweep):
    sweep.results.mkdir(parents=True)
    page, index = sweep.page()
    assert "**Status:** in progress: 0 of the 75 cells planned so far are done" in page
    assert "## Plots" not in page and "## Sweep v3" in index

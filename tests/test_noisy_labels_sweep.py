"""The sweep's planning (benchmarks/noisy_labels.py): which cells exist, in what order,
which grid entry the selection picks, and that a finished cell is never rerun: bookkeeping
over result files in a temporary folder, since a real cell is a 6-10 minute training run
(the committed cells in docs/results/v2/cells are those runs). ``diagnose`` runs the real
tools on a small real run standing in for a cell's run folder."""

import json
import shutil
import sys
import types
from collections import Counter

import pytest

from conftest import REPO, load_benchmark

sweep = load_benchmark("noisy_labels")


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "CELLS", tmp_path / "cells")
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")

    def finish(cell, noisy_val=50.0, test=70.0):
        sweep.write_atomic(
            sweep.result_path(sweep.cell_name(*cell)),
            json.dumps({"noisy_val_top1_last": noisy_val, "test_top1_last": test}),
        )

    return finish


def test_before_the_selection_only_the_grid_and_ce_at_60_are_planned(results):
    cells = sweep.plan()
    grid = sum(len(entries) for entries in sweep.GRIDS.values())
    assert len(cells) == grid + 1 and cells.pop(1) == ("sym60", "ce", 0, 0)
    assert {(setting, seed) for setting, _, _, seed in cells} == {("sym40", 0)}


def test_selection_uses_noisy_validation_never_the_clean_test_labels(results):
    # entry 0: better on the clean test set, worse on noisy validation; entry 1 must win
    results(("sym40", "gjs", 0, 0), noisy_val=50.0, test=90.0)
    assert sweep.selected_grid_index("gjs") is None  # not all of the grid is done yet
    results(("sym40", "gjs", 1, 0), noisy_val=51.0, test=60.0)
    assert sweep.selected_grid_index("gjs") == 1
    results(("sym40", "gce", 0, 0), noisy_val=52.0)
    results(("sym40", "gce", 1, 0), noisy_val=52.0)
    assert sweep.selected_grid_index("gce") == 0  # a tie goes to the first (the paper's default) entry


def test_once_selected_every_setting_and_seed_is_planned_once(results):
    for method, entries in sweep.GRIDS.items():
        for index in range(len(entries)):
            results(("sym40", method, index, 0), noisy_val=50.0 + index * (method == "nrd"))
    cells = sweep.plan()
    assert len(cells) == len(set(cells)) == 59
    final = Counter(
        (setting, method) for setting, method, index, _ in cells if index == sweep.selected_grid_index(method)
    )
    for setting in sweep.SETTINGS:
        for method in sweep.GRIDS:
            assert final[setting, method] == (3 if setting in ("sym40", "sym60") else 1), (setting, method)
    assert all(index == 1 for setting, method, index, _ in cells if method == "nrd" and setting != "sym40")
    # seed 0 of every setting comes before any extra seed
    first_extra = next(i for i, cell in enumerate(cells) if cell[3] != 0)
    assert all(cell[3] != 0 for cell in cells[first_extra:])


def test_run_skips_finished_cells_and_stops_when_all_are_done(results, monkeypatch, tmp_path):
    """run_cell is replaced by one that records the cell and writes its result file."""
    ran = []

    def fake_run_cell(cell, commit):
        ran.append(cell)
        results(cell, noisy_val=50.0)

    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    monkeypatch.setattr(sweep, "TRAIN", str(REPO / "README.md"))  # "shards exist": no make_shards
    results(("sym60", "ce", 0, 0))
    assert sweep.main(["run", "--only", "sym40"]) == 0  # the selection grid first: then it is known
    assert len(ran) == sum(len(entries) for entries in sweep.GRIDS.values()) + 2 * len(sweep.GRIDS)
    ran.clear()
    assert sweep.main(["run", "--only", "sym60"]) == 0
    assert ("sym60", "ce", 0, 0) not in ran and all(cell[0] == "sym60" for cell in ran)
    assert len(ran) == 3 * len(sweep.GRIDS) - 1
    before = len(ran)
    assert sweep.main(["run", "--only", "sym60"]) == 0
    assert len(ran) == before  # nothing left: nothing rerun


def test_diagnose_retrains_a_missing_run_folder_and_checks_it_reproduces(results, monkeypatch, capsys):
    """Run folders are not committed, so `diagnose` on a fresh machine trains the cell again.
    The training command is replaced by a short script that makes the checkpoint folder
    (a real cell trains for minutes), and the rerun's numbers by fixed ones: what is tested
    is the bookkeeping, that a rerun happens only when needed and a mismatch is recorded."""
    cell = ("sym60", "ce", 0, 0)
    name = sweep.cell_name(*cell)
    committed = json.dumps({"test_top1_last": 48.75, "noisy_val_top1_last": 25.9, "test_ece_last": None})
    sweep.write_atomic(sweep.result_path(name), committed)
    ran = []

    def fake_command(*c):
        ran.append(c)
        run = sweep.RUNS / name
        make = (
            f"import pathlib; pathlib.Path({str(run / 'checkpoints')!r}).mkdir(parents=True, exist_ok=True); "
            f"pathlib.Path({str(run / 'summary.json')!r}).write_text('{{}}')"
        )
        return [sys.executable, "-c", make]

    rerun_numbers = {"test_top1_last": 48.75, "noisy_val_top1_last": 25.9, "test_ece_last": None, "commit": "abc"}
    monkeypatch.setattr(sweep, "command", fake_command)
    monkeypatch.setattr(sweep, "summarize_run", lambda *a: dict(rerun_numbers))

    report = sweep.ensure_run_folder(cell)
    assert ran == [cell] and (sweep.RUNS / name / "checkpoints").is_dir()
    assert report["rerun"] and report["reproduces_committed_result"] and report["commit"] == "abc"
    assert sweep.ensure_run_folder(cell) == {"rerun": False} and len(ran) == 1  # the folder is here now

    (sweep.RUNS / name / "summary.json").unlink()  # a rerun cut short: checkpoints but no summary
    rerun_numbers["test_top1_last"] = 47.0
    report = sweep.ensure_run_folder(cell)
    assert len(ran) == 2 and not report["reproduces_committed_result"] and report["rerun_test_top1_last"] == 47.0
    assert "differs from its committed result" in capsys.readouterr().out
    assert sweep.result_path(name).read_text() == committed  # the committed result is never replaced


def test_diagnose_rerun_failure_names_the_cell_and_its_log(results, monkeypatch):
    cell = ("sym40", "nrd", 1, 0)
    results(cell)
    monkeypatch.setattr(sweep, "command", lambda *c: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"rerunning sym40-nrd-g1-s0 .*exit 3.*diagnose-rerun\.log"):
        sweep.ensure_run_folder(cell)


@pytest.mark.slow
def test_diagnose_runs_both_tools_on_each_finished_ce_and_nrd_cell_once(results, nrd_run, monkeypatch, tmp_path):
    """``diagnose`` end to end with the real tools on a real small NRD run standing in for the
    cell's run folder (a real cell trains for minutes): Table 1 and the ranking land in the
    cell's diagnosis file with their commands and plots; cells of other methods or seeds
    and unfinished ones are left alone; a second call runs nothing."""
    cell = ("sym40", "nrd", 0, 0)
    name = sweep.cell_name(*cell)
    for finished in (cell, ("sym40", "gjs", 0, 0), ("sym40", "nrd", 0, 1)):
        results(finished)
    shutil.copytree(nrd_run, sweep.RUNS / name, ignore=shutil.ignore_patterns("diag", "ranking"))
    monkeypatch.setattr(sweep, "DIAGNOSED", tmp_path / "diagnosed")
    monkeypatch.setattr(sweep, "DIAGNOSE_VIEWS", 2)  # 10 in the sweep; what is tested is the wiring
    monkeypatch.setattr(
        sweep, "plan", lambda: [("sym40", "ce", 0, 0), ("sym40", "gjs", 0, 0), cell, ("sym40", "nrd", 0, 1)]
    )

    assert sweep.cmd_diagnose(None) == 0
    assert sorted(p.name for p in sweep.DIAGNOSED.glob("*.json")) == [f"{name}.json"]
    report = json.loads((sweep.DIAGNOSED / f"{name}.json").read_text())
    assert report["cell"] == name and report["checkpoint_run"] == {"rerun": False}  # its folder was here
    assert report["command"].startswith("tools/diagnose.py ") and "--views 2" in report["command"]
    assert report["views"] == 2 and report["counts"] and report["table1"]
    ranking = report["find_mislabeled"]
    assert ranking["command"].startswith("tools/find_mislabeled.py ") and 0.0 <= ranking["auroc"] <= 1.0
    assert ranking["at_k"] and ranking["mislabeled"] > 0  # 40% noise: the ranking has positives
    assert {p.name for p in sweep.DIAGNOSED.glob("*.png")} == {
        f"{name}-log_likelihood_student.png",
        f"{name}-log_likelihood_teacher.png",
    }

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"a finished diagnosis ran again: {args}")

    monkeypatch.setattr(sweep, "subprocess", types.SimpleNamespace(run=must_not_run))
    assert sweep.cmd_diagnose(None) == 0


def test_diagnosis_takes_a_seed_whose_run_folder_is_here_before_retraining_seed_0(results, monkeypatch, tmp_path):
    """Retraining a cell for its checkpoint costs as long as the cell: a seed whose run
    folder is on this machine is diagnosed instead, one seed per cell, and a cell already
    diagnosed at some seed keeps that seed."""
    monkeypatch.setattr(sweep, "DIAGNOSED", tmp_path / "diagnosed")
    sixty = [("sym60", "nrd", 0, seed) for seed in (0, 1, 2)]
    eighty = ("sym80", "nrd", 0, 0)
    monkeypatch.setattr(sweep, "plan", lambda: [("sym60", "gjs", 0, 0), *sixty, eighty, ("sym80", "ce", 0, 1)])
    for cell in (*sixty, eighty, ("sym60", "gjs", 0, 0), ("sym80", "ce", 0, 1)):
        results(cell)

    def run_folder(cell):
        run = sweep.RUNS / sweep.cell_name(*cell)
        (run / "checkpoints").mkdir(parents=True)
        (run / "summary.json").write_text("{}")

    # no run folder anywhere: seed 0 (retrained); sym80 CE has only seed 1 done: nothing yet
    assert sweep.diagnosis_cells() == [sixty[0], eighty]
    run_folder(sixty[2])
    (sweep.RUNS / sweep.cell_name(*sixty[1]) / "checkpoints").mkdir(parents=True)  # cut short: no summary
    assert sweep.diagnosis_cells() == [sixty[2], eighty]
    assert sweep.diagnosis_cells("sym80") == [eighty]
    sweep.write_atomic(sweep.DIAGNOSED / f"{sweep.cell_name(*sixty[0])}.json", "{}")
    assert sweep.diagnosis_cells() == [sixty[0], eighty]  # diagnosed once: that seed stays


@pytest.mark.parametrize("recorded,shell,expected", [(1, None, "1"), (None, "1", "unset")])
def test_a_rerun_uses_the_thread_count_its_cell_recorded(results, monkeypatch, recorded, shell, expected):
    """CPU reductions depend on the thread count: a cell run with OMP_NUM_THREADS=1 is
    retrained with it, and one that recorded no count (torch's default) is retrained
    without it even where the shell sets it. The training command is replaced by one that
    records its environment (what is tested is the hand-over)."""
    cell = ("sym40", "nrd", 0, 1)
    name = sweep.cell_name(*cell)
    sweep.write_atomic(
        sweep.result_path(name),
        json.dumps(
            {
                "test_top1_last": 1.0,
                "noisy_val_top1_last": 1.0,
                "test_ece_last": 0.1,
                **({"omp_num_threads": recorded} if recorded else {}),
            }
        ),
    )
    seen = sweep.RUNS / "threads.txt"

    def fake_command(*c):
        run = sweep.RUNS / name
        return [
            sys.executable,
            "-c",
            f"import os, pathlib; pathlib.Path({str(run / 'checkpoints')!r}).mkdir(parents=True); "
            f"pathlib.Path({str(run / 'summary.json')!r}).write_text('{{}}'); "
            f"pathlib.Path({str(seen)!r}).write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))",
        ]

    monkeypatch.setattr(sweep, "command", fake_command)
    summary = {"test_top1_last": 1.0, "noisy_val_top1_last": 1.0, "test_ece_last": 0.1, "commit": "c"}
    monkeypatch.setattr(sweep, "summarize_run", lambda *a: summary)
    if shell:
        monkeypatch.setenv("OMP_NUM_THREADS", shell)
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert sweep.ensure_run_folder(cell)["reproduces_committed_result"]
    assert seen.read_text() == expected


def test_a_cell_records_the_thread_count_it_ran_with(results, monkeypatch):
    """The cell's thread count is what `diagnose` must retrain with; training itself is
    replaced (what is tested is the record)."""
    cell = ("sym40", "ce", 0, 2)
    monkeypatch.setattr(
        sweep, "train", lambda *a, **k: {"test_top1_last": 1.0, "noisy_val_top1_last": 1.0, "wall_time_s": 1.0}
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep.run_cell(cell, commit=False)["omp_num_threads"] == 1
    assert json.loads(sweep.result_path(sweep.cell_name(*cell)).read_text())["omp_num_threads"] == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "omp_num_threads" not in sweep.run_cell(cell, commit=False)

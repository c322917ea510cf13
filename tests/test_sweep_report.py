"""The sweep report's diagnostics tables (benchmarks/sweep_report.py), from report dicts
shaped as `noisy_labels.py diagnose` writes them: a pure function, no runs needed."""

import pytest

from conftest import load_benchmark

sweep_report = load_benchmark("sweep_report")
diagnosis_lines = sweep_report.diagnosis_lines


def report(cell, find_mislabeled=None):
    modes = {"plain": {"clean": 97.5, "mislabeled": 66.1}, "augmix_ensemble": {"clean": 96.1, "mislabeled": 70.5}}
    out = {
        "cell": cell,
        "samples": 2000,
        "table1": {"teacher": modes},
        "auroc": {"teacher": {"plain": 0.9601, "augmix_ensemble": 0.9694}},
    }
    if find_mislabeled is not None:
        out["find_mislabeled"] = find_mislabeled
    return out


def test_table1_and_precision_at_k_rows():
    ranked = {
        "model": "teacher",
        "mislabeled": 723,
        "auroc": 0.97,
        "at_k": [
            {"k": "1%", "precision": 1.0},
            {"k": "5%", "precision": 0.99},
            {"k": "10%", "precision": 0.985, "recall": 0.2739},
            {"k": "number mislabeled", "precision": 0.8934},
        ],
    }
    lines = diagnosis_lines(
        [report("sym40-nrd-g0-s0", ranked), report("sym60-nrd-g1-s0")], counted={"sym40-nrd-g0-s0", "sym60-nrd-g1-s0"}
    )
    assert "| sym40-nrd-g0-s0 | teacher | 97.5 | 96.1 | 66.1 | 70.5 | 0.960 | 0.969 |" in lines
    assert "| sym40-nrd-g0-s0 | teacher | 723 | 1.000 | 0.990 | 0.985 | 0.893 | 0.274 | 0.970 |" in lines
    assert any("of the 2,000 samples" in line for line in lines)
    assert lines[0] == "## Mislabeled training samples (tools/diagnose.py, K = 10 AugMix views)"
    # a cell not yet ranked gets Table 1 only
    assert sum(line.startswith("| sym60-nrd-g1-s0 |") for line in lines) == 1


def test_a_ranking_without_clean_labels_shows_dashes():
    unranked = {"model": "teacher", "mislabeled": None, "auroc": None, "at_k": None}
    lines = diagnosis_lines([report("sym40-nrd-g0-s0", unranked)])
    assert "| sym40-nrd-g0-s0 | teacher | – | – | – | – | – | – | – |" in lines


def test_a_grid_entry_the_selection_did_not_pick_is_marked():
    lines = diagnosis_lines([report("sym40-nrd-g0-s0"), report("sym40-nrd-g1-s0")], counted={"sym40-nrd-g1-s0"})
    assert any(line.startswith("| sym40-nrd-g0-s0 (not selected) | teacher |") for line in lines)
    assert any(line.startswith("| sym40-nrd-g1-s0 | teacher |") for line in lines)


def test_no_diagnosed_cells_no_section():
    assert diagnosis_lines([]) == []


def test_targets_are_judged_on_means_and_say_when_not_met():
    target_lines = sweep_report.target_lines
    top1 = {
        "CE": {"sym60": [64.0, 66.0]},
        "GJS": {"sym60": [76.0], "sym80": [49.5]},
        "NRD": {"sym60": [73.0, 70.0], "sym80": [18.8]},
        "NRD (teacher)": {"sym60": [72.9, 70.1]},
    }
    ece = {"CE": {"sym40": [7.1], "sym60": [16.1], "asym40": [11.81]}, "NRD": {"sym40": [16.5], "sym60": [12.0]}}
    lines = target_lines(top1, ece)
    # 71.5 - 65.0 = 6.5 >= 5: met; 71.5 < 76: not met; teacher mean shown beside
    assert "| top-1: NRD >= CE + 5 points | sym60 | 71.50 | CE 65.00 | 71.50 | met |" in lines
    assert "| top-1: NRD > GJS | sym60 | 71.50 | GJS 76.00 | 71.50 | **not met** |" in lines
    assert "| top-1: NRD > GJS | sym80 | 18.80 | GJS 49.50 | – | **not met** |" in lines
    # ECE: lower is better
    assert "| ECE: NRD < CE | sym40 | 16.50 | CE 7.10 | – | **not met** |" in lines
    assert "| ECE: NRD < CE | sym60 | 12.00 | CE 16.10 | – | met |" in lines
    assert "| ECE: NRD < CE | asym40 | – | CE 11.81 | – | not yet run |" in lines


def test_memorization_drop_is_best_minus_last_per_seed():
    memorization_lines = sweep_report.memorization_lines
    cells = [
        {"method": "ce", "setting": "sym60", "test_top1_best": 70.5, "test_top1_last": 64.0},
        {"method": "ce", "setting": "sym60", "test_top1_best": 71.0, "test_top1_last": 66.5},
        {"method": "nrd", "setting": "sym60", "test_top1_best": 73.5, "test_top1_last": 73.0},
    ]
    lines = memorization_lines(cells, ["sym60", "sym80"], {"ce": "CE", "nrd": "NRD"})
    assert "| CE | 5.50 ± 1.41 (n=2) | – |" in lines
    assert "| NRD | 0.50 | – |" in lines


def test_mean_curve_over_seeds_with_a_sd_band():
    mean_curve = sweep_report.mean_curve
    mean, band = mean_curve([[[5, 60.0], [10, 70.0]], [[5, 62.0], [10, 66.0], [15, 1.0]]])
    assert mean == [(5, 61.0), (10, 68.0)]  # epoch 15 is not in every run
    assert band[1][0] == 10
    assert band[1][1] == pytest.approx(68.0 - 8**0.5) and band[1][2] == pytest.approx(68.0 + 8**0.5)
    assert mean_curve([[[5, 60.0]]]) == ([(5, 60.0)], [])


def test_a_retrained_checkpoint_is_noted_and_a_mismatch_stands_out():
    same = {
        **report("sym40-ce-g0-s0"),
        "checkpoint_run": {"rerun": True, "commit": "5b0ed6fabc", "reproduces_committed_result": True},
    }
    other = {
        **report("sym60-ce-g0-s0"),
        "checkpoint_run": {
            "rerun": True,
            "commit": "5b0ed6fabc",
            "reproduces_committed_result": False,
            "rerun_test_top1_last": 47.0,
        },
    }
    kept = {**report("sym80-ce-g0-s0"), "checkpoint_run": {"rerun": False}}
    lines = diagnosis_lines([same, other, kept, report("sym20-ce-g0-s0")])
    notes = [line for line in lines if line.startswith("* ")]
    assert len(notes) == 2
    assert "sym40-ce-g0-s0" in notes[0] and "5b0ed6f;" in notes[0] and "reproduced" in notes[0]
    assert "sym60-ce-g0-s0" in notes[1] and "NOT reproduce" in notes[1] and "47.00" in notes[1]

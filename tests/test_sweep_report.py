"""The sweep report's diagnostics tables (benchmarks/sweep_report.py), from report dicts
shaped as `noisy_labels.py diagnose` writes them: a pure function, no runs needed."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from sweep_report import diagnosis_lines  # noqa: E402


def report(cell, find_mislabeled=None):
    modes = {"plain": {"clean": 97.5, "mislabeled": 66.1}, "augmix_ensemble": {"clean": 96.1, "mislabeled": 70.5}}
    out = {"cell": cell, "samples": 2000, "table1": {"teacher": modes},
           "auroc": {"teacher": {"plain": 0.9601, "augmix_ensemble": 0.9694}}}
    if find_mislabeled is not None:
        out["find_mislabeled"] = find_mislabeled
    return out


def test_table1_and_precision_at_k_rows():
    ranked = {"model": "teacher", "mislabeled": 723, "auroc": 0.97,
              "at_k": [{"k": "1%", "precision": 1.0}, {"k": "5%", "precision": 0.99}, {"k": "10%", "precision": 0.985},
                       {"k": "number mislabeled", "precision": 0.8934}]}
    lines = diagnosis_lines([report("sym40-nrd-g0-s0", ranked), report("sym60-nrd-g1-s0")])
    assert "| sym40-nrd-g0-s0 | teacher | 97.5 | 96.1 | 66.1 | 70.5 | 0.960 | 0.969 |" in lines
    assert "| sym40-nrd-g0-s0 | teacher | 723 | 1.000 | 0.990 | 0.985 | 0.893 | 0.970 |" in lines
    assert any("of the 2,000 samples" in line for line in lines)
    # a cell not yet ranked gets Table 1 only
    assert sum(line.startswith("| sym60-nrd-g1-s0 |") for line in lines) == 1


def test_a_ranking_without_clean_labels_shows_dashes():
    unranked = {"model": "teacher", "mislabeled": None, "auroc": None, "at_k": None}
    lines = diagnosis_lines([report("sym40-nrd-g0-s0", unranked)])
    assert "| sym40-nrd-g0-s0 | teacher | – | – | – | – | – | – |" in lines


def test_no_diagnosed_cells_no_section():
    assert diagnosis_lines([]) == []

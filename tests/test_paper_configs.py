"""configs/paper/: one config per cell of the NRD paper's Table 5, and the WebVision one.

TABLE5 below is the paper's Table 5 (appendix A.1), transcribed once. Every cell must have
its config under configs/paper/<dataset>/<method>_<setting>.yaml, every config must load
and validate with the project's loader, and its values must match the cell. Where the
re-laid copy of the paper (../shared/paper/README.md from the repository root) exists,
the transcription is also checked against its markdown tables; without that file the
transcription alone is the reference (the test still runs).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from nrd_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = REPO / "configs" / "paper"
PAPER_MARKDOWN = REPO.parent / "shared" / "paper" / "README.md"

SETTINGS = ("clean", "sym20", "sym40", "sym60", "sym80", "asym20", "asym40")
# Loss registry name -> the method's name in the paper's table.
METHODS = {
    "ce": "CE",
    "bs": "BS",
    "ls": "LS",
    "sce": "SCE",
    "gce": "GCE",
    "nce_rce": "NCE+RCE",
    "js": "JS",
    "gjs": "GJS",
    "nrd": "NRD",
}
DATASETS = {"cifar10": 10, "cifar100": 100}

# method: ([LR, WD] sym 20-80%, [LR, WD] asym 20-40%, one parameter cell per SETTINGS entry).
# A cell is None ("-", CE), a number (BS beta, LS epsilon, GCE q, JS pi1, GJS pi1) or a
# tuple (SCE / NCE+RCE [alpha, beta], NRD [pi1, pi2, pi3]).
TABLE5 = {
    "cifar10": {
        "ce": ((0.05, 1e-3), (0.1, 1e-3), (None,) * 7),
        "bs": ((0.1, 1e-3), (0.1, 1e-3), (0.5, 0.5, 0.7, 0.7, 0.9, 0.7, 0.5)),
        "ls": ((0.1, 5e-4), (0.1, 1e-3), (0.1, 0.5, 0.9, 0.7, 0.1, 0.1, 0.1)),
        "sce": (
            (0.01, 5e-4),
            (0.05, 1e-3),
            ((0.2, 0.1), (0.05, 0.1), (0.1, 0.1), (0.2, 1.0), (0.1, 1.0), (0.1, 0.1), (0.2, 1.0)),
        ),
        "gce": ((0.01, 5e-4), (0.1, 1e-3), (0.5, 0.7, 0.7, 0.7, 0.9, 0.1, 0.1)),
        "nce_rce": (
            (0.005, 1e-3),
            (0.05, 1e-4),
            ((10, 0.1), (10, 0.1), (10, 0.1), (1.0, 0.1), (10, 1.0), (10, 0.1), (1.0, 0.1)),
        ),
        "js": ((0.01, 5e-4), (0.1, 1e-3), (0.1, 0.7, 0.7, 0.9, 0.9, 0.3, 0.3)),
        "gjs": ((0.1, 5e-4), (0.1, 1e-3), (0.5, 0.3, 0.9, 0.1, 0.1, 0.3, 0.3)),
        "nrd": (
            (0.1, 5e-4),
            (0.1, 1e-3),
            (
                (0.2, 0.6, 0.2),
                (0.2, 0.6, 0.2),
                (0.2, 0.6, 0.2),
                (0.25, 0.5, 0.25),
                (0.25, 0.5, 0.25),
                (0.1, 0.8, 0.1),
                (0.15, 0.7, 0.15),
            ),
        ),
    },
    "cifar100": {
        "ce": ((0.4, 1e-4), (0.2, 1e-4), (None,) * 7),
        "bs": ((0.4, 1e-4), (0.4, 1e-4), (0.7, 0.5, 0.5, 0.5, 0.9, 0.3, 0.3)),
        "ls": ((0.2, 5e-5), (0.4, 1e-4), (0.1, 0.7, 0.7, 0.7, 0.9, 0.5, 0.7)),
        "sce": (
            (0.2, 1e-4),
            (0.4, 5e-5),
            ((0.1, 0.1), (0.1, 0.1), (0.1, 0.1), (0.1, 1.0), (0.1, 0.1), (0.1, 1.0), (0.1, 1.0)),
        ),
        "gce": ((0.4, 1e-5), (0.2, 1e-4), (0.5, 0.5, 0.5, 0.7, 0.7, 0.7, 0.7)),
        "nce_rce": (
            (0.2, 5e-5),
            (0.2, 5e-5),
            ((20, 0.1), (20, 0.1), (20, 0.1), (20, 0.1), (20, 0.1), (20, 0.1), (10, 0.1)),
        ),
        "js": ((0.2, 1e-4), (0.1, 1e-4), (0.1, 0.1, 0.3, 0.5, 0.3, 0.5, 0.5)),
        "gjs": ((0.2, 5e-5), (0.4, 1e-4), (0.3, 0.3, 0.5, 0.9, 0.1, 0.5, 0.1)),
        "nrd": (
            (0.2, 5e-5),
            (0.4, 1e-4),
            (
                (0.2, 0.6, 0.2),
                (0.2, 0.6, 0.2),
                (0.2, 0.6, 0.2),
                (0.2, 0.6, 0.2),
                (0.15, 0.7, 0.15),
                (0.25, 0.5, 0.25),
                (0.4, 0.2, 0.4),
            ),
        ),
    },
}

CELLS = [(ds, method, i, setting) for ds in TABLE5 for method in TABLE5[ds] for i, setting in enumerate(SETTINGS)]


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def all_close(a, b) -> bool:
    return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))


def config_path(ds: str, method: str, setting: str) -> Path:
    return PAPER_DIR / ds / f"{method}_{setting}.yaml"


def expected_noise(ds: str, setting: str) -> tuple:
    if setting == "clean":
        return ("none", 0.0, None)
    if setting.startswith("asym"):
        return ("asymmetric", int(setting[4:]) / 100, ds)
    return ("symmetric", int(setting[3:]) / 100, None)


def test_transcription_is_complete():
    for ds, rows in TABLE5.items():
        assert list(rows) == list(METHODS), ds
        for method, (sym, asym, cells) in rows.items():
            assert len(sym) == len(asym) == 2 and len(cells) == len(SETTINGS), (ds, method)
            if method == "nrd":  # the appendix tunes NRD with pi1 = pi3
                assert all(close(c[0], c[2]) and close(sum(c), 1.0) for c in cells), ds


def test_every_cell_has_a_config_and_nothing_else_is_there():
    for ds in TABLE5:
        expected = {f"{m}_{s}.yaml" for m in TABLE5[ds] for s in SETTINGS}
        present = {p.name for p in (PAPER_DIR / ds).glob("*.yaml")}
        assert present == expected, (ds, sorted(present ^ expected))
    assert {p.name for p in PAPER_DIR.iterdir() if p.is_dir()} == {"cifar10", "cifar100", "webvision"}


@pytest.mark.parametrize("ds, method, i, setting", CELLS, ids=[f"{c[0]}-{c[1]}_{c[3]}" for c in CELLS])
def test_config_loads_and_matches_table5(ds, method, i, setting):
    path = config_path(ds, method, setting)
    cfg = load_config(path)  # the project's loader: strict keys, types and loss validation
    sym, asym, cells = TABLE5[ds][method]
    cell = cells[i]

    # [LR, WD]: the asym column for asymmetric noise; the sym one otherwise (Table 5 has
    # no 0% column for them: the clean runs take the symmetric one, as GJS's configs do).
    lr, wd = asym if setting.startswith("asym") else sym
    assert close(cfg.optim.lr, lr) and close(cfg.optim.weight_decay, wd), (cfg.optim.lr, cfg.optim.weight_decay)

    # The method's parameter.
    loss = cfg.loss
    assert loss.name == method
    assert loss.ignored_params() == [], f"{path}: keys the loss does not take: {loss.ignored_params()}"
    params = loss.params()
    if method == "ce":
        assert cell is None and params == {}
    elif method in ("bs", "ls", "gce"):
        key = {"bs": "beta", "ls": "epsilon", "gce": "q"}[method]
        assert set(params) == {key} and close(params[key], cell)
    elif method in ("sce", "nce_rce"):
        assert set(params) == {"alpha", "beta"} and all_close((params["alpha"], params["beta"]), cell)
    elif method == "js":  # two distributions: [label, student]
        assert set(params) == {"pi", "scale"} and params["scale"] is True
        assert all_close(params["pi"], (cell, 1 - cell)), params["pi"]
    elif method == "gjs":  # label, then two student views sharing the rest evenly
        assert set(params) == {"pi", "scale"} and params["scale"] is True
        assert all_close(params["pi"], (cell, (1 - cell) / 2, (1 - cell) / 2)), params["pi"]
    else:  # nrd: [label, student, teacher]
        assert set(params) == {"pi", "scale"} and params["scale"] is True
        assert all_close(params["pi"], cell), params["pi"]
        assert cfg.teacher.decay == 0.99

    # The noise setting of the column.
    noise = cfg.data.noise
    assert (noise.type, noise.rate, noise.map) == expected_noise(ds, setting)

    # Appendix A.1, shared by every cell.
    assert cfg.data.num_classes == DATASETS[ds]
    assert cfg.model.arch == "preact_resnet34" and cfg.model.in_channels == 3
    assert cfg.data.batch_size == 128
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.epochs) == ("sgd", 0.9, 400)
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.gamma) == ("multistep", [0.5, 0.75], 0.1)
    assert cfg.optim.warmup_epochs == 0
    assert (cfg.data.augment.policy, cfg.data.augment.cutout) == ("cifar", 5)
    assert (cfg.engine.backend, cfg.engine.grad_accum_steps) == ("ddp", 1)

    # The same shards as configs/<dataset>.yaml, and a run folder of its own.
    base = load_config(REPO / "configs" / f"{ds}.yaml")
    assert (cfg.data.train, cfg.data.val) == (base.data.train, base.data.val)
    assert cfg.run.output_dir == f"runs/paper/{ds}/{method}_{setting}"

    # The header names the paper, the cell and the per-rank batch.
    header = path.read_text().splitlines()[:3]
    assert all(line.startswith("#") for line in header), header
    text = " ".join(header)
    assert "NRD paper" in text and "Table 5" in text and f"{METHODS[method]} /" in text
    assert "per rank" in text and "one process" in text


def test_output_dirs_are_distinct():
    dirs = [load_config(config_path(ds, m, s)).run.output_dir for ds, m, _, s in CELLS]
    assert len(set(dirs)) == len(dirs)


def test_webvision_config():
    path = PAPER_DIR / "webvision" / "nrd.yaml"
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.data.num_classes) == ("resnet50", 50)
    assert cfg.data.batch_size == 64 and cfg.optim.epochs == 300 and close(cfg.optim.lr, 0.1)
    assert cfg.optim.momentum == 0.9
    assert (cfg.loss.name, cfg.loss.pi, cfg.teacher.decay) == ("nrd", [0.1, 0.8, 0.1], 0.99)
    assert cfg.data.augment.policy == "imagenet" and cfg.data.augment.image_size == 224
    # Appendix A.2's milestones; the file must name section 5.1's other reading.
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.gamma) == ("multistep", [100.0, 200.0], 0.1)
    comments = " ".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    assert "A.2" in comments and "150" in comments and "250" in comments and "5.1" in comments
    assert "per rank" in comments and "one process" in comments
    base = load_config(REPO / "configs" / "webvision_rn50.yaml")
    assert (cfg.data.train, cfg.data.val) == (base.data.train, base.data.val)


def test_base_cifar_configs_no_longer_call_pi_unchecked():
    for name in ("cifar10.yaml", "cifar100.yaml"):
        text = (REPO / "configs" / name).read_text().lower()
        assert "could not be checked" not in text and "unchecked" not in text, name
        assert "configs/paper" in text, name


# --------------------------------------------------------------- the re-laid markdown

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)


def parse_cell(text: str):
    text = text.strip()
    if text in ("-", "—", ""):
        return None
    values = tuple(float(v) for v in NUMBER.findall(text))
    return values[0] if len(values) == 1 else values


def parse_markdown_table5(markdown: str) -> dict:
    """{dataset: {method: (sym [LR, WD], asym [LR, WD], cells)}} from the '### CIFAR-10'
    and '### CIFAR-100' tables under '## Table 5'."""
    section = markdown.split("## Table 5", 1)[1].split("\n## ", 1)[0]
    tables, current = {}, None
    for line in section.splitlines():
        heading = re.match(r"###\s+CIFAR-(10|100)\b", line)
        if heading:
            current = tables.setdefault(f"cifar{heading.group(1)}", {})
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].lower() == "method" or set(cells[0]) <= set("-: "):
            continue
        names = {v: k for k, v in METHODS.items()}
        assert cells[0] in names, f"unknown method row {cells[0]!r} in {PAPER_MARKDOWN}"
        assert len(cells) == 3 + len(SETTINGS), line
        current[names[cells[0]]] = (parse_cell(cells[1]), parse_cell(cells[2]), tuple(parse_cell(c) for c in cells[3:]))
    return tables


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and all_close(a, b)
    return close(a, b)


def test_transcription_matches_the_relaid_paper_when_present():
    if not PAPER_MARKDOWN.is_file():
        # No copy of the paper next to the checkout: the transcription above is the
        # reference, and the other tests check the configs against it.
        assert len(CELLS) == 2 * 9 * 7
        return
    parsed = parse_markdown_table5(PAPER_MARKDOWN.read_text())
    assert set(parsed) == set(TABLE5)
    mismatches = []
    for ds, rows in TABLE5.items():
        assert list(parsed[ds]) == list(rows), (ds, list(parsed[ds]))
        for method, (sym, asym, cells) in rows.items():
            p_sym, p_asym, p_cells = parsed[ds][method]
            for label, ours, theirs in [("LR, WD sym", sym, p_sym), ("LR, WD asym", asym, p_asym)] + [
                (setting, c, pc) for setting, c, pc in zip(SETTINGS, cells, p_cells)
            ]:
                if not same(ours, theirs):
                    mismatches.append(f"{ds} {method} {label}: test {ours} vs markdown {theirs}")
    assert mismatches == []

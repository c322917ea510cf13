"""tools/diagnose.py and tools/find_mislabeled.py on a real (small) NRD run over real
Fashion-MNIST shards with 40% load-time label noise, checked against independent
computations: a direct forward of the exported teacher, the noise function on the keys,
brute-force pairwise AUROC and precision@k from the CSV itself."""

import csv
import io
import json
import random
import subprocess
import sys
import tarfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from nrd_dist.config import load_config, to_dict
from nrd_dist.data.noise import apply_noise
from nrd_dist.data.shards import expand_urls
from nrd_dist.data.writer import ShardWriter, write_manifest
from nrd_dist.metrics import auroc
from nrd_dist.models import build_model
from nrd_dist.tools.export_model import export_state

VIEWS = 3


def brute_force_auroc(scores, positives) -> Fraction:
    """P(score of a positive > score of a negative) + 1/2 P(equal), over all pairs."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum(2 if a > b else 1 if a == b else 0 for a in pos for b in neg)
    return Fraction(wins, 2 * len(pos) * len(neg))


def read_shard_samples(pattern):
    """(keys, uint8 images [N, 28, 28], shard labels, members per key, shard per key) read
    straight from the tar files, not through the package's loader."""
    keys, images, labels, members, shard_of = [], [], [], {}, {}
    for url in expand_urls(pattern):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
                shard_of[key] = url
    for key, fields in members.items():
        keys.append(key)
        images.append(np.array(Image.open(io.BytesIO(fields["png"]))))
        labels.append(int(fields["cls"]))
    return keys, np.stack(images), np.array(labels), members, shard_of


def run_tool(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def truth(nrd_run, fmnist_small):
    keys, images, clean, members, shard_of = read_shard_samples(fmnist_small["train"])
    spec = to_dict(load_config(nrd_run / "config.yaml").data.noise)
    given = apply_noise(keys, clean, spec, 10)
    return {
        "keys": keys,
        "images": images,
        "clean": clean,
        "given": given,
        "members": members,
        "shard_of": shard_of,
        "by_key": {k: (int(g), int(c)) for k, g, c in zip(keys, given, clean)},
    }


@pytest.fixture(scope="module")
def diagnosed(nrd_run):
    out = nrd_run / "diag"
    proc = run_tool("diagnose", nrd_run, "--views", VIEWS, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc clean" in proc.stdout and "teacher  augmix_ensemble" in proc.stdout
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    return json.loads((out / "diagnose.json").read_text()), rows, out


@pytest.fixture(scope="module")
def ranked(nrd_run):
    out = nrd_run / "ranking" / "suspects.csv"
    proc = run_tool("find_mislabeled", nrd_run, "--views", VIEWS, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out.parent / "suspects.summary.json").read_text())


def test_auroc_is_the_pairwise_probability_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 301):
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        positives = rng.random(n) < 0.3
        positives[0], positives[1] = True, False
        assert auroc(scores, positives) == float(brute_force_auroc(scores, positives))
    assert auroc([1.0, 1.0, 1.0], [True, False, True]) == 0.5
    assert auroc([0.1, 0.9, 0.8], [False, True, True]) == 1.0
    assert auroc([0.9, 0.1], [False, True]) == 0.0
    assert np.isnan(auroc([0.3, 0.4], [False, False]))
    with pytest.raises(ValueError, match="finite"):
        auroc([0.3, float("nan")], [True, False])


@pytest.mark.slow
def test_diagnose_table1_counts_and_auroc(diagnosed, truth, nrd_run):
    report, rows, out = diagnosed
    mislabeled = truth["given"] != truth["clean"]
    assert report["samples"] == len(truth["keys"]) == 320
    assert report["counts"] == {"clean": int((~mislabeled).sum()), "mislabeled": int(mislabeled.sum())}
    assert 0 < report["counts"]["mislabeled"] < 320
    assert report["views"] == VIEWS and report["checkpoint"] == (nrd_run / "checkpoints" / "latest").read_text().strip()
    assert set(report["table1"]) == {"student", "teacher"}

    # Table 1, teacher, plain image, both subsets: a direct forward of the exported teacher.
    teacher = build_model("small_cnn", 10, 1)
    teacher.load_state_dict(export_state(nrd_run, "teacher"))
    images = (torch.from_numpy(truth["images"]).float()[:, None] / 255 - 0.2860) / 0.3530
    with torch.no_grad():
        predicted = teacher.eval()(images).argmax(1).numpy()
    correct = predicted == truth["clean"]
    table = report["table1"]["teacher"]["plain"]
    assert table["mislabeled"] == pytest.approx(100 * correct[mislabeled].mean(), abs=1e-9)
    assert table["clean"] == pytest.approx(100 * correct[~mislabeled].mean(), abs=1e-9)

    # samples.csv: one row per training sample, labels as the noise made them
    assert sorted(r["key"] for r in rows) == sorted(truth["keys"])
    for r in rows:
        assert (int(r["given_label"]), int(r["clean_label"])) == truth["by_key"][r["key"]]
        assert r["shard"] == truth["shard_of"][r["key"]]
    # AUROC of -log p(given label) equals the brute-force pairwise AUROC of the same scores
    positives = [r["mislabeled"] == "1" for r in rows]
    for model in ("student", "teacher"):
        for mode in ("plain", "augmix_ensemble"):
            value = report["auroc"][model][mode]
            assert 0 <= value <= 1
            scores = [-float(r[f"{model}_{mode}_log_p_given"]) for r in rows]
            assert value == float(brute_force_auroc(scores, positives))
            assert 0 <= report["calibration"][model][mode]["ece"] <= 1
            assert report["calibration"][model][mode]["count"] == 320
            ll = report["clean_label_log_likelihood"][model][mode]
            assert ll["clean"]["mean"] <= 0 and ll["mislabeled"]["mean"] <= 0

    for name in ("log_likelihood_student.png", "log_likelihood_teacher.png", "reliability.png"):
        assert name in report["plots"]
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            image.verify()


@pytest.mark.slow
def test_find_mislabeled_ranks_every_sample_with_its_precision(ranked, diagnosed, truth):
    rows, summary = ranked
    assert summary["model"] == "teacher" and summary["clean_labels"] is True
    assert summary["rows"] == len(rows) == 320
    assert sorted(r["key"] for r in rows) == sorted(truth["keys"])
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for r in rows:
        assert (int(r["given_label"]), int(r["clean_label"])) == truth["by_key"][r["key"]]
        assert r["shard"] == truth["shard_of"][r["key"]]
        assert 0 < float(r["teacher_confidence"]) <= 1
    hits = np.cumsum([r["given_label"] != r["clean_label"] for r in rows])
    n_mislabeled = int(hits[-1])
    assert summary["mislabeled"] == n_mislabeled == diagnosed[0]["counts"]["mislabeled"]
    at_k = {entry["k"]: entry for entry in summary["at_k"]}
    assert {name: entry["samples"] for name, entry in at_k.items()} == {
        "1%": 3,
        "5%": 16,
        "10%": 32,
        "number mislabeled": n_mislabeled,
    }
    for entry in at_k.values():
        k = entry["samples"]
        assert entry["precision"] == int(hits[k - 1]) / k
        assert entry["recall"] == int(hits[k - 1]) / n_mislabeled
    assert summary["auroc"] == float(brute_force_auroc(scores, [r["given_label"] != r["clean_label"] for r in rows]))
    assert summary["auroc"] == pytest.approx(diagnosed[0]["auroc"]["teacher"]["augmix_ensemble"], abs=1e-12)
    # The views are drawn per sample from (seed, key): find_mislabeled (views only) and
    # diagnose (plain image too) saw the same teacher views.
    log_p_given = {r["key"]: float(r["teacher_augmix_ensemble_log_p_given"]) for r in diagnosed[1]}
    for r in rows:
        assert float(r["score"]) == pytest.approx(-np.expm1(log_p_given[r["key"]]), rel=1e-12, abs=1e-15)


def strip_clean_labels(members, shard_of, out):
    """The training shards again, without .clean.cls (and with a manifest)."""
    out.mkdir(parents=True)
    writer = ShardWriter(out, "train", 107)
    for key in sorted(members, key=lambda k: (shard_of[k], k)):
        writer.write(key, {ext: data for ext, data in members[key].items() if ext != "clean.cls"})
    shards = writer.close()
    write_manifest(out, {"num_samples": len(members), "num_classes": 10, "shards": [vars(s) for s in shards]})
    return str(out / "train-{000000..000002}.tar")


@pytest.mark.slow
def test_shards_without_clean_labels(nrd_run, truth, ranked, tmp_path, capsys):
    from nrd_dist.diagnostics import diagnose, find_mislabeled

    stripped = strip_clean_labels(truth["members"], truth["shard_of"], tmp_path / "plain")
    # --noise none: the shards' own labels, so nothing is known to be clean
    csv_path = tmp_path / "out" / "ranking.csv"
    assert (
        find_mislabeled.main(
            [
                str(nrd_run),
                "--shards",
                stripped,
                "--noise",
                "none",
                "--views",
                str(VIEWS),
                "--workers",
                "2",
                "--out",
                str(csv_path),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "ranking.summary.json").read_text())
    assert summary["clean_labels"] is False and summary["clean_labels_known"] == 0
    assert "at_k" not in summary and "auroc" not in summary and "mislabeled" not in summary
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 320 and "clean_label" not in rows[0]
    assert rows[0].keys() == {"key", "shard", "given_label", "teacher_label", "teacher_confidence", "score"}
    assert all(int(r["given_label"]) == truth["by_key"][r["key"]][1] for r in rows)
    # the same teacher views as from the run's own shards read by one worker (the views
    # of a sample come from (seed, key); the teacher's prediction depends on the image only)
    before = {r["key"]: (r["teacher_label"], float(r["teacher_confidence"])) for r in ranked[0]}
    for r in rows:
        assert r["teacher_label"] == before[r["key"]][0]
        assert float(r["teacher_confidence"]) == pytest.approx(before[r["key"]][1], rel=1e-6)
    assert (
        find_mislabeled.main(
            [
                str(nrd_run),
                "--shards",
                stripped,
                "--noise",
                "none",
                "--views",
                "1",
                "--workers",
                "1",
                "--top",
                "5",
                "--out",
                str(tmp_path / "top.csv"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "top.csv").read_text().splitlines()) == 1 + 5

    # diagnose needs clean labels: a clear error naming the shard and the sample
    capsys.readouterr()
    assert (
        diagnose.main(
            [
                str(nrd_run),
                "--shards",
                stripped,
                "--noise",
                "none",
                "--views",
                "1",
                "--workers",
                "1",
                "--out",
                str(tmp_path / "diag"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: shard ") and "train-000000.tar" in err and "has no clean label" in err


@pytest.mark.slow
def test_diagnose_options(nrd_run, tmp_path):
    from nrd_dist.diagnostics import diagnose

    out = tmp_path / "student"
    assert (
        diagnose.main(
            [
                str(nrd_run),
                "--which",
                "student",
                "--max-samples",
                "50",
                "--views",
                "2",
                "--workers",
                "1",
                "--batch-size",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "diagnose.json").read_text())
    assert report["samples"] == 50 and sum(report["counts"].values()) == 50
    assert set(report["table1"]) == {"student"} and report["views"] == 2
    assert (out / "log_likelihood_student.png").exists() and not (out / "log_likelihood_teacher.png").exists()


def test_clear_errors_without_a_run_or_a_checkpoint(nrd_run, tmp_path, capsys):
    from nrd_dist.diagnostics import diagnose, find_mislabeled

    empty = tmp_path / "empty"
    empty.mkdir()
    assert diagnose.main([str(empty)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    (empty / "config.yaml").write_text((nrd_run / "config.yaml").read_text())
    for tool in (diagnose, find_mislabeled):
        assert tool.main([str(empty)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no checkpoint" in err and "Traceback" not in err


@pytest.mark.slow
def test_an_earlier_checkpoint_by_name_or_path(nrd_run, tmp_path, capsys):
    """--checkpoint picks one of the run's checkpoints (the 2-epoch run keeps one per epoch);
    the models differ between them, and an unknown name lists the complete ones."""
    from nrd_dist.diagnostics import find_mislabeled

    first, last = sorted(p for p in (nrd_run / "checkpoints").glob("step_*"))
    summaries = {}
    for label, choice in (("first", first.name), ("first by path", first), ("latest", None)):
        out = tmp_path / label.replace(" ", "_") / "m.csv"
        argv = [str(nrd_run), "--max-samples", "40", "--views", "2", "--workers", "0", "--out", str(out)]
        assert find_mislabeled.main(argv + ([] if choice is None else ["--checkpoint", str(choice)])) == 0
        with open(out) as f:
            scores = {row["key"]: float(row["score"]) for row in csv.DictReader(f)}
        summaries[label] = (json.loads(out.with_name("m.summary.json").read_text())["checkpoint"], scores)
    capsys.readouterr()
    assert summaries["first"][0] == summaries["first by path"][0] == first.name
    assert summaries["latest"][0] == last.name
    assert summaries["first"][1] == summaries["first by path"][1]
    assert summaries["first"][1].keys() == summaries["latest"][1].keys()
    assert summaries["first"][1] != summaries["latest"][1]

    assert find_mislabeled.main([str(nrd_run), "--checkpoint", "step_999999"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint step_999999: no such checkpoint" in err and f"complete ones: {first.name}, {last.name}" in err


def trainer_of(run_dir, out, *overrides):
    """A Trainer made from a finished run's config.yaml (writing into ``out``), holding the
    weights of the run's latest checkpoint: its in-run label-correction analysis is what
    the run would have reported at the end."""
    from nrd_dist.train import Trainer, build_engine, plan_data

    cfg = load_config(run_dir / "config.yaml", [f"run.output_dir={out}", "checkpoint.resume=never", *overrides])
    trainer = Trainer(cfg, plan_data(cfg), build_engine(cfg))
    for name, module in trainer.predictors().items():
        module.load_state_dict(export_state(run_dir, name))
    return trainer


def test_the_in_run_analysis_and_diagnose_report_the_same_table1(nrd_run, diagnosed, tmp_path):
    """One definition of Table 1: for the same checkpoint, samples (all 320), K and seed
    (run.seed), the run's own analysis gives diagnose's numbers exactly, whatever its
    number of workers; and it draws nothing from the RNGs training uses."""
    trainer = trainer_of(
        nrd_run, tmp_path / "again", "eval.label_correction_samples=320", f"eval.label_correction_views={VIEWS}"
    )
    try:
        tables = {}
        for workers in (0, 2):
            trainer.cfg.data.workers = workers
            rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
            tables[workers] = trainer.label_correction_analysis()
            assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
            assert (np.random.get_state()[1] == rngs[2]).all()
    finally:
        trainer.log.close()
    report = diagnosed[0]
    assert report["views"] == VIEWS and report["view_seed"] == load_config(nrd_run / "config.yaml").run.seed
    assert tables[0] == tables[2] == {**report["table1"], "counts": report["counts"]}
    assert report["table1"]["student"]["plain"] != report["table1"]["student"]["augmix_ensemble"]  # not vacuous

"""Every benchmark, one after the other, then BENCHMARKS.md (machine, date, versions,
commands, figures against the targets). Run it on a quiet machine: nothing else should
compete for the cores (the figures are ratios from one run, but absolute rates are not).

    .venv/bin/python benchmarks/run_all.py [--quick]

GPU figures are not measured here (this machine has none): the JSON lines that
``benchmarks/gpu_check.sh`` wrote on a lent GPU machine (``benchmarks/results/gpu_*``)
are included with the device they name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PY = sys.executable

# (name, command, what it measures)
STEP_TIMES = [
    ("small_cnn 28 px, batch 128", ["--arch", "small_cnn", "--image-size", "28", "--batch-size", "128"]),
    ("preact_resnet34 32 px, batch 32", ["--arch", "preact_resnet34", "--image-size", "32", "--batch-size", "32"]),
    (
        "resnet50 224 px, batch 8",
        ["--arch", "resnet50", "--image-size", "224", "--batch-size", "8", "--num-classes", "50"],
    ),
    (
        "small_cnn 28 px, batch 128, compiled",
        ["--arch", "small_cnn", "--image-size", "28", "--batch-size", "128", "--compile"],
    ),
]
TARGETS = {"nrd_over_ce": 1.40, "ema_over_ce_step": 0.03, "shards_over_imagefolder": 1.0, "s3_over_local": 0.8}


def run_json(cmd: list[str]) -> dict:
    """Run a benchmark script and parse the JSON object it prints."""
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.JSONDecoder().raw_decode(out[out.index("{") :])[0]


def scaling(quick: bool) -> dict:
    """Training samples/s of the demo config with 1 process and with 2 (torchrun, gloo)."""
    rates = {}
    steps = ["optim.epochs=1", "eval.label_correction_samples=0", "data.val={}", "checkpoint.every_steps=0"]
    if quick:
        steps.append("data.samples_per_epoch=2560")
    for procs in (1, 2):
        out = REPO / "runs" / f"bench_scaling_{procs}"
        launch = (
            [PY, "-m", "nrd_dist.train"]
            if procs == 1
            else [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nrd_dist.train"]
        )
        batch = 128 // procs  # the same global batch
        subprocess.run(
            [
                *launch,
                "configs/fmnist_demo.yaml",
                *steps,
                f"data.batch_size={batch}",
                f"run.output_dir={out}",
                "checkpoint.resume=never",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        rates[procs] = json.loads((out / "summary.json").read_text())["train_samples_per_s"]
    return {
        "one_process_samples_per_s": rates[1],
        "two_processes_samples_per_s": rates[2],
        "speedup": round(rates[2] / rates[1], 3),
        "efficiency": round(rates[2] / rates[1] / 2, 3),
    }


def persistent_workers(quick: bool) -> dict:
    """Training samples/s of the demo config with short epochs (where restarting the
    workers at every epoch shows most), persistent workers against restarted ones;
    alternating runs, the best of each kept."""
    epochs, per_epoch, repeats = (2, 1280, 1) if quick else (8, 2560, 2)
    common = [
        f"optim.epochs={epochs}",
        f"data.samples_per_epoch={per_epoch}",
        "data.val={}",
        "eval.label_correction_samples=0",
        "checkpoint.every_steps=0",
        "checkpoint.resume=never",
    ]
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for persistent in (True, False):
            out = REPO / "runs" / f"bench_persistent_{persistent}"
            subprocess.run(
                [
                    PY,
                    "-m",
                    "nrd_dist.train",
                    "configs/fmnist_demo.yaml",
                    *common,
                    f"data.persistent_workers={str(persistent).lower()}",
                    f"run.output_dir={out}",
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            rates[persistent].append(json.loads((out / "summary.json").read_text())["train_samples_per_s"])
    best = {k: max(v) for k, v in rates.items()}
    return {
        "epochs": epochs,
        "samples_per_epoch": per_epoch,
        "persistent_samples_per_s": round(best[True], 1),
        "restarted_samples_per_s": round(best[False], 1),
        "persistent_over_restarted": round(best[True] / best[False], 3),
    }


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def verdict(value: float, key: str, lower_is_better: bool) -> str:
    target = TARGETS[key]
    met = value <= target if lower_is_better else value >= target
    return f"{'met' if met else 'NOT met'} (target {'<=' if lower_is_better else '>='} {target})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for the record)")
    args = parser.parse_args()
    blocks = ["--blocks", "2", "--steps", "3", "--warmup", "1"] if args.quick else []
    lines = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/run_all.py` on {datetime.date.today()}: {machine()}.",
        "",
        "## NRD vs CE step time (data in memory, one process, alternating blocks)",
        "",
        "| model | device | source | precision | compiled | CE ms | NRD ms | NRD / CE | EMA ms | EMA / CE step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        {**run_json([PY, "benchmarks/step_time.py", *spec, *blocks]), "source": "this run"} for _, spec in STEP_TIMES
    ]
    for path in sorted(RESULTS.glob("gpu_step_time_*.jsonl")):
        rows += [
            {**json.loads(line), "source": f"`{path.relative_to(REPO)}`"}
            for line in path.read_text().splitlines()
            if line.strip()
        ]
    for r in rows:
        lines.append(
            f"| {r['arch']} {r['image_size']} px, batch {r['batch_size']} | {r['device']} | {r['source']} "
            f"| {r['precision']} | {'yes' if r.get('compiled') else 'no'} "
            f"| {r['ce_step_ms']} | {r['nrd_step_ms']} | {r['nrd_over_ce']} "
            f"({verdict(r['nrd_over_ce'], 'nrd_over_ce', True)}) | {r['ema_update_ms']} | "
            f"{100 * r['ema_over_ce_step']:.1f}% |"
        )
    formats = sorted({"channels_last" if r.get("channels_last") else "contiguous" for r in rows})
    lines += [
        "",
        "EMA target (<= 3% of a CE step) applies to ResNet-50. Memory format: "
        f"{' and '.join(formats)} (what a training run chooses).",
        "",
    ]
    for path in sorted(RESULTS.glob("gpu_demo_throughput_*.jsonl")):
        lines += [
            f"Demo-config training samples/s on a GPU by loader workers (`{path.relative_to(REPO)}`; "
            "the loader's rate: the GPU step alone is far faster):",
            "",
            "| workers | persistent | samples/s |",
            "|---|---|---|",
        ]
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                lines.append(f"| {r['workers']} | {'yes' if r['persistent'] else 'no'} | {r['train_samples_per_s']} |")
        lines.append("")
    lines += ["## Loader (samples/s per worker, student + AugMix teacher views)", ""]
    loader = run_json([PY, "benchmarks/loader.py", *(["--repeats", "1", "--samples", "1024"] if args.quick else [])])
    lines += [
        f"```json\n{json.dumps(loader, indent=1)}\n```",
        "",
        f"Shards / ImageFolder: {loader['shards_over_imagefolder']} "
        f"({verdict(loader['shards_over_imagefolder'], 'shards_over_imagefolder', False)}).",
        "",
        "## Streaming: loopback S3 server (moto) vs local disk",
        "",
    ]
    stream = run_json([PY, "benchmarks/streaming.py", *(["--repeats", "1"] if args.quick else [])])
    lines += [
        f"```json\n{json.dumps(stream, indent=1)}\n```",
        "",
        f"S3 / local: {stream['s3_over_local']} ({verdict(stream['s3_over_local'], 's3_over_local', False)}).",
        "",
        "## 1 vs 2 processes (gloo, demo config, same global batch)",
        "",
    ]
    scale = scaling(args.quick)
    lines += [
        f"```json\n{json.dumps(scale, indent=1)}\n```",
        "",
        "## Persistent workers (demo config, short epochs)",
        "",
    ]
    persist = persistent_workers(args.quick)
    lines += [
        f"```json\n{json.dumps(persist, indent=1)}\n```",
        "",
        "## Commands",
        "",
        "```",
        *[f"python benchmarks/step_time.py {' '.join(spec)}" for _, spec in STEP_TIMES],
        "python benchmarks/loader.py",
        "python benchmarks/streaming.py",
        "bash benchmarks/gpu_check.sh   # on a GPU machine",
        "```",
        "",
    ]
    (REPO / "BENCHMARKS.md").write_text("\n".join(lines))
    print("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The config reference: every key, its default and its meaning, as a markdown table.

``python -m nrd_dist.config_reference`` prints it; the README embeds the output between
markers and a test checks that both agree with the schema, so the docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import typing

from nrd_dist.config import Config

HELP = {
    "run.output_dir": "run folder: config.yaml, metrics.jsonl, tensorboard/, plots, summary.json",
    "run.seed": "seed of everything: init, data order, augmentations (with the epoch, rank, worker)",
    "data.train": "training shards: URL, brace pattern (`train-{000000..000011}.tar`), glob or list",
    "data.val": "clean validation sets: name -> shard URL/pattern; each is evaluated",
    "data.num_classes": "number of classes; labels must lie in [0, num_classes)",
    "data.batch_size": "samples per step per rank (the global batch is this x world size)",
    "data.workers": "DataLoader worker processes per rank",
    "data.persistent_workers": "keep the training loader's worker processes between epochs (the batches are the same either way; false restarts them each epoch)",
    "data.shuffle_buffer": "samples per worker held in the seeded shuffle buffer (0: shard order only)",
    "data.samples_per_epoch": "samples in one epoch; null: counted from the manifest.json beside the shards",
    "data.sampling": "epoch (a seeded shard permutation dealt to rank x worker slots, each sample about "
                     "once per epoch) or resampled (seeded shard draws with replacement, for very large sets)",
    "data.noise.type": "load-time label noise: none, symmetric (over all classes), symmetric_exclusive, "
                       "asymmetric (each sample's clean label flipped with probability rate), "
                       "asymmetric_sequential (the GJS/NRD code's class-by-class in-place relabelling, map "
                       "pairs in order: cifar10 asym-40 mislabels cats at 0.24, all at 0.184), matrix",
    "data.noise.rate": "noise rate eta in [0, 1]",
    "data.noise.seed": "noise seed; with the sample key and clean label it fixes each noisy label",
    "data.noise.map": "asymmetric(_sequential): cifar10, cifar100, fmnist (its confusable pairs both ways) or "
                      "an explicit {from: to} class map (asymmetric_sequential: pairs applied in this order)",
    "data.noise.matrix": "matrix: a row-stochastic num_classes x num_classes transition matrix",
    "data.augment.policy": "view policy: fmnist (28 px grey), cifar (32 px), imagenet (WebVision/ImageNet)",
    "data.augment.image_size": "crop size of every view in pixels; null: 28 / 32 / 224 by policy",
    "data.augment.resize_size": "eval resize before the centre crop (imagenet policy)",
    "data.augment.cutout": "Cutout square side in pixels (cifar student view); 0 disables it",
    "data.storage": "options for remote shards (s3://, gs://, http(s)://): endpoint_url, profile, region, "
                    "anonymous, or any fsspec option; credentials from the AWS environment, never logged",
    "data.retries": "retries of a transient storage error (connection, timeout, 5xx) while opening or reading "
                    "a shard; a read resumes at the byte it reached",
    "data.retry_backoff_s": "seconds before the first retry; doubled for each further one",
    "data.max_bad_fraction": "corrupt samples and truncated shards are skipped, counted and logged (key, shard "
                             "URL); the run stops once they exceed this fraction of the samples read (at least "
                             "one epoch's worth)",
    "model.arch": "small_cnn, preact_resnet18, preact_resnet34 or resnet50 (random init)",
    "model.in_channels": "input channels: 1 for grey images, 3 for RGB",
    "loss.name": "nrd, ce_nrd, ce, bs, ls, sce, gce, nce_rce, js or gjs",
    "loss.pi": "JSD weights on the simplex: nrd/ce_nrd [label, student, teacher]; js/gjs [label, views...]",
    "loss.scale": "multiply by the GJS scale -1/((1-pi1) log(1-pi1)); null: the loss's default",
    "loss.q": "gce: q in (0, 1] (1: MAE-like, -> 0: CE)",
    "loss.alpha": "sce, nce_rce: weight of the first term",
    "loss.beta": "sce, nce_rce: weight of the reverse CE; bs: weight of the given label",
    "loss.epsilon": "ls: label smoothing",
    "teacher.decay": "EMA decay beta (paper: 0.99)",
    "teacher.warmup_steps": "the first updates copy the student instead of averaging (a ramp starts after them)",
    "teacher.every": "update the teacher every this many optimizer steps",
    "teacher.bn": "teacher BatchNorm: eval (running statistics) or batch (batch statistics)",
    "teacher.verify_every": "cross-rank teacher checksum every this many steps (0: never)",
    "teacher.ramp": "decay ramp after the warm-up copies, t = updates since them: none (constant decay, the "
                    "paper), mean_teacher (min(decay, 1 - 1/(t+1)), Tarvainen & Valpola) or power "
                    "(min(decay, 1 - (1 + t/ramp_gamma)^-ramp_power), ema_pytorch / timm ModelEmaV3)",
    "teacher.ramp_power": "power ramp exponent (2/3 as ema_pytorch; timm also uses 3/4)",
    "teacher.ramp_gamma": "power ramp time scale: ema_pytorch's inv_gamma (divide by its update_every), "
                          "timm's warmup_gamma",
    "optim.name": "optimizer (SGD)",
    "optim.lr": "peak learning rate",
    "optim.momentum": "SGD momentum",
    "optim.nesterov": "Nesterov momentum",
    "optim.weight_decay": "L2 weight decay",
    "optim.epochs": "training epochs",
    "optim.schedule": "multistep, cosine, step_gamma (gamma per epoch) or constant",
    "optim.milestones": "multistep: epochs (>= 1) or fractions of the run (< 1)",
    "optim.gamma": "decay factor at each milestone, or per epoch for step_gamma",
    "optim.warmup_epochs": "linear learning-rate warm-up, in epochs (fractions allowed)",
    "optim.clip_grad_norm": "clip the global gradient norm to this value; null: no clipping",
    "engine.backend": "ddp (torchrun or one process) or deepspeed",
    "engine.zero_stage": "DeepSpeed ZeRO stage 0-3",
    "engine.precision": "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU, with loss scaling)",
    "engine.sync_bn": "SyncBatchNorm for the student under DDP (CUDA only, as in torch)",
    "engine.grad_accum_steps": "gradient accumulation steps (deepspeed)",
    "engine.timeout_s": "collective timeout in seconds: a dead or stuck rank fails the job instead of hanging it",
    "engine.compile": "torch.compile the student, the teacher and the loss (inductor; the first steps pay the compilation; backend ddp or one process)",
    "engine.compile_mode": "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs",
    "engine.ddp_bucket_cap_mb": "DDP gradient bucket size in MiB (torch's default 25): larger buckets mean fewer all-reduce calls, smaller ones start overlapping with the backward pass earlier (backend ddp with more than one process)",
    "train.nonfinite": "a non-finite loss: stop (naming the step and the batch's sample keys) or skip the step",
    "train.nonfinite_budget": "skip: steps that may be skipped (counted and logged) before the run stops",
    "eval.every_epochs": "evaluate on data.val every this many epochs (and after the last)",
    "eval.batch_size": "evaluation batch per rank; null: 2 x data.batch_size",
    "eval.label_correction_samples": "training samples in the final label-correction analysis (0: skip)",
    "eval.noisy_val": "names of data.val sets whose labels get data.noise too (e.g. a held-out part of the "
                      "training set): accuracy on noisy labels, for choosing hyperparameters without clean labels",
    "eval.label_correction_views": "K AugMix teacher views averaged per sample in that analysis",
    "log.every_steps": "log line, metrics.jsonl record and TensorBoard scalars every this many steps",
    "checkpoint.every_steps": "checkpoint every this many steps (0: epoch ends only); always at epoch ends",
    "checkpoint.keep": "complete checkpoints kept (the newest)",
    "checkpoint.zero_portable": "ZeRO-1/2/3: also save the full fp32 weights and optimizer state gathered on rank 0, so "
                                "the run can resume on a different number of ranks (elastic); off skips the gather "
                                "for models too large for one rank's memory",
    "checkpoint.resume": "auto (continue from the latest checkpoint in run.output_dir), never, or force "
                         "(resume even if model, loss or data changed)",
}


def leaf_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, default) of every leaf of the schema, in declaration order."""
    out = []
    instance = cls()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(leaf_keys(hint, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", getattr(instance, f.name)))
    return out


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value in ({}, [], ""):
        return {dict: "{}", list: "[]", str: '""'}[type(value)]
    return str(value)


def render_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default in leaf_keys():
        lines.append(f"| `{key}` | `{_show(default)}` | {HELP[key]} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def update_readme(path: str) -> None:
    """Rewrite the table between the README's markers."""
    from pathlib import Path

    text = Path(path).read_text()
    head, rest = text.split(START, 1)
    Path(path).write_text(head + START + render_markdown() + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:  # python -m nrd_dist.config_reference --update README.md
        update_readme(sys.argv[2])
    else:
        print(render_markdown(), end="")

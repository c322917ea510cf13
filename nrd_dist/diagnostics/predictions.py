"""One pass of a run's student and/or teacher over training shards, kept per sample.

Each sample is read as the run read it (``data.noise`` applied at load time unless
``noise=False``), then predicted on the plain image (the eval transform) and on the
ensemble of K AugMix teacher views (the ``teacher`` transform of the run's augmentation
policy). The images, the ensemble (``p_views = mean_k softmax(f(view_k))``, in log
space) and the prediction (the argmax) are those of the run's own label-correction
analysis: :mod:`nrd_dist.evaluate` defines them once for both.
What is kept is O(N), never O(N x classes): per model and mode the log-probability of
the given and of the clean label, the argmax and its probability, and a
:class:`~nrd_dist.metrics.ClassificationMeter` against the clean labels (ECE).

Determinism: the views of a sample are drawn under a torch seed made from
``(seed, sample key)`` (``ShardStream(per_sample_seed=True)``), so they are the same
whatever the number of DataLoader workers, the batch size, the shards given,
``max_samples``, and whether the plain image is predicted too; ``diagnose``,
``find_mislabeled`` and the run's in-run analysis (seed ``run.seed``) therefore see the
same views.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nrd_dist.config import Config, load_config
from nrd_dist.data import storage
from nrd_dist.data.augment import build_policy
from nrd_dist.data.bad_data import bad_reports
from nrd_dist.data.shards import ShardError, ShardStream, StreamSpec, expand_urls, make_loader, manifest_counts
from nrd_dist.evaluate import PLAIN, VIEWS, LabelCorrectionViews, class_log_probs, view_ensemble
from nrd_dist.losses import LOSSES
from nrd_dist.metrics import ClassificationMeter
from nrd_dist.models import build_model
from nrd_dist.tools.export_model import CHECKPOINT_HELP, export_state, resolve_checkpoint

REDACTED = "***"  # what config.yaml holds in place of a storage secret


# ----------------------------------------------------------------------------- the run


@dataclass
class RunModels:
    """A run's resolved config and the models of one of its checkpoints, in eval mode."""

    run_dir: Path
    cfg: Config
    checkpoint: Path
    models: dict[str, nn.Module]
    device: torch.device


def has_teacher(cfg: Config) -> bool:
    """Whether the run's loss keeps an EMA teacher (baselines such as ``ce`` do not)."""
    return LOSSES[cfg.loss.name].needs_teacher


def resolve_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_run(run_dir: Path, which: str, device: torch.device, checkpoint: Optional[str] = None) -> RunModels:
    """Models of the run's latest complete checkpoint, or of the one ``checkpoint`` names.

    ``which``: ``student``, ``teacher``, ``both`` (the student, and the teacher if the
    run has one) or ``auto`` (the teacher if the run has one, else the student).
    Raises FileNotFoundError (no run directory, no checkpoint) or ValueError (the run
    keeps no teacher and ``which`` is ``teacher``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    # Resolved once: a run still writing checkpoints must not give the student and the
    # teacher from different steps.
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    teacher = has_teacher(cfg)
    if which == "teacher" and not teacher:
        raise ValueError(f"{run_dir}: loss {cfg.loss.name!r} keeps no teacher; use --which student")
    names = {
        "student": ["student"],
        "teacher": ["teacher"],
        "both": ["student", "teacher"] if teacher else ["student"],
        "auto": ["teacher" if teacher else "student"],
    }[which]
    models = {}
    for name in names:
        model = build_model(cfg.model.arch, cfg.data.num_classes, cfg.model.in_channels)
        model.load_state_dict(export_state(run_dir, name, checkpoint))
        models[name] = model.to(device).eval()
    return RunModels(run_dir, cfg, checkpoint, models, device)


def _without_redacted(options: Any) -> Any:
    """``data.storage`` minus the secrets config.yaml holds as ``***``: credentials then
    come from the environment, as they would for the run."""
    if isinstance(options, dict):
        return {k: _without_redacted(v) for k, v in options.items() if v != REDACTED}
    return options


# ----------------------------------------------------------------------------- the data


def sample_stream(run: RunModels, urls: Sequence[str], views: int, plain: bool, noise: bool, seed: int) -> ShardStream:
    """Every sample of ``urls`` once, in a fixed order, each carrying its shard URL, as
    :class:`~nrd_dist.evaluate.LabelCorrectionViews` (K views, and the plain image with
    ``plain``) drawn from ``(seed, key)``: the images of the run's in-run analysis.

    ``noise``: apply the run's load-time ``data.noise`` (the labels the run trained on).
    """
    cfg = run.cfg
    aug = cfg.data.augment
    policy = build_policy(aug.policy, aug.image_size, aug.resize_size, aug.cutout)
    spec = StreamSpec.from_config(cfg, load_time_noise=noise, expected_counts=manifest_counts(list(urls)))
    spec = dataclasses.replace(spec, seed=seed, storage_options=_without_redacted(cfg.data.storage))
    return ShardStream(
        urls, LabelCorrectionViews(policy, views, plain), spec, train=False, per_sample_seed=True, with_shard=True
    )


# ----------------------------------------------------------------------------- the outputs


@dataclass
class ModeOutputs:
    """One model in one mode (plain image or K-view ensemble), per sample (float64/int64 [N])."""

    log_p_given: np.ndarray  # log p(given label)
    log_p_clean: np.ndarray  # log p(clean label); NaN where the clean label is unknown
    prediction: np.ndarray  # argmax class
    confidence: np.ndarray  # its probability
    meter: ClassificationMeter  # top-1/top-5/ECE against the clean labels (known ones only)


@dataclass
class SamplePredictions:
    """Per-sample labels and model outputs of one pass; arrays are aligned with ``keys``."""

    keys: list[str]
    shards: list[str]
    given: np.ndarray  # int64 [N]: the training label as the run saw it
    clean: np.ndarray  # int64 [N]: the clean label, -1 where unknown
    outputs: dict[str, dict[str, ModeOutputs]]  # model -> mode -> outputs
    views: int
    seed: int
    noise: Optional[dict]  # the load-time noise applied, or None

    @property
    def has_clean_labels(self) -> bool:
        return len(self.clean) > 0 and bool((self.clean >= 0).all())

    @property
    def mislabeled(self) -> np.ndarray:
        """bool [N]: the training label differs from the (known) clean label."""
        return (self.clean >= 0) & (self.given != self.clean)


@dataclass
class _ModeAccumulator:
    """Per-batch pieces of one :class:`ModeOutputs`."""

    parts: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {"log_p_given": [], "log_p_clean": [], "prediction": [], "confidence": []}
    )
    meter: ClassificationMeter = field(default_factory=ClassificationMeter)

    def add(self, log_probs: torch.Tensor, given: torch.Tensor, clean: torch.Tensor) -> None:
        """``log_probs``: float [B, classes]; ``given``, ``clean``: int64 [B] (clean -1: unknown)."""
        known = clean >= 0
        log_probs = log_probs.double()
        self.parts["log_p_given"].append(log_probs.gather(1, given[:, None])[:, 0])
        at_clean = log_probs.gather(1, clean.clamp_min(0)[:, None])[:, 0]
        self.parts["log_p_clean"].append(torch.where(known, at_clean, torch.full_like(at_clean, math.nan)))
        best, prediction = log_probs.max(1)
        self.parts["prediction"].append(prediction)
        self.parts["confidence"].append(best.exp())
        if known.any():
            self.meter.update(log_probs[known].exp(), clean[known])

    def result(self) -> ModeOutputs:
        arrays = {name: torch.cat(parts).numpy() if parts else np.zeros(0) for name, parts in self.parts.items()}
        arrays["prediction"] = arrays["prediction"].astype(np.int64)
        return ModeOutputs(meter=self.meter, **arrays)


# ----------------------------------------------------------------------------- the pass


def _log_probs(model: nn.Module, images: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """:func:`~nrd_dist.evaluate.class_log_probs` ``[N, classes]`` (fp32, on the CPU) of
    ``images`` ``[N, C, S, S]``, ``chunk`` images per forward."""
    return torch.cat([class_log_probs(model(part.to(device, non_blocking=True))).cpu() for part in images.split(chunk)])


def _predict_batch(
    run: RunModels, batch: dict[str, Any], accumulators: dict[str, dict[str, _ModeAccumulator]], chunk: int
) -> None:
    """Every model of ``run`` on one batch: the plain image (when the batch has it) and
    the K-view ensemble (:func:`~nrd_dist.evaluate.view_ensemble`)."""
    images, given, clean = batch["image"], batch["label"], batch["clean_label"]
    b, k = images["views"].shape[:2]
    for name, model in run.models.items():
        if PLAIN in accumulators[name]:
            accumulators[name][PLAIN].add(_log_probs(model, images["plain"], run.device, chunk), given, clean)
        per_view = _log_probs(model, images["views"].flatten(0, 1), run.device, chunk).reshape(b, k, -1)
        accumulators[name][VIEWS].add(view_ensemble(per_view), given, clean)


def _first(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch (nested dicts of tensors and lists)."""
    return {k: _first(v, n) if isinstance(v, dict) else v[:n] for k, v in batch.items()}


def _check_clean_labels(batch: dict[str, Any]) -> None:
    """ShardError naming the shard and the sample, at the first one without a clean label."""
    missing = (batch["clean_label"] < 0).nonzero()
    if len(missing):
        i = int(missing[0])
        raise ShardError(
            f"shard {batch['shard'][i]!r}: sample {batch['key'][i]!r} has no clean label "
            f"(.clean.cls); this needs training shards with clean labels (made noisy by "
            f"tools/inject_noise.py, or clean shards and a run with load-time data.noise)"
        )


def _progress_bar(stream: ShardStream, max_samples: Optional[int], progress: bool):
    """A tqdm bar on stderr (only when it is a terminal), sized from the manifests."""
    from tqdm import tqdm

    total = sum(stream.spec.expected_counts.get(url, 0) for url in stream.urls) or None
    if max_samples is not None:
        total = min(total or max_samples, max_samples)
    return tqdm(
        total=total,
        desc="predicting",
        unit="sample",
        dynamic_ncols=True,
        leave=False,
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
        mininterval=0.5,
    )


@torch.inference_mode()
def predict_samples(
    run: RunModels,
    urls: Sequence[str],
    views: int,
    plain: bool = True,
    noise: bool = True,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    max_samples: Optional[int] = None,
    require_clean: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
) -> SamplePredictions:
    """Predict every sample of ``urls`` (shard URLs, expanded) with every model of ``run``.

    ``views``: K >= 1 AugMix views per sample; ``plain``: also predict the eval image;
    ``noise``: apply the run's load-time ``data.noise`` (the labels the run trained on);
    ``seed``: of the views (default ``run.seed``); ``batch_size``: samples per batch and
    images per forward (default ``eval.batch_size`` or 2 x ``data.batch_size``);
    ``workers``: DataLoader workers (default ``data.workers``); ``max_samples``: stop
    after that many (the first in the stream's fixed order); ``require_clean``: raise
    ShardError, naming the shard and sample, at the first sample without a clean label.
    Progress goes to a tqdm bar when stderr is a terminal; skipped bad samples to ``warn``.
    """
    if views < 1:
        raise ValueError(f"--views: must be >= 1, got {views}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples: must be >= 1, got {max_samples}")
    cfg = run.cfg
    seed = cfg.run.seed if seed is None else seed
    batch_size = batch_size or cfg.eval.batch_size or 2 * cfg.data.batch_size
    stream = sample_stream(run, urls, views, plain, noise, seed)
    loader = make_loader(
        stream,
        batch_size,
        cfg.data.workers if workers is None else workers,
        drop_last=False,
        pin_memory=run.device.type == "cuda",
    )
    modes = ([PLAIN] if plain else []) + [VIEWS]
    accumulators = {name: {mode: _ModeAccumulator() for mode in modes} for name in run.models}
    keys: list[str] = []
    shards: list[str] = []
    given: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []
    bar = _progress_bar(stream, max_samples, progress)
    for batch in loader:
        for report in bad_reports(batch):
            warn(f"skipped {report}")
        if max_samples is not None:
            batch = _first(batch, max_samples - len(keys))
        if require_clean:
            _check_clean_labels(batch)
        _predict_batch(run, batch, accumulators, batch_size)
        keys += batch["key"]
        shards += batch["shard"]
        given.append(batch["label"])
        clean.append(batch["clean_label"])
        bar.update(len(batch["key"]))
        if max_samples is not None and len(keys) >= max_samples:
            break
    bar.close()
    if not keys:
        raise ShardError(f"no samples read from {list(urls)!r}")
    outputs = {name: {mode: acc.result() for mode, acc in modes.items()} for name, modes in accumulators.items()}
    return SamplePredictions(
        keys, shards, torch.cat(given).numpy(), torch.cat(clean).numpy(), outputs, views, seed, stream.spec.noise
    )


# ----------------------------------------------------------------------------- the command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments both tools share."""
    parser.add_argument("run_dir", type=Path, help="a run's output_dir (config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", default=None, metavar="NAME", help=CHECKPOINT_HELP)
    parser.add_argument("--views", type=int, default=10, metavar="K", help="AugMix teacher views per sample (10)")
    parser.add_argument(
        "--shards",
        default=None,
        metavar="URL",
        help="training shards: URL, brace pattern or glob (default: the run's data.train)",
    )
    parser.add_argument(
        "--noise",
        choices=["run", "none"],
        default="run",
        help="labels: as the run saw them, its load-time data.noise applied (run, the default), "
        "or the shards' own .cls labels (none)",
    )
    parser.add_argument(
        "--max-samples", type=int, default=None, metavar="N", help="only the first N samples (default: all)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="samples per batch and images per forward (default: eval.batch_size or 2 x data.batch_size)",
    )
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.workers)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the views, drawn per sample from (seed, key) (default: run.seed)",
    )


def predict_from_args(
    args: argparse.Namespace, which: str, plain: bool, require_clean: bool
) -> tuple[RunModels, list[str], SamplePredictions]:
    """Load the run named by ``args`` and run :func:`predict_samples` over its shards."""
    run = load_run(args.run_dir, which, resolve_device(args.device), args.checkpoint)
    data = run.cfg.data
    storage.configure(_without_redacted(data.storage), data.retries, data.retry_backoff_s)
    urls = expand_urls(args.shards if args.shards else data.train, "--shards" if args.shards else "data.train")
    predictions = predict_samples(
        run,
        urls,
        args.views,
        plain=plain,
        noise=args.noise == "run",
        seed=args.seed,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
        require_clean=require_clean,
    )
    return run, urls, predictions


def describe(run: RunModels, urls: Sequence[str], predictions: SamplePredictions) -> dict[str, Any]:
    """What a pass was over, for the tools' JSON outputs."""
    return {
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "shards": list(urls),
        "samples": len(predictions.keys),
        "views": predictions.views,
        "view_seed": predictions.seed,
        "load_time_noise": predictions.noise,
        "device": str(run.device),
    }


def finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN: an undefined metric (no sample to compute it on) is null."""
    return float(value) if math.isfinite(value) else None


def run_tool(body: Callable[[], int]) -> int:
    """A tool's error policy: a problem with the run or its data is one ``error:`` line on
    stderr (storage secrets redacted) and exit status 2; anything else is a bug and
    keeps its traceback. (ConfigError, ShardError and StorageError are ValueErrors.)"""
    try:
        return body()
    except (FileNotFoundError, ValueError) as err:
        print(storage.redact(f"error: {err}"), file=sys.stderr)
        return 2

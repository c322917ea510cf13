"""Typed run configuration: dataclasses loaded from YAML plus dotted overrides.

One source of truth for every setting (docs/design.md section 4): the training entry
point, the tools and the tests all read a :class:`Config`. Loading is strict: an unknown
key, a value of the wrong type or an invalid value raises :class:`ConfigError` naming the
dotted key path (``loss.pi``), with the closest valid key suggested for typos, before any
expensive work starts.

Each key is declared once, with its help (:func:`setting`); the reference table in the
README is generated from the declarations (``nrd_dist.config_reference``). The settings
of the losses, the label noise and the augmentation policies are judged by those
components themselves, which the config asks (:func:`_judge`) so that every range lives in
one place.

    cfg = load_config("configs/fmnist_demo.yaml", ["optim.epochs=2", "loss.pi=[0.1,0.8,0.1]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import yaml

from nrd_dist.engines.backends import check_engine_settings


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key path."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; every ML config writes learning rates
    that way, so exponent floats without a dot resolve to float here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- help

# A key's help: its text, or a function returning it where the text quotes a component's
# own table (loss names, policy sizes), so that the config does not import the component
# (and torch) until the help is read.
HelpText = Union[str, Callable[[], str]]


def setting(default: Any = MISSING, *, help: HelpText, default_factory: Any = MISSING) -> Any:
    """A config key and its help: the one place the key is explained."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    """The help of a key declared with :func:`setting`."""
    if "help" not in f.metadata:
        raise KeyError(f"config key {f.name!r} has no help: declare it with setting(..., help=...)")
    text = f.metadata["help"]
    return text() if callable(text) else text


def _one_of(names: typing.Iterable[str]) -> str:
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


def _loss_names() -> str:
    from nrd_dist.losses import LOSSES

    return _one_of(LOSSES)


def _model_names() -> str:
    from nrd_dist.models import MODELS

    return f"{_one_of(MODELS)} (random init)"


def _noise_map_help() -> str:
    from nrd_dist.data.noise import NAMED_MAPS

    return (
        f"asymmetric(_sequential): a named class map ({', '.join(NAMED_MAPS)}: nrd_dist.data.noise describes them) "
        "or an explicit {from: to} one; asymmetric_sequential applies its pairs in this order"
    )


def _image_size_help() -> str:
    from nrd_dist.data.augment import NATIVE_IMAGE_SIZE

    sizes = ", ".join(f"{policy} {size}" for policy, size in NATIVE_IMAGE_SIZE.items())
    return f"crop size of every view in pixels; null: the policy's native size ({sizes})"


# ----------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    output_dir: str = setting(
        "runs/default", help="run folder: config.yaml, metrics.jsonl, tensorboard/, plots, summary.json"
    )
    seed: int = setting(0, help="seed of everything: init, data order, augmentations (with the epoch, rank, worker)")


@dataclass
class NoiseConfig:
    """Load-time label noise (docs/design.md section 1, "Synthetic noise"), judged by
    nrd_dist.data.noise (with data.num_classes, so :class:`DataConfig` asks it)."""

    type: Literal["none", "symmetric", "symmetric_exclusive", "asymmetric", "asymmetric_sequential", "matrix"] = (
        setting(
            "none",
            help="load-time label noise: none, symmetric (over all classes), symmetric_exclusive, asymmetric (each "
            "sample's clean label flipped with probability rate), asymmetric_sequential (the GJS/NRD code's "
            "class-by-class in-place relabelling, map pairs in order: cifar10 asym-40 mislabels cats at 0.24, all at "
            "0.184), matrix",
        )
    )
    rate: float = setting(0.0, help="noise rate eta in [0, 1]")
    seed: int = setting(0, help="noise seed; with the sample key and clean label it fixes each noisy label")
    map: Optional[Union[str, dict[int, int]]] = setting(None, help=_noise_map_help)
    matrix: Optional[list[list[float]]] = setting(
        None, help="matrix: a row-stochastic num_classes x num_classes transition matrix"
    )


@dataclass
class AugmentConfig:
    """Named augmentation policies, judged by nrd_dist.data.augment (:class:`DataConfig` asks it)."""

    policy: Literal["fmnist", "cifar", "imagenet"] = setting(
        "fmnist", help="view policy: fmnist (Fashion-MNIST, grey), cifar (CIFAR-10/100), imagenet (WebVision/ImageNet)"
    )
    image_size: Optional[int] = setting(None, help=_image_size_help)
    resize_size: int = setting(256, help="eval resize before the centre crop (imagenet policy)")
    cutout: int = setting(16, help="Cutout square side in pixels (cifar student view); 0 disables it")


@dataclass
class DataConfig:
    train: Union[str, list[str]] = setting(
        "", help="training shards: URL, brace pattern (`train-{000000..000011}.tar`), glob or list"
    )
    val: dict[str, str] = setting(
        default_factory=dict, help="clean validation sets: name -> shard URL/pattern; each is evaluated"
    )
    num_classes: int = setting(10, help="number of classes; labels must lie in [0, num_classes)")
    batch_size: int = setting(128, help="samples per step per rank (the global batch is this x world size)")
    workers: int = setting(2, help="DataLoader worker processes per rank")
    persistent_workers: bool = setting(
        True,
        help="keep the training loader's worker processes between epochs (the batches are the same either way; "
        "false restarts them each epoch)",
    )
    shuffle_buffer: int = setting(
        2000, help="samples per worker held in the seeded shuffle buffer (0: shard order only)"
    )
    samples_per_epoch: Optional[int] = setting(
        None, help="samples in one epoch; null: counted from the manifest.json beside the shards"
    )
    sampling: Literal["epoch", "resampled"] = setting(
        "epoch",
        help="epoch (a seeded shard permutation dealt to rank x worker slots, each sample about once per epoch) or "
        "resampled (seeded shard draws with replacement, for very large sets); see nrd_dist.data.shards",
    )
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    storage: dict[str, Any] = setting(
        default_factory=dict,
        help="options for remote shards (s3://, gs://, http(s)://): endpoint_url, profile, region, anonymous, or "
        "any fsspec option; credentials from the AWS environment, never logged",
    )
    retries: int = setting(
        4,
        help="retries of a transient storage error (connection, timeout, 5xx) while opening or reading a shard; a "
        "read resumes at the byte it reached",
    )
    retry_backoff_s: float = setting(0.5, help="seconds before the first retry; doubled for each further one")
    max_bad_fraction: float = setting(
        0.001,
        help="corrupt samples and truncated shards are skipped, counted and logged (key, shard URL); the run stops "
        "once they exceed this fraction of the samples read (at least one epoch's worth)",
    )

    def validate(self, path: str) -> None:
        _positive(f"{path}.num_classes", self.num_classes)
        _positive(f"{path}.batch_size", self.batch_size)
        if self.workers < 0:
            raise ConfigError(f"{path}.workers: must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{path}.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.samples_per_epoch is not None:
            _positive(f"{path}.samples_per_epoch", self.samples_per_epoch)
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ConfigError(
                f"{path}.retries / {path}.retry_backoff_s: must be >= 0, got {self.retries} / {self.retry_backoff_s}"
            )
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{path}.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        self.judge_components(path)

    def judge_components(self, path: str) -> None:
        """The noise spec and the augmentation policy, each checked by its own module.

        Here rather than in their sections: a noise map or matrix needs data.num_classes.
        Both modules name the field as "noise.<field>" / "augment.<field>".
        """
        from nrd_dist.data.augment import check_policy
        from nrd_dist.data.noise import check_spec

        aug = self.augment
        _judge(path, lambda: check_spec(self.noise, self.num_classes))
        _judge(path, lambda: check_policy(aug.policy, aug.image_size, aug.resize_size, aug.cutout))


@dataclass
class ModelConfig:
    arch: str = setting("small_cnn", help=_model_names)
    in_channels: int = setting(1, help="input channels: 1 for grey images, 3 for RGB")

    def validate(self, path: str) -> None:
        from nrd_dist.models import MODELS

        if self.arch not in MODELS:
            raise ConfigError(
                f"{path}.arch: unknown model {self.arch!r}{_suggest(self.arch, MODELS)}; "
                f"valid: {', '.join(sorted(MODELS))}"
            )
        _positive(f"{path}.in_channels", self.in_channels)


@dataclass
class LossConfig:
    """Loss name and its parameters; parameters left null take the loss's defaults.

    Parameters the chosen loss does not take are ignored (and listed by
    :meth:`ignored_params`, which the run logs), so ``loss.name=ce`` reruns an NRD config
    as its CE baseline with everything else unchanged. The loss judges the parameters it
    takes (nrd_dist.losses); ignored ones are not judged.
    """

    name: str = setting("nrd", help=_loss_names)
    pi: Optional[list[float]] = setting(
        default_factory=lambda: [0.1, 0.8, 0.1],
        help="JSD weights on the simplex: nrd/ce_nrd [label, student, teacher]; js/gjs [label, views...]",
    )
    scale: Optional[bool] = setting(
        None, help="multiply by the GJS scale -1/((1-pi1) log(1-pi1)); null: the loss's default"
    )
    q: Optional[float] = setting(None, help="gce: q in (0, 1] (1: MAE-like, -> 0: CE)")
    alpha: Optional[float] = setting(None, help="sce, nce_rce: weight of the first term")
    beta: Optional[float] = setting(None, help="sce, nce_rce: weight of the reverse CE; bs: weight of the given label")
    epsilon: Optional[float] = setting(None, help="ls: label smoothing")

    def param_names(self) -> list[str]:
        """Every key but the name is a parameter of some loss."""
        return [f.name for f in dataclasses.fields(self) if f.name != "name"]

    def accepted_params(self) -> list[str]:
        from nrd_dist.losses import LOSSES

        return [n for n in inspect.signature(LOSSES[self.name]).parameters if n in self.param_names()]

    def params(self) -> dict[str, Any]:
        """The parameters set in the config that the loss takes, for ``build_loss``."""
        return {n: getattr(self, n) for n in self.accepted_params() if getattr(self, n) is not None}

    def ignored_params(self) -> list[str]:
        accepted = self.accepted_params()
        return [n for n in self.param_names() if getattr(self, n) is not None and n not in accepted]

    def validate(self, path: str) -> None:
        from nrd_dist.losses import LOSSES, build_loss

        if self.name not in LOSSES:
            raise ConfigError(
                f"{path}.name: unknown loss {self.name!r}{_suggest(self.name, LOSSES)}; "
                f"valid: {', '.join(sorted(LOSSES))}"
            )
        # Building the loss runs its checks: a missing parameter, pi's length and simplex, q's range...
        _judge(path, lambda: build_loss(self.name, **self.params()))


@dataclass
class TeacherConfig:
    decay: float = setting(0.99, help="EMA decay beta (paper eq. 24: 0.99)")
    warmup_steps: int = setting(
        0, help="the first updates copy the student instead of averaging (a ramp starts after them)"
    )
    every: int = setting(1, help="update the teacher every this many optimizer steps")
    bn: Literal["eval", "batch"] = setting(
        "eval", help="teacher BatchNorm: eval (running statistics) or batch (batch statistics)"
    )
    verify_every: int = setting(100, help="cross-rank teacher checksum every this many steps (0: never)")
    ramp: Literal["none", "mean_teacher", "power"] = setting(
        "none",
        help="decay ramp after the warm-up copies (nrd_dist.teacher.ramped_decay), t = updates since them: none "
        "(constant decay, the paper), mean_teacher (min(decay, 1 - 1/(t+1)), Tarvainen & Valpola) or power "
        "(min(decay, 1 - (1 + t/ramp_gamma)^-ramp_power), ema_pytorch / timm ModelEmaV3)",
    )
    ramp_power: float = setting(2 / 3, help="power ramp exponent (2/3 as ema_pytorch; timm also uses 3/4)")
    ramp_gamma: float = setting(
        1.0,
        help="power ramp time scale: ema_pytorch's inv_gamma (divide by its update_every), timm's warmup_gamma",
    )

    def validate(self, path: str) -> None:
        # The teacher module is the one judge of its settings' ranges (its constructors
        # run the same check); its messages name the field as "<path>.<field>".
        from nrd_dist.teacher import check_teacher_settings

        try:
            check_teacher_settings(
                decay=self.decay,
                warmup_steps=self.warmup_steps,
                every=self.every,
                bn=self.bn,
                ramp=self.ramp,
                ramp_power=self.ramp_power,
                ramp_gamma=self.ramp_gamma,
                prefix=path,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.verify_every < 0:
            raise ConfigError(f"{path}.verify_every: must be >= 0, got {self.verify_every}")


@dataclass
class OptimConfig:
    name: Literal["sgd"] = setting("sgd", help="optimizer (SGD)")
    lr: float = setting(0.1, help="peak learning rate (for the global batch)")
    momentum: float = setting(0.9, help="SGD momentum")
    nesterov: bool = setting(False, help="Nesterov momentum")
    weight_decay: float = setting(5e-4, help="L2 weight decay")
    epochs: int = setting(10, help="training epochs")
    schedule: Literal["multistep", "cosine", "step_gamma", "constant"] = setting(
        "cosine", help="multistep, cosine, step_gamma (gamma per epoch) or constant"
    )
    milestones: list[float] = setting(
        default_factory=list, help="multistep: epochs (>= 1) or fractions of the run (< 1)"
    )
    gamma: float = setting(0.1, help="decay factor at each milestone, or per epoch for step_gamma")
    warmup_epochs: float = setting(0.0, help="linear learning-rate warm-up, in epochs (fractions allowed)")
    clip_grad_norm: Optional[float] = setting(
        None, help="clip the global gradient norm to this value; null: no clipping"
    )

    def validate(self, path: str) -> None:
        if self.lr < 0:
            raise ConfigError(f"{path}.lr: learning rate must be >= 0, got {self.lr}")
        if self.momentum < 0:
            raise ConfigError(f"{path}.momentum: must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: must be >= 0, got {self.weight_decay}")
        _positive(f"{path}.epochs", self.epochs)
        if self.gamma <= 0:
            raise ConfigError(f"{path}.gamma: must be > 0, got {self.gamma}")
        if any(m <= 0 for m in self.milestones):
            raise ConfigError(f"{path}.milestones: must be positive, got {self.milestones}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{path}.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"{path}.clip_grad_norm: must be > 0, got {self.clip_grad_norm}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class EngineConfig:
    backend: Literal["ddp", "deepspeed"] = setting("ddp", help="ddp (torchrun or one process) or deepspeed")
    zero_stage: int = setting(0, help="DeepSpeed ZeRO stage 0-3")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU, with loss scaling)"
    )
    sync_bn: bool = setting(False, help="SyncBatchNorm for the student under DDP (CUDA only, as in torch)")
    grad_accum_steps: int = setting(1, help="gradient accumulation steps (deepspeed)")
    timeout_s: int = setting(
        1800, help="collective timeout in seconds: a dead or stuck rank fails the job instead of hanging it"
    )
    compile: bool = setting(
        False,
        help="torch.compile the student, the teacher and the loss (inductor; the first steps pay the compilation; "
        "backend ddp or one process)",
    )
    compile_mode: str = setting(
        "default", help=f"torch.compile mode: {', '.join(COMPILE_MODES)} (reduce-overhead: CUDA graphs)"
    )
    ddp_bucket_cap_mb: int = setting(
        25,
        help="DDP gradient bucket size in MiB (torch's default 25): larger buckets mean fewer all-reduce calls, "
        "smaller ones start overlapping with the backward pass earlier (backend ddp with more than one process)",
    )

    def validate(self, path: str) -> None:
        _positive(f"{path}.grad_accum_steps", self.grad_accum_steps)
        _judge(path, lambda: check_engine_settings(self.backend, self.zero_stage, self.grad_accum_steps, self.compile))
        _positive(f"{path}.timeout_s", self.timeout_s)
        _positive(f"{path}.ddp_bucket_cap_mb", self.ddp_bucket_cap_mb)
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"{path}.compile_mode: must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )


@dataclass
class EvalConfig:
    every_epochs: int = setting(1, help="evaluate on data.val every this many epochs (and after the last)")
    batch_size: Optional[int] = setting(None, help="evaluation batch per rank; null: 2 x data.batch_size")
    # Label-correction analysis at the end (training shards with clean labels only):
    label_correction_samples: int = setting(
        2000, help="training samples in the final label-correction analysis (0: skip)"
    )
    label_correction_views: int = setting(4, help="K AugMix teacher views averaged per sample in that analysis")
    noisy_val: list[str] = setting(
        default_factory=list,
        help="names of data.val sets whose labels get data.noise too (e.g. a held-out part of the training set): "
        "accuracy on noisy labels, for choosing hyperparameters without clean labels",
    )

    def validate(self, path: str) -> None:
        _positive(f"{path}.every_epochs", self.every_epochs)
        if self.batch_size is not None:
            _positive(f"{path}.batch_size", self.batch_size)
        if self.label_correction_samples < 0:
            raise ConfigError(f"{path}.label_correction_samples: must be >= 0, got {self.label_correction_samples}")
        _positive(f"{path}.label_correction_views", self.label_correction_views)


@dataclass
class LogConfig:
    every_steps: int = setting(50, help="log line, metrics.jsonl record and TensorBoard scalars every this many steps")

    def validate(self, path: str) -> None:
        _positive(f"{path}.every_steps", self.every_steps)


@dataclass
class TrainConfig:
    nonfinite: Literal["stop", "skip"] = setting(
        "stop", help="a non-finite loss: stop (naming the step and the batch's sample keys) or skip the step"
    )
    nonfinite_budget: int = setting(
        10, help="skip: steps that may be skipped (counted and logged) before the run stops"
    )

    def validate(self, path: str) -> None:
        if self.nonfinite_budget < 0:
            raise ConfigError(f"{path}.nonfinite_budget: must be >= 0, got {self.nonfinite_budget}")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(0, help="checkpoint every this many steps (0: epoch ends only); always at epoch ends")
    keep: int = setting(3, help="complete checkpoints kept (the newest)")
    resume: Literal["auto", "never", "force"] = setting(
        "auto",
        help="auto (continue from the latest checkpoint in run.output_dir), never, or force (resume even if model, "
        "loss or data changed)",
    )
    zero_portable: bool = setting(
        True,
        help="ZeRO-1/2/3: also save the full fp32 weights and optimizer state gathered on rank 0, so the run can "
        "resume on a different number of ranks (elastic); off skips the gather for models too large for one "
        "rank's memory",
    )

    def validate(self, path: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"{path}.every_steps: must be >= 0, got {self.every_steps}")
        _positive(f"{path}.keep", self.keep)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: Union[str, Path, None], overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply dotted
    ``key=value`` overrides (values parsed as YAML) and return a validated Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from plain nested dicts."""
    cfg = _build(Config, raw, "")
    _validate(cfg, "")
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw (not yet typed) mapping in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.epochs=2")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {text!r} as YAML: {err}") from None
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key component")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists for YAML/JSON output."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Union[str, Path]) -> None:
    """The resolved config as YAML, with storage secrets (``data.storage.secret`` ...)
    written as ``***``: run folders get copied and shared."""
    from nrd_dist.data.storage import redact_config

    Path(path).write_text(yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False))


def schema_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type hint) of every key of the schema in declaration order,
    each section before its keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        yield key, f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], key + ".")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key path of the schema (for suggestions and docs)."""
    return [key for key, _, _ in schema_fields(cls, prefix)]


# ----------------------------------------------------------------------------- internals


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<top>'}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in hints:
            suggestion = _suggest(str(key), names) or _suggest(key_path, all_keys())
            raise ConfigError(f"{key_path}: unknown key{suggestion}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, key_path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint and convert where lossless (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, path)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(str(err).split(": ", 1)[-1])
        raise ConfigError(f"{path}: {_describe(value)} matches none of: {'; '.join(errors)}")
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(hint)})")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(
                f"{path}: invalid value {value!r}{_suggest(str(value), map(str, args))}; valid: {choices}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # YAML/CLI maps may spell integer keys as strings
            out[_coerce(key_type, k, f"{path}.{k}")] = _coerce(value_type, v, f"{path}.{k}")
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config schema: unsupported type {hint!r} at {path}")  # a bug in the schema


def _validate(node: Any, path: str) -> None:
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child, f"{path}.{f.name}" if path else f.name)
    if hasattr(node, "validate"):
        node.validate(path)


def _judge(path: str, check: Callable[[], Any]) -> None:
    """Run a component's own check of its settings. Its messages start with the field's
    key below ``path`` ("q: must lie in (0, 1]"), so the ConfigError names the full key
    ("loss.q: ...")."""
    try:
        check()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}.{err}") from None


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be > 0, got {value}")


def _suggest(word: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))

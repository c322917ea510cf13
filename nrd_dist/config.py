"""Typed run configuration: dataclasses loaded from YAML plus dotted overrides.

One source of truth for every setting (DESIGN.md section 4): the training entry point,
the tools and the tests all read a :class:`Config`. Loading is strict: an unknown key, a
value of the wrong type or an invalid value raises :class:`ConfigError` naming the dotted
key path (``loss.pi``), with the closest valid key suggested for typos, before any
expensive work starts.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key path."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; every ML config writes learning rates
    that way, so exponent floats without a dot resolve to float here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0


@dataclass
class NoiseConfig:
    """Load-time label noise (DESIGN.md section 1, "Synthetic noise")."""

    # asymmetric_sequential: the GJS/NRD authors' class-by-class, in-place relabelling
    # (a later pair can move a sample again), for comparisons with the paper
    type: Literal["none", "symmetric", "symmetric_exclusive", "asymmetric", "asymmetric_sequential",
                  "matrix"] = "none"
    rate: float = 0.0
    seed: int = 0
    # asymmetric(_sequential): "cifar10", "cifar100", "fmnist" or an explicit {from_class: to_class}
    # mapping; asymmetric_sequential applies its pairs in this order
    map: Optional[Union[str, dict[int, int]]] = None
    # matrix: a row-stochastic num_classes x num_classes transition matrix
    matrix: Optional[list[list[float]]] = None

    def validate(self, path: str) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"{path}.rate: noise rate must lie in [0, 1], got {self.rate}")
        if self.type in ("asymmetric", "asymmetric_sequential") and self.map is None:
            raise ConfigError(f"{path}.map: {self.type} noise needs a map "
                              "(cifar10, cifar100, fmnist or {from: to})")
        if self.type == "matrix" and self.matrix is None:
            raise ConfigError(f"{path}.matrix: matrix noise needs a transition matrix")


@dataclass
class AugmentConfig:
    """Named augmentation policies (nrd_dist.data.augment)."""

    policy: Literal["fmnist", "cifar", "imagenet"] = "fmnist"
    image_size: Optional[int] = None  # crop size of every view, pixels; null: 28 / 32 / 224 by policy
    resize_size: int = 256  # eval resize before the centre crop (imagenet policy only)
    cutout: int = 16  # Cutout square side, pixels (cifar policy); 0 disables it

    def validate(self, path: str) -> None:
        if self.image_size is not None:
            _positive(f"{path}.image_size", self.image_size)
        _positive(f"{path}.resize_size", self.resize_size)
        if self.cutout < 0:
            raise ConfigError(f"{path}.cutout: must be >= 0, got {self.cutout}")


@dataclass
class DataConfig:
    train: Union[str, list[str]] = ""  # URL, brace pattern or list of shard URLs
    val: dict[str, str] = field(default_factory=dict)  # val-set name -> shard URL(s)
    num_classes: int = 10
    batch_size: int = 128  # per rank
    workers: int = 2  # DataLoader worker processes per rank
    persistent_workers: bool = True  # keep the training loader's workers between epochs
    shuffle_buffer: int = 2000  # samples held in the shuffle buffer per worker
    samples_per_epoch: Optional[int] = None  # defines an epoch when streaming
    sampling: Literal["epoch", "resampled"] = "epoch"  # shard dealing, see nrd_dist.data.shards
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    storage: dict[str, Any] = field(default_factory=dict)  # fsspec storage options
    retries: int = 4  # attempts after a transient storage error, with exponential backoff
    retry_backoff_s: float = 0.5  # first backoff; doubles per attempt
    max_bad_fraction: float = 0.001  # corrupt samples / truncated shards tolerated, as a fraction

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
            raise ConfigError(f"{path}.retries / {path}.retry_backoff_s: must be >= 0, got "
                              f"{self.retries} / {self.retry_backoff_s}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{path}.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.noise.type != "none":
            # The noise module is the one judge of a spec (maps and matrices need the
            # class count); its messages name the field as "noise.<field>".
            from nrd_dist.data.noise import transition_matrix

            try:
                transition_matrix(dataclasses.asdict(self.noise), self.num_classes)
            except ValueError as err:
                raise ConfigError(f"{path}.{err}") from None


@dataclass
class ModelConfig:
    arch: str = "small_cnn"
    in_channels: int = 1

    def validate(self, path: str) -> None:
        from nrd_dist.models import MODELS

        if self.arch not in MODELS:
            raise ConfigError(f"{path}.arch: unknown model {self.arch!r}{_suggest(self.arch, MODELS)}; "
                              f"valid: {', '.join(sorted(MODELS))}")
        _positive(f"{path}.in_channels", self.in_channels)


@dataclass
class LossConfig:
    """Loss name and its parameters; parameters left null take the loss's defaults.

    Parameters the chosen loss does not take are ignored (and listed by
    :meth:`ignored_params`, which the run logs), so ``loss.name=ce`` reruns an NRD config
    as its CE baseline with everything else unchanged.
    """

    name: str = "nrd"
    pi: Optional[list[float]] = field(default_factory=lambda: [0.1, 0.8, 0.1])  # nrd: [label, student, teacher]
    scale: Optional[bool] = None  # GJS scaling -1/((1-pi1) log(1-pi1))
    q: Optional[float] = None  # gce
    alpha: Optional[float] = None  # sce, nce_rce
    beta: Optional[float] = None  # sce, nce_rce, bs
    epsilon: Optional[float] = None  # ls

    _PARAMS = ("pi", "scale", "q", "alpha", "beta", "epsilon")

    def accepted_params(self) -> list[str]:
        from nrd_dist.losses import LOSSES

        return [n for n in inspect.signature(LOSSES[self.name]).parameters if n in self._PARAMS]

    def params(self) -> dict[str, Any]:
        """The parameters set in the config that the loss takes, for ``build_loss``."""
        return {n: getattr(self, n) for n in self.accepted_params() if getattr(self, n) is not None}

    def ignored_params(self) -> list[str]:
        accepted = self.accepted_params()
        return [n for n in self._PARAMS if getattr(self, n) is not None and n not in accepted]

    def validate(self, path: str) -> None:
        from nrd_dist.losses import LOSSES, build_loss

        if self.name not in LOSSES:
            raise ConfigError(f"{path}.name: unknown loss {self.name!r}{_suggest(self.name, LOSSES)}; "
                              f"valid: {', '.join(sorted(LOSSES))}")
        if self.pi is not None:
            if any(p < 0 for p in self.pi) or abs(sum(self.pi) - 1.0) > 1e-6:
                raise ConfigError(f"{path}.pi: weights must be non-negative and sum to 1 "
                                  f"(on the simplex), got {self.pi} (sum {sum(self.pi):.6g})")
        if self.q is not None and not 0.0 < self.q <= 1.0:
            raise ConfigError(f"{path}.q: must lie in (0, 1], got {self.q}")
        if self.epsilon is not None and not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"{path}.epsilon: must lie in [0, 1], got {self.epsilon}")
        signature = inspect.signature(LOSSES[self.name]).parameters
        for name in self.accepted_params():
            if signature[name].default is inspect.Parameter.empty and getattr(self, name) is None:
                raise ConfigError(f"{path}.{name}: loss {self.name!r} needs {name!r} (no default)")
        try:  # the loss itself is the judge of the rest (pi's length, ...)
            build_loss(self.name, **self.params())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from None


@dataclass
class TeacherConfig:
    decay: float = 0.99  # EMA decay beta (paper eq. 24)
    warmup_steps: int = 0  # copy the student instead of averaging for this many updates
    every: int = 1  # update the teacher every this many optimizer steps
    bn: Literal["eval", "batch"] = "eval"  # teacher BatchNorm: running statistics or batch statistics
    verify_every: int = 100  # cross-rank teacher checksum cadence, steps (0: never)
    # Decay ramp after the warm-up copies (nrd_dist.teacher.ramped_decay); none: the paper's constant decay.
    ramp: Literal["none", "mean_teacher", "power"] = "none"
    ramp_power: float = 2 / 3  # power ramp exponent (ema_pytorch's default; timm also uses 3/4)
    ramp_gamma: float = 1.0  # power ramp time scale (ema_pytorch's inv_gamma, timm's warmup_gamma)

    def validate(self, path: str) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"{path}.decay: must lie in [0, 1], got {self.decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _positive(f"{path}.every", self.every)
        _positive(f"{path}.ramp_power", self.ramp_power)
        _positive(f"{path}.ramp_gamma", self.ramp_gamma)
        if self.verify_every < 0:
            raise ConfigError(f"{path}.verify_every: must be >= 0, got {self.verify_every}")


@dataclass
class OptimConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = 0.1  # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    epochs: int = 10
    schedule: Literal["multistep", "cosine", "step_gamma", "constant"] = "cosine"
    milestones: list[float] = field(default_factory=list)  # fractions (< 1) or epochs (>= 1)
    gamma: float = 0.1  # decay factor at each milestone, or per epoch for step_gamma
    warmup_epochs: float = 0.0  # linear warmup length
    clip_grad_norm: Optional[float] = None

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
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    sync_bn: bool = False
    grad_accum_steps: int = 1
    timeout_s: int = 1800  # collective timeout: a dead rank fails the job after this long
    compile: bool = False  # torch.compile the student, the teacher and the loss
    compile_mode: str = "default"  # torch.compile mode
    ddp_bucket_cap_mb: int = 25  # DDP gradient bucket size (torch's default)

    def validate(self, path: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage and self.backend != "deepspeed":
            raise ConfigError(f"{path}.zero_stage: ZeRO needs engine.backend=deepspeed "
                              f"(got backend {self.backend!r})")
        _positive(f"{path}.grad_accum_steps", self.grad_accum_steps)
        if self.grad_accum_steps > 1 and self.backend != "deepspeed":
            raise ConfigError(f"{path}.grad_accum_steps: gradient accumulation needs engine.backend=deepspeed")
        _positive(f"{path}.timeout_s", self.timeout_s)
        _positive(f"{path}.ddp_bucket_cap_mb", self.ddp_bucket_cap_mb)
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"{path}.compile_mode: must be one of {', '.join(COMPILE_MODES)}, "
                              f"got {self.compile_mode!r}")
        if self.compile and self.backend == "deepspeed":
            raise ConfigError(f"{path}.compile: supported with engine.backend=ddp (and one process); "
                              f"DeepSpeed's ZeRO hooks are not traced here")


@dataclass
class EvalConfig:
    every_epochs: int = 1
    batch_size: Optional[int] = None  # per rank; null: 2 x data.batch_size
    # Label-correction analysis at the end (training shards with clean labels only):
    label_correction_samples: int = 2000  # training samples analysed (0: skip)
    label_correction_views: int = 4  # K AugMix teacher views averaged per sample
    noisy_val: list[str] = field(default_factory=list)  # data.val sets that get data.noise too

    def validate(self, path: str) -> None:
        _positive(f"{path}.every_epochs", self.every_epochs)
        if self.batch_size is not None:
            _positive(f"{path}.batch_size", self.batch_size)
        if self.label_correction_samples < 0:
            raise ConfigError(f"{path}.label_correction_samples: must be >= 0, got {self.label_correction_samples}")
        _positive(f"{path}.label_correction_views", self.label_correction_views)


@dataclass
class LogConfig:
    every_steps: int = 50

    def validate(self, path: str) -> None:
        _positive(f"{path}.every_steps", self.every_steps)


@dataclass
class TrainConfig:
    nonfinite: Literal["stop", "skip"] = "stop"  # what a non-finite loss does
    nonfinite_budget: int = 10  # skip: steps that may be skipped before the run stops

    def validate(self, path: str) -> None:
        if self.nonfinite_budget < 0:
            raise ConfigError(f"{path}.nonfinite_budget: must be >= 0, got {self.nonfinite_budget}")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at epoch ends
    keep: int = 3
    resume: Literal["auto", "never", "force"] = "auto"
    zero_portable: bool = True  # ZeRO: also save a world-size-independent copy (elastic resume)

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
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is a value, cannot set {key}")
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


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key path of the schema (for suggestions and docs)."""
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, path + "."))
    return keys


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
            raise ConfigError(f"{path}: invalid value {value!r}{_suggest(str(value), map(str, args))}; "
                              f"valid: {choices}")
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

"""Typed config: YAML + dotted overrides, strict validation with key paths."""

import dataclasses
import typing

import pytest
import yaml

from nrd_dist.config import Config, ConfigError, all_keys, dump_config, load_config

CONTRACT_KEYS = [  # docs/design.md section 3: scripts and checks rely on these
    "run.output_dir",
    "run.seed",
    "data.train",
    "data.val",
    "data.num_classes",
    "data.batch_size",
    "data.workers",
    "data.noise.type",
    "data.noise.rate",
    "data.noise.seed",
    "model.arch",
    "loss.name",
    "loss.pi",
    "teacher.decay",
    "optim.lr",
    "optim.epochs",
    "optim.weight_decay",
    "engine.backend",
    "engine.zero_stage",
    "engine.precision",
    "checkpoint.every_steps",
]


def write(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_contract_keys_exist():
    keys = set(all_keys())
    assert [k for k in CONTRACT_KEYS if k not in keys] == []


def test_yaml_and_overrides_typed(tmp_path):
    path = write(
        tmp_path,
        {
            "loss": {"name": "nrd", "pi": [0.2, 0.6, 0.2]},
            "optim": {"lr": 1},
            "data": {"train": "shards/train-{000000..000003}.tar"},
        },
    )
    cfg = load_config(
        path,
        [
            "optim.epochs=2",
            "loss.pi=[0.1, 0.8, 0.1]",
            "optim.nesterov=true",
            "data.val.fmnist=/x/test-000000.tar",
            "optim.lr=5e-2",
            "data.noise.type=symmetric",
            "data.noise.rate=0.4",
        ],
    )
    assert cfg.optim.epochs == 2 and isinstance(cfg.optim.epochs, int)
    assert cfg.loss.pi == [0.1, 0.8, 0.1]
    assert cfg.optim.nesterov is True
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.val == {"fmnist": "/x/test-000000.tar"}
    assert cfg.data.train == "shards/train-{000000..000003}.tar"
    assert (cfg.data.noise.type, cfg.data.noise.rate) == ("symmetric", 0.4)
    assert cfg.teacher.decay == 0.99  # the paper's default


def test_exponent_floats_without_dot():
    # YAML 1.1 alone would read 5e-4 as a string.
    assert load_config(None, ["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4


def test_int_is_accepted_for_float_and_list_for_train():
    cfg = load_config(None, ["optim.lr=1", "data.train=[a.tar, b.tar]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train == ["a.tar", "b.tar"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "optim.lrr: unknown key (did you mean 'lr'?)"),
        ("lose.name=ce", "lose: unknown key (did you mean 'loss'?)"),
        ("teacher.decya=0.9", "teacher.decya: unknown key (did you mean 'decay'?)"),
        ("optim.epochs=2.5", "optim.epochs: expected an integer"),
        ("optim.epochs=true", "optim.epochs: expected an integer"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("optim.nesterov=1", "optim.nesterov: expected true or false"),
        ("optim.lr=-0.1", "optim.lr: learning rate must be >= 0"),
        ("loss.pi=[0.5, 0.6, 0.1]", "loss.pi: weights must be non-negative and sum to 1"),
        ("loss.pi=[1.2, -0.1, -0.1]", "loss.pi: weights must be non-negative"),
        ("loss.pi=[0.1, x, 0.1]", "loss.pi[1]: expected a number"),
        ("data.noise.rate=1.5", "data.noise.rate: noise rate must lie in [0, 1]"),
        ("data.noise.rate=-0.1", "data.noise.rate: noise rate must lie in [0, 1]"),
        ("data.noise.type=symetric", "data.noise.type: invalid value 'symetric' (did you mean 'symmetric'?)"),
        ("engine.precision=bf15", "engine.precision: invalid value 'bf15'"),
        ("engine.zero_stage=4", "engine.zero_stage: must be 0, 1, 2 or 3"),
        ("loss.name=nrdd", "loss.name: unknown loss 'nrdd' (did you mean 'nrd'?)"),
        ("loss.pi=[0.5, 0.5]", "loss.pi: must have 3 entries [label, student, teacher], got 2"),
        ("loss.pi=null", "loss.pi: required by loss 'nrd' (no default)"),
        ("model.arch=resnet5", "model.arch: unknown model 'resnet5'"),
        ("data.batch_size=0", "data.batch_size: must be > 0"),
        ("teacher.decay=1.5", "teacher.decay: must lie in [0, 1]"),
        ("data.val=[a]", "data.val: expected a mapping"),
        ("optim.lr.x=1", "optim.lr: expected a number"),
        ("optim.lr", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # The components judge their own settings; the config names the full key.
        (["loss.name=gce", "loss.q=1.5"], "loss.q: must lie in (0, 1], got 1.5"),
        (["loss.name=ls", "loss.epsilon=2"], "loss.epsilon: must lie in [0, 1], got 2.0"),
        (["loss.name=bs", "loss.beta=1.5"], "loss.beta: must lie in [0, 1], got 1.5"),
        (["loss.name=sce", "loss.alpha=-1", "loss.beta=1"], "loss.alpha: must be >= 0, got -1.0"),
        (["loss.name=sce"], "loss.alpha: required by loss 'sce' (no default)"),
        (
            ["loss.name=ce_nrd", "loss.pi=[1, 0, 0]"],
            "loss.pi: pi[1] + pi[2] (the student and teacher weights) must be > 0",
        ),
        (["loss.name=js", "loss.pi=[0.2, 0.3, 0.5]"], "loss.pi: must have 2 entries [label, student], got 3"),
        (["data.augment.image_size=0"], "data.augment.image_size: must be > 0, got 0"),
        (["data.augment.resize_size=0"], "data.augment.resize_size: must be > 0, got 0"),
        (["data.augment.cutout=-1"], "data.augment.cutout: must be >= 0, got -1"),
        (["data.noise.type=matrix"], "data.noise.matrix: matrix noise needs a row-stochastic"),
        (
            ["data.noise.type=asymmetric", "data.noise.rate=0.4"],
            "data.noise.map: asymmetric noise needs a map: cifar10, fmnist, cifar100 or an explicit {from: to} mapping",
        ),
    ],
)
def test_component_checks_name_the_full_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)


def test_params_the_loss_ignores_are_not_judged():
    # The loss judges what it takes; the rest is only listed as ignored (and logged).
    cfg = load_config(None, ["loss.name=ce", "loss.q=5", "loss.pi=[0.5, 0.6, 0.1]"])
    assert cfg.loss.ignored_params() == ["pi", "q"]


def test_every_key_has_help_and_the_choices_are_the_components():
    from nrd_dist.config import field_help, schema_fields
    from nrd_dist.data.augment import NATIVE_IMAGE_SIZE, POLICIES
    from nrd_dist.data.noise import NAMED_MAPS, NOISE_TYPES
    from nrd_dist.losses import LOSSES
    from nrd_dist.models import MODELS

    fields = {key: (f, hint) for key, f, hint in schema_fields()}
    for key, (f, hint) in fields.items():
        if not dataclasses.is_dataclass(hint):
            assert field_help(f).strip(), key
    assert typing.get_args(fields["data.augment.policy"][1]) == POLICIES
    assert typing.get_args(fields["data.noise.type"][1]) == NOISE_TYPES
    # Help that lists a component's names or sizes is read from the component.
    help_of = {key: field_help(f) for key, (f, hint) in fields.items() if not dataclasses.is_dataclass(hint)}
    assert all(name in help_of["loss.name"] for name in LOSSES)
    assert all(name in help_of["model.arch"] for name in MODELS)
    assert all(name in help_of["data.noise.map"] for name in NAMED_MAPS)
    assert all(f"{policy} {size}" in help_of["data.augment.image_size"] for policy, size in NATIVE_IMAGE_SIZE.items())


def test_noise_spec_checked_against_class_count():
    with pytest.raises(ConfigError, match=r"data\.noise\.map.*100"):
        load_config(None, ["data.noise.type=asymmetric", "data.noise.rate=0.2", "data.noise.map=cifar100"])
    cfg = load_config(
        None, ["data.num_classes=100", "data.noise.type=asymmetric", "data.noise.rate=0.2", "data.noise.map=cifar100"]
    )
    assert cfg.data.noise.map == "cifar100"
    cfg = load_config(None, ["data.noise.type=asymmetric", "data.noise.rate=0.4", "data.noise.map={6: 0, '2': 4}"])
    assert cfg.data.noise.map == {6: 0, 2: 4}  # YAML string keys become class indices


def test_unknown_key_in_file_names_path(tmp_path):
    path = write(tmp_path, {"data": {"noise": {"rtae": 0.2}}})
    with pytest.raises(ConfigError, match=r"data\.noise\.rtae: unknown key \(did you mean 'rate'\?\)"):
        load_config(path)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_params_the_loss_does_not_take_are_ignored_and_listed():
    cfg = load_config(None, ["loss.name=ce"])  # the default pi stays, unused
    assert cfg.loss.params() == {} and cfg.loss.ignored_params() == ["pi"]
    cfg = load_config(None, ["loss.name=gjs", "loss.pi=[0.5, 0.25, 0.25]", "loss.q=0.3"])
    assert cfg.loss.params() == {"pi": [0.5, 0.25, 0.25]} and cfg.loss.ignored_params() == ["q"]


def test_loss_params_reach_build_loss():
    from nrd_dist.losses import build_loss

    cfg = load_config(None, ["loss.name=gce", "loss.q=0.5"])
    assert cfg.loss.params() == {"q": 0.5}
    assert build_loss(cfg.loss.name, **cfg.loss.params()) is not None


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["loss.pi=[0.1,0.8,0.1]", "data.val.test=t.tar", "optim.milestones=[0.5, 0.75]"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert isinstance(again, Config)


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)

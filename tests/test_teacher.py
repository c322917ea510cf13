"""EMA teacher: equals a reference loop; never part of autograd."""

import copy

import pytest
import torch
from torch import nn

from nrd_dist.config import ConfigError, load_config
from nrd_dist.models import build_model
from nrd_dist.teacher import EMATeacher, ramped_decay


def reference_ema(states, decay, warmup_steps=0, every=1):
    """Independent loop over plain state dicts (docs/design.md section 1, paper eq. 24)."""
    teacher = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in states[0].items()}
    applied = 0
    for call, student in enumerate(states[1:], start=1):
        if call % every:
            continue
        for k, v in student.items():
            if not v.is_floating_point():
                teacher[k] = v.clone()
            elif applied < warmup_steps:
                teacher[k] = v.clone().double()
            else:
                teacher[k] = decay * teacher[k] + (1 - decay) * v.double()
        applied += 1
    return teacher


def train_steps(student, teacher, steps, seed=0):
    """Real SGD steps on a model with BatchNorm, so weights *and* running stats move."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    states = [copy.deepcopy(student.state_dict())]
    for _ in range(steps):
        x = torch.randn(8, 1, 28, 28)
        y = torch.randint(0, 10, (8,))
        student.train()
        loss = nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(student)
        states.append(copy.deepcopy(student.state_dict()))
    return states


@pytest.mark.parametrize("decay, warmup, every", [(0.99, 0, 1), (0.9, 3, 1), (0.5, 0, 2), (0.0, 0, 1)])
def test_matches_reference_loop(decay, warmup, every):
    torch.manual_seed(1)
    student = build_model("small_cnn", 10, 1)
    teacher = EMATeacher(student, decay=decay, warmup_steps=warmup, every=every)
    states = train_steps(student, teacher, steps=7)
    expected = reference_ema(states, decay, warmup, every)
    got = teacher.module.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        if got[k].is_floating_point():
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k].double(), expected[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], expected[k]), k  # num_batches_tracked copied
    # Sanity: with decay < 1 the teacher really moved away from its initial weights.
    w0 = states[0]["0.0.weight"]
    assert not torch.allclose(got["0.0.weight"], w0)
    if decay > 0:  # and it lags behind the student
        assert not torch.allclose(got["0.0.weight"], states[-1]["0.0.weight"])


def test_decay_one_freezes_and_bn_stats_averaged():
    torch.manual_seed(2)
    student = build_model("small_cnn", 10, 1)
    teacher = EMATeacher(student, decay=1.0)
    before = copy.deepcopy(teacher.module.state_dict())
    train_steps(student, teacher, steps=3)
    after = teacher.module.state_dict()
    for k in before:
        if before[k].is_floating_point():
            assert torch.equal(before[k], after[k]), k
    # BatchNorm running statistics are part of the average (decay 0.5 follows them).
    teacher = EMATeacher(student, decay=0.5)
    states = train_steps(student, teacher, steps=2)
    assert not torch.equal(teacher.module.state_dict()["0.1.running_mean"], states[0]["0.1.running_mean"])


def test_never_receives_gradients():
    torch.manual_seed(3)
    student = build_model("small_cnn", 10, 1)
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 1, 28, 28)
    probs = teacher.predict_probs(x)
    assert not probs.requires_grad and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    # The probabilities serve as a constant in a loss that saves them for backward.
    student_logp = torch.log_softmax(student(x), -1)
    loss = (probs * (probs.clamp_min(1e-7).log() - student_logp)).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    logits = teacher(x)
    assert logits.is_inference()  # the forward builds no graph at all


def test_eval_mode_forward_and_bn_batch_mode():
    torch.manual_seed(4)
    student = build_model("small_cnn", 10, 1)
    train_steps(student, EMATeacher(student), steps=2)
    teacher = EMATeacher(student, bn="eval")
    teacher.train()  # the surrounding model.train() must not switch it
    assert not teacher.module.training
    x = torch.randn(6, 1, 28, 28)
    student.eval()
    torch.testing.assert_close(teacher(x), student(x))  # same weights, running stats
    batch_teacher = EMATeacher(student, bn="batch")
    assert batch_teacher.module.training
    stats = batch_teacher.module.state_dict()["0.1.running_mean"].clone()
    out = batch_teacher(x)
    assert not torch.allclose(out, student(x), atol=1e-4)  # batch statistics differ
    assert torch.equal(batch_teacher.module.state_dict()["0.1.running_mean"], stats)  # left to the EMA


def test_state_dict_roundtrip_resumes_identically():
    torch.manual_seed(5)
    student = build_model("small_cnn", 10, 1)
    teacher = EMATeacher(student, decay=0.9, warmup_steps=2, every=2)
    train_steps(student, teacher, steps=3)
    saved = copy.deepcopy(teacher.state_dict())
    restored = EMATeacher(build_model("small_cnn", 10, 1), decay=0.9, warmup_steps=2, every=2)
    restored.load_state_dict(saved)
    assert (restored.calls, restored.num_updates) == (teacher.calls, teacher.num_updates)
    for t in (teacher, restored):
        t.update(student)
        t.update(student)
    for (k, a), b in zip(teacher.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_mixed_precision_student_and_mismatch_error():
    torch.manual_seed(6)
    student = nn.Linear(4, 3)
    teacher = EMATeacher(student, decay=0.5)
    half = copy.deepcopy(student).to(torch.bfloat16)
    with torch.no_grad():
        half.weight.add_(1.0)
    teacher.update(half)
    assert teacher.module.weight.dtype == torch.float32
    expected = 0.5 * student.weight + 0.5 * half.weight.float()
    torch.testing.assert_close(teacher.module.weight, expected)
    with pytest.raises(ValueError, match="unwrapped student"):
        teacher.update(nn.Linear(4, 4, bias=False))


# ----------------------------------------------------------------------------- decay ramp


def tiny_model():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def randomize_(model, generator):
    """New random values for every float entry: each update sees a different student."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=generator))


def reference_ramp(t, decay, ramp, power, gamma):
    """The closed forms, written out independently of nrd_dist.teacher.ramped_decay."""
    if ramp == "mean_teacher":  # Tarvainen & Valpola 2017
        return min(decay, 1 - 1 / (t + 1))
    if ramp == "power":  # ema_pytorch (min_value 0) / timm ModelEmaV3 warmup
        return min(decay, max(0.0, 1 - (1 + t / gamma) ** (-power)))
    return decay


def reference_ramped_ema(states, decay, warmup_steps, every, ramp, power, gamma):
    """Float64 loop over state dicts: warm-up copies, then the ramp from t = 0."""
    teacher = {k: v.clone().double() for k, v in states[0].items() if v.is_floating_point()}
    applied, decays = 0, []
    for call, student in enumerate(states[1:], start=1):
        if call % every:
            continue
        d = 0.0 if applied < warmup_steps else reference_ramp(applied - warmup_steps, decay, ramp, power, gamma)
        for k in teacher:
            teacher[k] = d * teacher[k] + (1 - d) * student[k].double()
        decays.append(d)
        applied += 1
    return teacher, decays


@pytest.mark.parametrize(
    "ramp, decay, warmup, every, power, gamma",
    [
        ("mean_teacher", 0.9, 0, 1, 2 / 3, 1.0),
        ("power", 0.9, 0, 1, 2 / 3, 1.0),
        ("power", 0.95, 3, 2, 0.75, 0.25),  # warm-up, every 2, gamma < 1 (ema_pytorch update_every 4)
        ("mean_teacher", 0.97, 4, 1, 2 / 3, 1.0),
        ("none", 0.9, 2, 1, 2 / 3, 1.0),
    ],
)
def test_ramp_matches_reference_loop(ramp, decay, warmup, every, power, gamma):
    generator = torch.Generator().manual_seed(7)
    student = tiny_model()
    teacher = EMATeacher(
        student, decay=decay, warmup_steps=warmup, every=every, ramp=ramp, ramp_power=power, ramp_gamma=gamma
    )
    states = [copy.deepcopy(student.state_dict())]
    decays = []
    for _ in range(50):
        randomize_(student, generator)
        if teacher.calls % every == every - 1:  # this call applies an update
            decays.append(teacher.decay_at(teacher.num_updates))
        teacher.update(student)
        states.append(copy.deepcopy(student.state_dict()))
    expected, expected_decays = reference_ramped_ema(states, decay, warmup, every, ramp, power, gamma)
    assert decays == pytest.approx(expected_decays, abs=1e-12)
    got = teacher.module.state_dict()
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6, msg=k)
    # The run covers both sides of the cap: a real ramp, then the constant decay.
    averaged = expected_decays[warmup:]
    if ramp != "none":
        assert averaged[0] == 0.0 and 0.0 < averaged[1] < decay
    assert averaged[-1] == decay
    assert not torch.allclose(got["0.weight"], states[-1]["0.weight"])  # it lags the student


def test_ramp_none_is_bitwise_the_plain_lerp():
    torch.manual_seed(8)
    student = build_model("small_cnn", 10, 1)
    teacher = EMATeacher(student, decay=0.99, ramp="none", ramp_power=0.5, ramp_gamma=3.0)
    expected = {k: v.clone().float() for k, v in teacher.module.state_dict().items() if v.is_floating_point()}
    states = train_steps(student, teacher, steps=4)
    for state in states[1:]:
        for k in expected:  # the pre-ramp update: lerp by 1 - decay, float32
            expected[k] = torch.lerp(expected[k], state[k].float(), 1.0 - 0.99)
    got = teacher.module.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert all(teacher.decay_at(n) == 0.99 for n in range(1000))


def test_decay_sequence_closed_forms():
    power = EMATeacher(tiny_model(), decay=0.999, ramp="power", ramp_power=2 / 3, ramp_gamma=1.0)
    assert power.decay_at(0) == 0.0
    assert power.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3), abs=1e-15)  # 0.370
    assert power.decay_at(2) == pytest.approx(1 - 3 ** (-2 / 3), abs=1e-15)  # 0.519
    assert power.decay_at(3) == pytest.approx(1 - 4 ** (-2 / 3), abs=1e-15)  # 0.603
    assert power.decay_at(10**6) == 0.999  # capped
    mean = EMATeacher(tiny_model(), decay=0.99, ramp="mean_teacher")
    assert [mean.decay_at(t) for t in range(3)] == pytest.approx([0.0, 1 / 2, 2 / 3], abs=1e-15)
    assert mean.decay_at(99) == 0.99 and mean.decay_at(98) == pytest.approx(0.98989898, abs=1e-8)
    # gamma stretches time: t / gamma
    assert ramped_decay(4, 0.99, "power", 0.75, 2.0) == pytest.approx(1 - 3**-0.75, abs=1e-15)
    # warm-up copies first, then the ramp starts at t = 0 (one more copy)
    warm = EMATeacher(tiny_model(), decay=0.99, warmup_steps=2, ramp="mean_teacher")
    assert [warm.decay_at(n) for n in range(5)] == pytest.approx([0.0, 0.0, 0.0, 1 / 2, 2 / 3], abs=1e-15)
    assert warm.copies(1) and not warm.copies(2)


@pytest.mark.parametrize("ramp", ["mean_teacher", "power"])
def test_ramp_state_dict_roundtrip_continues_sequence(ramp):
    generator = torch.Generator().manual_seed(9)
    student = tiny_model()
    options = dict(decay=0.999, warmup_steps=1, every=2, ramp=ramp, ramp_power=0.75, ramp_gamma=1.0)
    teacher = EMATeacher(student, **options)
    for _ in range(9):
        randomize_(student, generator)
        teacher.update(student)
    saved = copy.deepcopy(teacher.state_dict())
    restored = EMATeacher(tiny_model(), **options)
    assert restored.decay_at(restored.num_updates) == 0.0  # a fresh teacher would restart the ramp
    restored.load_state_dict(saved)
    assert (restored.calls, restored.num_updates) == (9, 4)
    assert 0.0 < restored.decay_at(restored.num_updates) < 0.999  # mid-ramp: the test can tell
    for _ in range(6):
        randomize_(student, generator)
        assert restored.decay_at(restored.num_updates) == teacher.decay_at(teacher.num_updates)
        teacher.update(student)
        restored.update(student)
    for (k, a), b in zip(teacher.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.ramp=mean", "teacher.ramp: invalid value 'mean'"),
        ("teacher.ramp=linear", "teacher.ramp: invalid value 'linear'"),
        ("teacher.ramp_power=0", "teacher.ramp_power: must be > 0"),
        ("teacher.ramp_power=-0.5", "teacher.ramp_power: must be > 0"),
        ("teacher.ramp_gamma=0", "teacher.ramp_gamma: must be > 0"),
    ],
)
def test_ramp_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_ramp_config_defaults_and_constructor_errors():
    cfg = load_config(None, ["teacher.ramp=power", "teacher.ramp_power=0.75"])
    assert (cfg.teacher.ramp, cfg.teacher.ramp_power, cfg.teacher.ramp_gamma) == ("power", 0.75, 1.0)
    default = load_config(None, []).teacher
    assert (default.ramp, default.ramp_power, default.ramp_gamma) == ("none", 2 / 3, 1.0)
    with pytest.raises(ValueError, match="teacher.ramp: must be one of none, mean_teacher, power"):
        EMATeacher(tiny_model(), ramp="cosine")
    with pytest.raises(ValueError, match="teacher.ramp_power: must be > 0"):
        EMATeacher(tiny_model(), ramp="power", ramp_power=0.0)


@pytest.mark.parametrize(
    "field, value", [("decay", 1.5), ("warmup_steps", -1), ("every", 0), ("ramp_power", 0.0), ("ramp_gamma", -1.0)]
)
def test_teacher_settings_are_checked_in_one_place(field, value):
    """The constructor and the config raise the same message, naming ``teacher.<field>``."""
    with pytest.raises(ValueError) as constructor:
        EMATeacher(tiny_model(), **{field: value})
    with pytest.raises(ConfigError) as config:
        load_config(None, [f"teacher.{field}={value}"])
    assert str(constructor.value) == str(config.value)
    assert str(config.value).startswith(f"teacher.{field}: must")

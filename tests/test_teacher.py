"""EMA teacher: equals a reference loop; never part of autograd."""

import copy

import pytest
import torch
from torch import nn

from nrd_dist.models import build_model
from nrd_dist.teacher import EMATeacher


def reference_ema(states, decay, warmup_steps=0, every=1):
    """Independent loop over plain state dicts (DESIGN.md section 1, paper eq. 24)."""
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

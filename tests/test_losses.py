"""Tests for nrd_dist.losses: JSD numerics, NRD, the baselines and the registry.

Reference values come from hand computation (in the comments) and from plain-Python
float64 loops written straight from docs/design.md section 1, independent of the module.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nrd_dist.losses import LOSSES, build_loss, generalized_jsd, gjs_scale

C = 5
B = 6


# ------------------------------------------------------------ float64 references


def ref_softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_onehot(label, num_classes):
    return [1.0 if c == label else 0.0 for c in range(num_classes)]


def ref_jsd(dists, pi):
    """JSD_pi for one sample: sum_i pi_i KL(p_i || m), log m clamped at 1e-7, 0 log 0 = 0."""
    num_classes = len(dists[0])
    mixture = [sum(w * d[c] for w, d in zip(pi, dists)) for c in range(num_classes)]
    total = 0.0
    for w, d in zip(pi, dists):
        kl = 0.0
        for c in range(num_classes):
            if d[c] > 0.0:
                kl += d[c] * (math.log(d[c]) - math.log(min(max(mixture[c], 1e-7), 1.0)))
        total += w * kl
    return total


def ref_scale(pi1):
    return -1.0 / ((1.0 - pi1) * math.log(1.0 - pi1))


def ref_batch(per_sample, logits, target, *extra):
    """Mean over the batch of per_sample(p_row, label, *extra_rows) in float64."""
    rows = [ref_softmax(r) for r in logits.double().tolist()]
    extra_rows = [e.double().tolist() for e in extra]
    values = [per_sample(p, y, *(e[i] for e in extra_rows)) for i, (p, y) in enumerate(zip(rows, target.tolist()))]
    return sum(values) / len(values)


def close(actual, expected, tol=1e-5):
    actual, expected = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (actual, expected))
    assert math.isclose(actual, expected, rel_tol=tol, abs_tol=tol), (actual, expected)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(B, C, generator=gen)
    target = torch.randint(0, C, (B,), generator=gen)
    teacher = F.softmax(3.0 * torch.randn(B, C, generator=gen), dim=1)
    # One teacher row with an exact zero, as a confident teacher can produce.
    teacher[0] = torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0])
    return logits, target, teacher


# ----------------------------------------------------------------- generalized_jsd


def test_jsd_of_identical_distributions_is_zero():
    gen = torch.Generator().manual_seed(1)
    p = F.softmax(4.0 * torch.randn(8, 10, generator=gen), dim=1)
    for pi in ([0.5, 0.5], [0.2, 0.3, 0.5], [0.1, 0.1, 0.1, 0.7]):
        value = generalized_jsd([p] * len(pi), pi, reduction="none")
        assert value.shape == (8,)
        assert torch.allclose(value, torch.zeros(8), atol=1e-6)


def test_js_hand_computed_two_classes():
    # y = [1, 0], p_s = softmax([0, 0]) = [.5, .5], pi = [.5, .5]:
    # m = [.75, .25]; KL(y||m) = -log .75 = 0.2876821; the 0 log 0 entry of y adds 0.
    # KL(p||m) = .5 log(.5/.75) + .5 log(.5/.25) = 0.1438410.
    # JSD = .5 * 0.2876821 + .5 * 0.1438410 = 0.2157616; scaled: * 2/ln 2 = 0.6225482.
    logits, target = torch.zeros(1, 2), torch.tensor([0])
    close(build_loss("js", pi=[0.5, 0.5], scale=False)(logits, target), 0.2157616)
    close(build_loss("js", pi=[0.5, 0.5], scale=True)(logits, target), 0.6225482)


def test_nrd_hand_computed_two_classes_with_zero_teacher_entry():
    # y = [1, 0], p_s = [.5, .5], p_t = [0, 1], pi = [.5, .25, .25]:
    # m = .5[1, 0] + .25[.5, .5] + .25[0, 1] = [.625, .375]
    # KL(y||m) = -log .625 = 0.4700036
    # KL(p_s||m) = .5 log(.5/.625) + .5 log(.5/.375) = 0.0322693
    # KL(p_t||m) = -log .375 = 0.9808293   (0 log 0 = 0 for p_t's zero entry)
    # JSD = .5 * 0.4700036 + .25 * 0.0322693 + .25 * 0.9808293 = 0.4882765
    loss = build_loss("nrd", pi=[0.5, 0.25, 0.25])
    value = loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(value)
    close(value, 0.4882765)


def test_zero_probabilities_give_finite_loss_and_gradient():
    # The student softmax underflows to exact zeros in fp32: the loss and its gradient
    # must stay finite (xlogy(p, p) would give a NaN gradient here).
    logits = torch.tensor([[0.0, -1e4, -1e4], [50.0, 0.0, -1e4]], requires_grad=True)
    assert (F.softmax(logits, dim=1) == 0).any()
    target = torch.tensor([0, 1])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for name, params in [
        ("nrd", {"pi": [0.4, 0.3, 0.3]}),
        ("js", {"pi": [0.5, 0.5]}),
        ("gjs", {"pi": [0.5, 0.5]}),
        ("ce_nrd", {"pi": [0.4, 0.3, 0.3]}),
    ]:
        logits.grad = None
        value = build_loss(name, **params)(logits, target, teacher)
        value.backward()
        assert torch.isfinite(value), name
        assert torch.isfinite(logits.grad).all(), name


# ----------------------------------------------------------------------- scaling


def test_gjs_scale_value_and_guard():
    # pi1 = .5: -1 / (.5 * log .5) = 2 / ln 2 = 2.8853901
    close(gjs_scale(0.5), 2.8853901)
    assert gjs_scale(0.0) == 1.0 and gjs_scale(1.0) == 1.0

    gen = torch.Generator().manual_seed(2)
    views = [torch.randn(4, C, generator=gen) for _ in range(2)]
    target = torch.randint(0, C, (4,), generator=gen)
    scaled = build_loss("gjs", pi=[0.5, 0.25, 0.25], scale=True)(views, target)
    plain = build_loss("gjs", pi=[0.5, 0.25, 0.25], scale=False)(views, target)
    close(scaled, 2.8853901 * plain.item())

    for pi in ([0.0, 0.5, 0.5], [1.0, 0.0, 0.0]):
        scaled = build_loss("gjs", pi=pi, scale=True)(views, target)
        plain = build_loss("gjs", pi=pi, scale=False)(views, target)
        assert torch.isfinite(scaled)
        assert float(scaled) == float(plain)


# ------------------------------------------------------------ gradients, precision


@pytest.mark.parametrize("name", ["nrd", "ce_nrd"])
def test_no_gradient_reaches_teacher(batch, name):
    logits, target, teacher = batch
    logits = logits.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    build_loss(name, pi=[0.3, 0.4, 0.3])(logits, target, teacher).backward()
    assert teacher.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_student_gradient_flows_through_teacher_term():
    # With pi_student = 0 the student appears only through m: gradient must still flow.
    logits = torch.randn(3, C, generator=torch.Generator().manual_seed(3), requires_grad=True)
    teacher = F.softmax(torch.randn(3, C), dim=1)
    build_loss("nrd", pi=[0.5, 0.0, 0.5])(logits, torch.tensor([0, 1, 2]), teacher).backward()
    assert logits.grad.abs().sum() == 0  # weight 0: the student is absent from m too
    logits.grad = None
    build_loss("nrd", pi=[0.4, 0.2, 0.4])(logits, torch.tensor([0, 1, 2]), teacher).backward()
    assert logits.grad.abs().sum() > 0


ALL_PARAMS = {
    "nrd": {"pi": [0.3, 0.4, 0.3]},
    "ce": {},
    "bs": {},
    "ls": {},
    "sce": {"alpha": 0.1, "beta": 1.0},
    "gce": {},
    "nce_rce": {"alpha": 1.0, "beta": 1.0},
    "js": {"pi": [0.5, 0.5]},
    "gjs": {"pi": [0.5, 0.25, 0.25]},
    "ce_nrd": {"pi": [0.3, 0.4, 0.3]},
}


@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_fp32_under_bf16_autocast(batch, name):
    _, target, teacher = batch
    gen = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(8, C)
    x = torch.randn(B, 8, generator=gen)
    loss = build_loss(name, **ALL_PARAMS[name])
    views = 2 if loss.multi_view else 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [layer(x + 0.1 * i) for i in range(views)]
        assert logits[0].dtype == torch.bfloat16
        value = loss(logits if loss.multi_view else logits[0], target, teacher.bfloat16())
    assert value.dtype == torch.float32 and value.dim() == 0
    # Same bf16 inputs, computed in fp32 outside autocast.
    upcast = [view.float() for view in logits]
    expected = loss(upcast if loss.multi_view else upcast[0], target, teacher.bfloat16().float())
    close(value, expected, tol=1e-6)
    # And close to the full fp32 computation (bf16 only rounded the inputs).
    full = [layer(x + 0.1 * i) for i in range(views)]
    close(value, loss(full if loss.multi_view else full[0], target, teacher), tol=5e-2)


def test_autocast_is_off_inside_losses():
    # CPU autocast leaves fp32 softmax/log alone, so values alone cannot show it; on
    # CUDA it would not. Check the mechanism directly.
    from nrd_dist.losses import NoiseRobustLoss

    seen = []

    class Probe(NoiseRobustLoss):
        def compute(self, student_logits, target, teacher_probs):
            seen.append((torch.is_autocast_enabled("cpu"), student_logits.dtype))
            return student_logits.sum(dim=1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        Probe()(torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]))
        jsd = generalized_jsd([torch.full((2, 3), 1 / 3, dtype=torch.bfloat16)] * 2, [0.5, 0.5])
    assert seen == [(False, torch.float32)]
    assert jsd.dtype == torch.float32


# ----------------------------------------------------------------------- GCE limits


def test_gce_limits(batch):
    logits, target, _ = batch
    p_y = F.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    close(build_loss("gce", q=1.0)(logits, target), float((1 - p_y).mean()), tol=1e-6)
    close(build_loss("gce", q=1e-6)(logits, target), float(F.cross_entropy(logits, target)), tol=1e-4)
    with pytest.raises(ValueError, match="q"):
        build_loss("gce", q=0.0)
    with pytest.raises(ValueError, match="q"):
        build_loss("gce", q=1.5)


# --------------------------------------------------- against float64 references


def test_nrd_js_gjs_match_reference(batch):
    logits, target, teacher = batch
    for pi in ([0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.0, 0.5, 0.5]):
        for scale in (False, True):
            factor = ref_scale(pi[0]) if scale and 0 < pi[0] < 1 else 1.0
            expected = ref_batch(
                lambda p, y, t, factor=factor, pi=pi: factor * ref_jsd([ref_onehot(y, C), p, t], pi),
                logits,
                target,
                teacher,
            )
            close(build_loss("nrd", pi=pi, scale=scale)(logits, target, teacher), expected)

    for pi in ([0.5, 0.5], [0.9, 0.1], [0.3, 0.7]):
        expected = ref_batch(lambda p, y, pi=pi: ref_scale(pi[0]) * ref_jsd([ref_onehot(y, C), p], pi), logits, target)
        close(build_loss("js", pi=pi)(logits, target), expected)

    gen = torch.Generator().manual_seed(5)
    for pi in ([0.5, 0.25, 0.25], [0.3, 0.2, 0.2, 0.3]):
        views = [logits + torch.randn(B, C, generator=gen) for _ in range(len(pi) - 1)]
        rows = [[ref_softmax(r) for r in v.double().tolist()] for v in views]
        per_sample = [
            ref_scale(pi[0]) * ref_jsd([ref_onehot(y, C)] + [r[i] for r in rows], pi)
            for i, y in enumerate(target.tolist())
        ]
        close(build_loss("gjs", pi=pi)(views, target), sum(per_sample) / B)


def test_baselines_match_reference(batch):
    logits, target, teacher = batch

    def rce(p, y):
        return -sum(p[c] * math.log(min(max(ref_onehot(y, C)[c], 1e-4), 1.0)) for c in range(C))

    def nce(p, y):
        return -math.log(p[y]) / -sum(math.log(pc) for pc in p)

    beta, eps, q = 0.7, 0.2, 0.5
    cases = {
        ("ce", ()): lambda p, y: -math.log(p[y]),
        ("bs", (("beta", beta),)): lambda p, y: (
            -sum((beta * ref_onehot(y, C)[c] + (1 - beta) * p[c]) * math.log(p[c]) for c in range(C))
        ),
        ("ls", (("epsilon", eps),)): lambda p, y: (
            -sum(((1 - eps) * ref_onehot(y, C)[c] + eps / C) * math.log(p[c]) for c in range(C))
        ),
        ("sce", (("alpha", 0.1), ("beta", 1.0))): lambda p, y: 0.1 * -math.log(p[y]) + 1.0 * rce(p, y),
        ("nce_rce", (("alpha", 10.0), ("beta", 0.1))): lambda p, y: 10.0 * nce(p, y) + 0.1 * rce(p, y),
        ("gce", (("q", q),)): lambda p, y: (1 - p[y] ** q) / q,
    }
    for (name, params), formula in cases.items():
        close(build_loss(name, **dict(params))(logits, target), ref_batch(formula, logits, target))

    # Defaults as documented: bs beta = .8, ls epsilon = .1, gce q = .7.
    close(
        build_loss("bs")(logits, target),
        ref_batch(
            lambda p, y: -sum((0.8 * ref_onehot(y, C)[c] + 0.2 * p[c]) * math.log(p[c]) for c in range(C)),
            logits,
            target,
        ),
    )
    close(
        build_loss("ls")(logits, target),
        ref_batch(
            lambda p, y: -sum((0.9 * ref_onehot(y, C)[c] + 0.1 / C) * math.log(p[c]) for c in range(C)), logits, target
        ),
    )
    close(build_loss("gce")(logits, target), ref_batch(lambda p, y: (1 - p[y] ** 0.7) / 0.7, logits, target))

    # ce_nrd = CE + JSD over (student, teacher) with weights pi[1:] renormalised.
    pi = [0.2, 0.6, 0.2]
    for scale in (False, True):
        factor = ref_scale(pi[0]) if scale else 1.0
        expected = ref_batch(
            lambda p, y, t, factor=factor: -math.log(p[y]) + factor * ref_jsd([p, t], [0.75, 0.25]),
            logits,
            target,
            teacher,
        )
        close(build_loss("ce_nrd", pi=pi, scale=scale)(logits, target, teacher), expected)


def test_bootstrap_keeps_the_entropy_gradient(batch):
    # BS = beta CE + (1 - beta) H(p) with p *not* detached in the target, so
    # d loss / d z_k = [beta (p_k - y_k) - (1 - beta) p_k (log p_k + H(p))] / B.
    # A detached p would leave only the first term (CE with a smaller step).
    logits, target, _ = batch
    beta = 0.8
    logits = logits.clone().requires_grad_(True)
    build_loss("bs", beta=beta)(logits, target).backward()
    p = F.softmax(logits.detach().double(), dim=1)
    log_p = torch.log(p)
    entropy = -(p * log_p).sum(dim=1, keepdim=True)
    ce_part = beta * (p - F.one_hot(target, C))
    entropy_part = -(1 - beta) * p * (log_p + entropy)
    expected = (ce_part + entropy_part) / B
    assert torch.allclose(logits.grad.double(), expected, atol=1e-6)
    assert not torch.allclose(logits.grad.double(), ce_part / B, atol=1e-4)  # the entropy term is there


# ------------------------------------------------------------ registry and errors


def test_registry_and_flags():
    assert set(LOSSES) == set(ALL_PARAMS)
    assert {n for n, cls in LOSSES.items() if cls.needs_teacher} == {"nrd", "ce_nrd"}
    assert {n for n, cls in LOSSES.items() if cls.multi_view} == {"gjs"}
    for name, params in ALL_PARAMS.items():
        assert isinstance(build_loss(name, **params), LOSSES[name])


def test_build_errors(batch):
    logits, target, _ = batch
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*ce_nrd.*nrd"):
        build_loss("nope")
    with pytest.raises(ValueError, match="sum to 1"):
        build_loss("nrd", pi=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 entries"):
        build_loss("nrd", pi=[0.5, 0.5])
    with pytest.raises(ValueError, match="2 entries"):
        build_loss("js", pi=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        build_loss("js", pi=[1.5, -0.5])
    with pytest.raises(ValueError, match=r"pi\[1\] \+ pi\[2\]"):
        build_loss("ce_nrd", pi=[1.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="temperature"):
        build_loss("ce", temperature=2.0)
    with pytest.raises(TypeError, match="alpha"):
        build_loss("sce", beta=1.0)
    with pytest.raises(TypeError, match="pi"):
        build_loss("nrd")
    with pytest.raises(TypeError, match="scale"):
        build_loss("js", pi=[0.5, 0.5], scale="yes")
    with pytest.raises(ValueError, match="teacher_probs"):
        build_loss("nrd", pi=[0.3, 0.4, 0.3])(logits, target)
    with pytest.raises(ValueError, match="expected 2 student views"):
        build_loss("gjs", pi=[0.5, 0.25, 0.25])([logits], target)
    with pytest.raises(ValueError, match="sum to 1"):
        generalized_jsd([logits.softmax(1)] * 2, [0.5, 0.6])


@pytest.mark.parametrize(
    "name, params, message",
    [
        # Messages start with the parameter's name: the config reports them as loss.<name>.
        ("gce", {"q": 1.5}, r"^q: must lie in \(0, 1\], got 1\.5$"),
        ("ls", {"epsilon": -0.1}, r"^epsilon: must lie in \[0, 1\], got -0\.1$"),
        ("bs", {"beta": 2}, r"^beta: must lie in \[0, 1\], got 2\.0$"),
        ("sce", {"alpha": -1, "beta": 1}, r"^alpha: must be >= 0, got -1\.0$"),
        ("nce_rce", {"alpha": 1, "beta": -2}, r"^beta: must be >= 0, got -2\.0$"),
        ("nrd", {"pi": [0.5, 0.5]}, r"^pi: must have 3 entries \[label, student, teacher\], got 2"),
        ("gjs", {"pi": [0.5, 0.25]}, r"^pi: weights must be non-negative and sum to 1 \(on the simplex"),
        ("gjs", {"pi": [1.0]}, r"^pi: must have 1 \+ M >= 2 entries"),
        ("ce_nrd", {"pi": [1.0, 0.0, 0.0]}, r"^pi: pi\[1\] \+ pi\[2\]"),
    ],
)
def test_parameter_errors_start_with_the_parameter(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **params)


def test_missing_and_mistyped_parameters_name_it():
    with pytest.raises(TypeError, match=r"^pi: required by loss 'js' \(no default\)$"):
        build_loss("js")
    with pytest.raises(TypeError, match=r"^scale: must be true or false, got 'yes'$"):
        build_loss("nrd", pi=[0.3, 0.4, 0.3], scale="yes")


def test_jsd_losses_share_one_base_and_their_repr():
    from nrd_dist.losses import JSDLoss

    assert {n for n, cls in LOSSES.items() if issubclass(cls, JSDLoss)} == {"nrd", "js", "gjs", "ce_nrd"}
    # Each keeps its own scale default (the GJS code scales js/gjs, the NRD paper not nrd).
    assert [build_loss(n, **ALL_PARAMS[n]).scale for n in ("nrd", "js", "gjs", "ce_nrd")] == [False, True, True, False]
    assert repr(build_loss("nrd", pi=[0.1, 0.8, 0.1])) == "NRDLoss(pi=[0.1, 0.8, 0.1], scale=False)"
    assert repr(build_loss("gjs", pi=[0.5, 0.25, 0.25])) == "GJSLoss(pi=[0.5, 0.25, 0.25], scale=True)"
    assert repr(build_loss("sce", alpha=0.1, beta=1)) == "SCELoss(alpha=0.1, beta=1.0)"
    assert repr(build_loss("ce")) == "CELoss()"
    assert build_loss("gjs", pi=[0.4, 0.2, 0.2, 0.2]).num_views == 3

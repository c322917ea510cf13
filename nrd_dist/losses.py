"""Losses for learning with noisy labels: NRD and the baselines of the paper's Table 2.

Every loss is an ``nn.Module`` built by name through :func:`build_loss` and called as
``loss(student_logits, target, teacher_probs=None)``:

* ``student_logits``: float tensor ``[B, C]`` of unnormalised scores, or for multi-view
  losses (``gjs``) a list of such tensors, one per student augmented view;
* ``target``: int64 tensor ``[B]`` of (possibly noisy) class indices in ``[0, C)``;
* ``teacher_probs``: float tensor ``[B, C]`` of teacher probabilities (rows on the
  simplex), required by losses with ``needs_teacher = True`` and ignored otherwise.
  It is always detached: no gradient reaches the teacher.

The result is a float32 scalar, the mean over the batch of a per-sample loss in nats.
All arithmetic runs in fp32 with autocast disabled, whatever the caller's precision:
the JSD takes logs of probabilities that bf16 cannot resolve (its 8-bit mantissa
rounds 1 - 1e-3 to 1), and the clamps below assume fp32.

Class attributes the train loop reads:

* ``needs_teacher``: whether the loss uses ``teacher_probs`` (if not, the teacher
  forward is skipped entirely);
* ``multi_view``: whether ``student_logits`` is a list of views.

A loss is the one judge of its parameters: an invalid one raises a ``ValueError`` (a
``TypeError`` for a wrong type or a missing one) whose message starts with the
parameter's name (``q: must lie in (0, 1], got 1.5``), so that the config reports it
under its own key (``loss.q``) without checking anything itself.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "build_loss",
    "generalized_jsd",
    "gjs_scale",
    "NoiseRobustLoss",
    "JSDLoss",
]

# Floor for the mixture before its log (docs/design.md section 1): keeps log m finite when
# every distribution puts (numerically) zero mass on a class.
MIXTURE_EPS = 1e-7
# Tolerance on sum(pi) == 1.
SIMPLEX_TOL = 1e-6
# pi1 this close to 0 or 1 makes the GJS scale 0 * log 0 or 1 / 0: no scaling there.
SCALE_GUARD = 1e-12


# --------------------------------------------------------------------------- helpers


# Looked up once here for the usual device types: torch.compile (torch 2.11) cannot trace
# is_autocast_available and broke every compiled loss into pieces at that call
# (measured on an H100). Other device types are asked each time.
AUTOCAST_AVAILABLE = {
    device_type: torch.amp.is_autocast_available(device_type) for device_type in ("cpu", "cuda", "xpu", "mps", "hpu")
}


@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device`` (a no-op where autocast does not exist)."""
    available = AUTOCAST_AVAILABLE.get(device.type)
    if available is None:
        available = torch.amp.is_autocast_available(device.type)
    if available:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * log p`` with ``0 * log 0 = 0`` and a finite gradient at 0.

    ``torch.xlogy(p, p)`` has the right value but a NaN gradient where ``p == 0``
    (its backward computes ``p / p``); a student softmax can underflow to exactly 0 in
    fp32, so the masked form is used instead.
    """
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return torch.where(positive, p * torch.log(safe), torch.zeros_like(p))


def generalized_jsd(dists: Sequence[torch.Tensor], pi: Sequence[float], reduction: str = "mean") -> torch.Tensor:
    """Generalized Jensen-Shannon divergence ``JSD_pi(p_1, ..., p_k)`` in nats.

    ``JSD_pi = sum_i pi_i * KL(p_i || m)`` with ``m = sum_i pi_i * p_i``, where
    ``KL(p || m) = sum_c p_c * (log p_c - log clamp(m_c, 1e-7, 1))`` and ``0 log 0 = 0``.

    Args:
        dists: ``k`` probability tensors of the same shape ``[B, C]`` (rows on the
            simplex). Gradients flow through every one that requires them (through
            its own term and through ``m``); detach beforehand what must not learn.
        pi: ``k`` non-negative weights summing to 1.
        reduction: ``"mean"`` (scalar, mean over the batch) or ``"none"`` (``[B]``).

    Returns:
        The divergence as a float32 tensor (computed in fp32 with autocast off).
    """
    if len(dists) != len(pi):
        raise ValueError(f"generalized_jsd: {len(dists)} distributions but {len(pi)} weights")
    if len(dists) == 0:
        raise ValueError("generalized_jsd: needs at least one distribution")
    if reduction not in ("mean", "none"):
        raise ValueError(f"generalized_jsd: reduction must be 'mean' or 'none', got {reduction!r}")
    _check_simplex(pi, len(pi))
    with _autocast_off(dists[0].device):
        probs = [d.float() for d in dists]
        mixture = sum(w * p for w, p in zip(pi, probs))
        log_mixture = torch.log(torch.clamp(mixture, MIXTURE_EPS, 1.0))
        per_sample = sum(w * (_plogp(p) - p * log_mixture).sum(dim=-1) for w, p in zip(pi, probs))
    return per_sample.mean() if reduction == "mean" else per_sample


def gjs_scale(pi1: float) -> float:
    """The GJS scaling ``-1 / ((1 - pi1) * log(1 - pi1))`` for label weight ``pi1``.

    It makes the JS loss tend to CE as ``pi1 -> 1`` and keeps losses with different
    ``pi1`` on comparable scales. At ``pi1`` in {0, 1} (within 1e-12) the expression
    is undefined (1/0), so the factor is 1: no scaling.
    """
    if pi1 <= SCALE_GUARD or pi1 >= 1.0 - SCALE_GUARD:
        return 1.0
    return -1.0 / ((1.0 - pi1) * math.log(1.0 - pi1))


def _check_simplex(pi: Sequence[float], length: int, roles: Sequence[str] = ()) -> list[float]:
    """``pi`` as ``length`` floats on the simplex; ``roles`` name the entries for the message."""
    if isinstance(pi, (str, bytes)) or not isinstance(pi, Sequence):
        raise TypeError(f"pi: must be a list of {length} floats, got {pi!r}")
    if len(pi) != length:
        named = f" [{', '.join(roles)}]" if roles else ""
        raise ValueError(f"pi: must have {length} entries{named}, got {len(pi)}: {list(pi)}")
    try:
        weights = [float(w) for w in pi]
    except (TypeError, ValueError):
        raise TypeError(f"pi: must be a list of floats, got {list(pi)!r}") from None
    total = sum(weights)
    if any(not math.isfinite(w) or w < 0.0 for w in weights) or abs(total - 1.0) > SIMPLEX_TOL:
        raise ValueError(
            f"pi: weights must be non-negative and sum to 1 (on the simplex, within {SIMPLEX_TOL:g}), "
            f"got {weights} (sum {total:.6g})"
        )
    return weights


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: must be true or false, got {value!r}")
    return value


def _check_range(value: object, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: must be a number, got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    if below or value > high or not math.isfinite(value):
        raise ValueError(f"{name}: must {_interval(low, high, low_open)}, got {value}")
    return value


def _interval(low: float, high: float, low_open: bool) -> str:
    if high == math.inf:
        return f"be {'>' if low_open else '>='} {low:g}"
    return f"lie in {'(' if low_open else '['}{low:g}, {high:g}]"


def _rce(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reverse cross entropy ``-sum_c p_c log clamp(onehot_c, 1e-4, 1)``, per sample ``[B]``.

    Since log 1 = 0 this is ``-log(1e-4) * (1 - p_y)``: an MAE-like term, bounded.
    """
    return -math.log(1e-4) * (1.0 - probs.gather(1, target[:, None]).squeeze(1))


# ------------------------------------------------------------------------ base class


class NoiseRobustLoss(nn.Module):
    """Base class: input checks, fp32 casting and autocast-off for every loss.

    Subclasses implement :meth:`compute` on fp32 inputs and return the per-sample
    loss ``[B]``; :meth:`forward` averages it over the batch.
    """

    needs_teacher: bool = False
    multi_view: bool = False
    name: str = ""

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss over the batch (float32 scalar, nats). Shapes: see the module doc."""
        views = self._views(student_logits)
        batch, num_classes = views[0].shape
        if target.shape != (batch,):
            raise ValueError(f"{self.name}: target must have shape [{batch}], got {list(target.shape)}")
        if self.needs_teacher:
            if teacher_probs is None:
                raise ValueError(f"loss '{self.name}' needs teacher_probs (the EMA teacher's softmax), got None")
            if teacher_probs.shape != views[0].shape:
                raise ValueError(
                    f"{self.name}: teacher_probs shape {list(teacher_probs.shape)} != "
                    f"student_logits shape {list(views[0].shape)}"
                )
        with _autocast_off(views[0].device):
            views = [v.float() for v in views]
            # Stop-grad: the teacher is an EMA of the student, never trained by the loss.
            teacher = teacher_probs.detach().float() if self.needs_teacher else None
            per_sample = self.compute(views if self.multi_view else views[0], target, teacher)
            return per_sample.mean()

    def _views(self, student_logits) -> list[torch.Tensor]:
        if isinstance(student_logits, torch.Tensor):
            views = [student_logits]
        elif self.multi_view and isinstance(student_logits, (list, tuple)):
            views = list(student_logits)
        else:
            kind = "a tensor or a list of tensors" if self.multi_view else "a tensor [B, C]"
            raise TypeError(f"{self.name}: student_logits must be {kind}, got {type(student_logits).__name__}")
        if not views or any(v.dim() != 2 or v.shape != views[0].shape for v in views):
            raise ValueError(
                f"{self.name}: student_logits must be [B, C] tensor(s) of one shape, "
                f"got {[list(v.shape) for v in views]}"
            )
        return views

    def compute(self, student_logits, target: torch.Tensor, teacher_probs: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss ``[B]`` from fp32 inputs (autocast already off)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        # Each loss keeps its checked parameters as attributes of the same names: "pi=[...], scale=False".
        return ", ".join(f"{name}={getattr(self, name)}" for name in _parameters(type(self)))


def _parameters(cls: type[NoiseRobustLoss]) -> dict[str, inspect.Parameter]:
    """The loss's parameters: the named arguments of its ``__init__``.

    Named ones only: classes without an ``__init__`` of their own inherit nn.Module's
    ``(*args, **kwargs)``, which takes nothing here.
    """
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


LOSSES: dict[str, type[NoiseRobustLoss]] = {}


def _register(name: str):
    def wrap(cls: type[NoiseRobustLoss]) -> type[NoiseRobustLoss]:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return wrap


def build_loss(name: str, **params) -> NoiseRobustLoss:
    """Build the loss registered as ``name`` with keyword ``params``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or a
            parameter value out of range.
        TypeError: an unknown or missing parameter or one of the wrong type.
        Messages about a parameter start with its name (see the module doc).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    accepted = _parameters(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"{', '.join(unknown)}: not a parameter of loss {name!r} (it takes {', '.join(accepted) or 'none'})"
        )
    missing = [p for p, spec in accepted.items() if spec.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise TypeError(f"{missing[0]}: required by loss {name!r} (no default)")
    return cls(**params)


# ------------------------------------------------------------------ JSD-based losses


def _onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target, num_classes).float()


class JSDLoss(NoiseRobustLoss):
    """Base of the losses built on :func:`generalized_jsd` (``nrd``, ``js``, ``gjs``,
    ``ce_nrd``): it checks ``pi`` and ``scale`` and fixes the GJS factor of ``pi[0]``.

    Subclasses keep ``pi`` and ``scale`` in their own ``__init__``, whose signature is
    what ``build_loss`` and the config read (each loss has its own ``scale`` default),
    and pass the roles of ``pi``'s entries on (error messages list them).
    """

    def __init__(self, pi: Sequence[float], scale: bool, roles: Sequence[str]):
        super().__init__()
        self.pi = _check_simplex(pi, len(roles), roles)
        self.scale = _check_bool(scale, "scale")
        self.factor = gjs_scale(self.pi[0]) if self.scale else 1.0

    def label_jsd(self, target: torch.Tensor, probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per sample, ``factor * JSD_pi(onehot(y), *probs)``."""
        dists = [_onehot(target, probs[0].shape[1]), *probs]
        return self.factor * generalized_jsd(dists, self.pi, reduction="none")


@_register("nrd")
class NRDLoss(JSDLoss):
    """Noise-Robust Distillation: ``JSD_pi(onehot(y), softmax(student), teacher_probs)``.

    Args:
        pi: weights ``[label, student, teacher]`` on the simplex.
        scale: multiply by the GJS factor of ``pi[0]`` (see :func:`gjs_scale`).
    """

    needs_teacher = True

    def __init__(self, pi: Sequence[float], scale: bool = False):
        super().__init__(pi, scale, ("label", "student", "teacher"))

    def compute(self, student_logits, target, teacher_probs):
        return self.label_jsd(target, [F.softmax(student_logits, dim=1), teacher_probs])


@_register("js")
class JSLoss(JSDLoss):
    """JS loss (Englesson & Azizpour, 2021): ``JSD_pi(onehot(y), softmax(student))``.

    Args:
        pi: weights ``[label, student]`` on the simplex.
        scale: multiply by the GJS factor of ``pi[0]`` (see :func:`gjs_scale`).
    """

    def __init__(self, pi: Sequence[float], scale: bool = True):
        super().__init__(pi, scale, ("label", "student"))

    def compute(self, student_logits, target, teacher_probs):
        return self.label_jsd(target, [F.softmax(student_logits, dim=1)])


@_register("gjs")
class GJSLoss(JSDLoss):
    """GJS loss: ``JSD_pi(onehot(y), softmax(view_1), ..., softmax(view_M))``.

    ``student_logits`` is a list of ``M = len(pi) - 1`` tensors ``[B, C]``, the student's
    logits on ``M`` augmented views of the same batch (a single tensor is accepted
    when ``M == 1``).

    Args:
        pi: ``1 + M`` weights ``[label, view_1, ..., view_M]`` on the simplex.
        scale: multiply by the GJS factor of ``pi[0]`` (see :func:`gjs_scale`).
    """

    multi_view = True

    def __init__(self, pi: Sequence[float], scale: bool = True):
        super().__init__(pi, scale, _view_roles(pi))

    @property
    def num_views(self) -> int:
        """Student views per sample the train loop must build (``len(pi) - 1``)."""
        return len(self.pi) - 1

    def compute(self, student_logits, target, teacher_probs):
        if len(student_logits) != self.num_views:
            raise ValueError(f"gjs: expected {self.num_views} student views (len(pi) - 1), got {len(student_logits)}")
        return self.label_jsd(target, [F.softmax(v, dim=1) for v in student_logits])


def _view_roles(pi: object) -> list[str]:
    """``["label", "view_1", ..., "view_M"]`` for GJS weights: ``pi``'s length sets ``M``."""
    length = len(pi) if isinstance(pi, Sequence) and not isinstance(pi, (str, bytes)) else 0
    if length < 2:
        raise ValueError(f"pi: must have 1 + M >= 2 entries (label, then one per student view), got {pi!r}")
    return ["label"] + [f"view_{i}" for i in range(1, length)]


@_register("ce_nrd")
class CENRDLoss(JSDLoss):
    """NRD on top of CE (paper Fig. 5): ``CE(student, y) + JSD_pi'(p_s, p_t)``.

    ``pi' = (pi[1], pi[2]) / (pi[1] + pi[2])``. The label enters once, through CE, which
    replaces the JSD's label term; the distillation term is the JSD between student
    and (detached) teacher, weighted as in ``nrd`` with the label weight removed. So
    the same ``loss.pi`` can be used for ``nrd`` and ``ce_nrd``.

    Args:
        pi: weights ``[label, student, teacher]`` on the simplex, ``pi[1] + pi[2] > 0``.
        scale: multiply the JSD term by the GJS factor of ``pi[0]`` (the factor ``nrd``
            would use with this ``pi``); CE is never scaled.
    """

    needs_teacher = True

    def __init__(self, pi: Sequence[float], scale: bool = False):
        super().__init__(pi, scale, ("label", "student", "teacher"))
        distill = self.pi[1] + self.pi[2]
        if distill <= 0.0:
            raise ValueError(f"pi: pi[1] + pi[2] (the student and teacher weights) must be > 0, got {self.pi}")
        self.pair_pi = [self.pi[1] / distill, self.pi[2] / distill]

    def compute(self, student_logits, target, teacher_probs):
        ce = F.cross_entropy(student_logits, target, reduction="none")
        jsd = generalized_jsd([F.softmax(student_logits, dim=1), teacher_probs], self.pair_pi, reduction="none")
        return ce + self.factor * jsd


# ------------------------------------------------------------------------- baselines


@_register("ce")
class CELoss(NoiseRobustLoss):
    """Cross entropy ``-log p_y``."""

    def compute(self, student_logits, target, teacher_probs):
        return F.cross_entropy(student_logits, target, reduction="none")


@_register("bs")
class BootstrapLoss(NoiseRobustLoss):
    """Soft bootstrapping (Reed et al., 2015): ``-sum_c (beta y_c + (1 - beta) p_c) log p_c``.

    The loss equals ``beta * CE + (1 - beta) * H(p)``: the model's own prediction in the
    target is *not* detached, so the second term is an entropy penalty whose gradient
    ``-(1 - beta) p_k (log p_k + H(p))`` pushes the model toward confident predictions
    (Reed et al.'s minimum-entropy reading; the GJS code, whose numbers the NRD paper
    reprints, keeps it too). Detaching ``p`` would leave ``beta * grad CE``: CE with a
    smaller step.

    Args:
        beta: weight of the given label, in [0, 1].
    """

    def __init__(self, beta: float = 0.8):
        super().__init__()
        self.beta = _check_range(beta, "beta", 0.0, 1.0)

    def compute(self, student_logits, target, teacher_probs):
        log_probs = F.log_softmax(student_logits, dim=1)
        soft_target = self.beta * _onehot(target, log_probs.shape[1]) + (1.0 - self.beta) * log_probs.exp()
        return -(soft_target * log_probs).sum(dim=1)


@_register("ls")
class LabelSmoothingLoss(NoiseRobustLoss):
    """Label smoothing: CE against ``(1 - epsilon) onehot(y) + epsilon / C``.

    Args:
        epsilon: smoothing mass spread uniformly over all ``C`` classes, in [0, 1].
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = _check_range(epsilon, "epsilon", 0.0, 1.0)

    def compute(self, student_logits, target, teacher_probs):
        return F.cross_entropy(student_logits, target, reduction="none", label_smoothing=self.epsilon)


@_register("sce")
class SCELoss(NoiseRobustLoss):
    """Symmetric CE (Wang et al., 2019): ``alpha CE + beta RCE``.

    ``RCE = -sum_c p_c log clamp(onehot_c, 1e-4, 1)``, i.e. ``A = log 1e-4`` (the
    paper's "A = -4" in log10 units).

    Args:
        alpha, beta: non-negative weights of CE and RCE.
    """

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha = _check_range(alpha, "alpha", 0.0, math.inf)
        self.beta = _check_range(beta, "beta", 0.0, math.inf)

    def compute(self, student_logits, target, teacher_probs):
        ce = F.cross_entropy(student_logits, target, reduction="none")
        return self.alpha * ce + self.beta * _rce(F.softmax(student_logits, dim=1), target)


@_register("gce")
class GCELoss(NoiseRobustLoss):
    """Generalized CE (Zhang & Sabuncu, 2018): ``(1 - p_y^q) / q``.

    Written as ``-expm1(q log p_y) / q`` so that it tends to CE (``-log p_y``) as
    ``q -> 0`` without cancellation, and equals ``1 - p_y`` (MAE up to a factor 2)
    at ``q = 1``.

    Args:
        q: in (0, 1].
    """

    def __init__(self, q: float = 0.7):
        super().__init__()
        self.q = _check_range(q, "q", 0.0, 1.0, low_open=True)

    def compute(self, student_logits, target, teacher_probs):
        log_p_y = F.log_softmax(student_logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return -torch.expm1(self.q * log_p_y) / self.q


@_register("nce_rce")
class NCERCELoss(NoiseRobustLoss):
    """Active-passive loss NCE+RCE (Ma et al., 2020): ``alpha NCE + beta RCE``.

    ``NCE = -log p_y / (-sum_k log p_k)`` (CE normalised over all candidate labels),
    ``RCE`` as in ``sce``.

    Args:
        alpha, beta: non-negative weights of NCE and RCE.
    """

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha = _check_range(alpha, "alpha", 0.0, math.inf)
        self.beta = _check_range(beta, "beta", 0.0, math.inf)

    def compute(self, student_logits, target, teacher_probs):
        log_probs = F.log_softmax(student_logits, dim=1)
        nce = log_probs.gather(1, target[:, None]).squeeze(1) / log_probs.sum(dim=1)
        return self.alpha * nce + self.beta * _rce(log_probs.exp(), target)

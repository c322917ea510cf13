"""Synthetic label noise as a pure function of (seed, sample key, clean label, spec).

Every noise kind but ``asymmetric_sequential`` (below) is the same two-step process,
applied to each sample alone:

1. with probability ``rate`` the sample is *corrupted*;
2. a corrupted sample's label is drawn from a per-class kernel ``K[clean]``:

   ==========================  ===============================================
   ``symmetric``               uniform over all C classes (may redraw itself,
                               so the realised flip rate is rate*(C-1)/C)
   ``symmetric_exclusive``     uniform over the C-1 other classes
   ``asymmetric``              the class ``map[clean]`` (itself if unmapped)
   ``matrix``                  row ``clean`` of an explicit row-stochastic matrix
   ==========================  ===============================================

The expected transition matrix is therefore ``(1 - rate) * I + rate * K``
(see :func:`transition_matrix`).

``asymmetric_sequential`` reproduces the class-by-class relabelling of the GJS and NRD
authors' code: for each ``source -> target`` pair of ``map``, *in the map's order*, a
fraction ``rate`` of the samples whose *current* label is ``source`` get ``target``.
Being sequential and in place, it lets a later pair move a sample again: with the
CIFAR-10 map, cat->dog then dog->cat sends a share ``rate`` of the cats flipped to dog
back to cat, so at rate 0.4 cats end up mislabeled at 0.4 * 0.6 = 0.24 and the whole
set at 0.184, where ``asymmetric`` gives 0.4 and 0.2.  The peers pick an exact count
per pass with a random permutation; here each sample flips on its own keyed uniform
draw (a Bernoulli(rate) per sample and pass), the key-pure equivalent, so the counts
are binomial rather than exact and the result still does not depend on sample order.
Its transition matrix is the product of the per-pair matrices in map order.

Both random numbers of a sample come from a keyed hash, never from a stateful
generator, so a sample's noisy label does not depend on which other samples are
processed with it, in what order, in which shard, worker or rank, or whether the
noise is baked into shards by ``tools/`` or applied at load time.

Invariants (relied upon by the data pipeline and by tests):

* ``apply_noise`` is deterministic and element-wise: for any index set ``S``,
  ``apply_noise(keys[S], labels[S], ...) == apply_noise(keys, labels, ...)[S]``.
* ``rate`` is deliberately *not* part of the hash.  With the other fields fixed,
  the samples corrupted at rate ``r`` are a subset of those corrupted at any
  ``r' >= r``, and they receive the same noisy label, so runs across noise levels
  differ only by the extra corrupted samples (a controlled comparison).
* Everything else in the spec that changes the kernel (``type``, the resolved
  ``map``, ``matrix``) and the ``seed`` is part of the hash.  A named map and the
  equivalent explicit map give identical labels, since the resolved map is hashed.
* ``asymmetric_sequential`` shares its draws with ``asymmetric`` (same map, seed):
  a sample's pass over its own clean class uses the very draw that corrupts it under
  ``asymmetric``, and only a sample moved into a later pass's source class draws
  again (keyed by that class).  So the two kinds differ only on samples a later pass
  moves again (on CIFAR-10: cats flipped to dog, then back to cat).  The map's order is
  not hashed either, so reordering pairs that do not interact changes no label.  Rates
  are *not* nested for this kind: a higher rate can flip a sample back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "NOISE_TYPES",
    "CIFAR10_ASYMMETRIC_MAP",
    "FASHION_MNIST_ASYMMETRIC_MAP",
    "CIFAR100_COARSE_LABELS",
    "cifar100_superclass_map",
    "NAMED_MAPS",
    "noise_spec_to_dict",
    "check_spec",
    "apply_noise",
    "transition_matrix",
    "noise_report",
]

NOISE_TYPES = ("none", "symmetric", "symmetric_exclusive", "asymmetric", "asymmetric_sequential", "matrix")
# Kinds that take ``map``; the sequential one applies its pairs in the map's order.
_MAP_TYPES = ("asymmetric", "asymmetric_sequential")

# Fashion-MNIST's confusable pairs, both ways (0 T-shirt/top, 2 pullover, 4 coat,
# 6 shirt, 7 sneaker, 9 ankle boot): the confusions its classifiers make most.
FASHION_MNIST_ASYMMETRIC_MAP: dict[int, int] = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}

# The classic class-dependent CIFAR-10 noise (Patrini et al., 2017): confusions
# between visually similar classes.  Indices are torchvision's CIFAR-10 classes
# (0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 7 horse, 9 truck).
# The pairs are in the order of the GJS / NRD authors' code, which
# ``asymmetric_sequential`` applies them in (``asymmetric`` ignores the order).
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {
    9: 1,  # truck -> automobile
    2: 0,  # bird -> airplane
    4: 7,  # deer -> horse
    3: 5,  # cat -> dog
    5: 3,  # dog -> cat (after cat -> dog: it sends some of the moved cats back)
}

# CIFAR-100 fine label -> coarse label (superclass), in the dataset's own order:
# fine labels are the 100 class names sorted alphabetically (0 apple, 1
# aquarium_fish, ..., 99 worm), coarse labels the 20 superclass names sorted
# alphabetically (0 aquatic_mammals, 1 fish, ..., 19 vehicles_2).  Each coarse
# label occurs exactly five times (checked at import below).
# fmt: off
CIFAR100_COARSE_LABELS: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)
# fmt: on


def cifar100_superclass_map() -> dict[int, int]:
    """Fine label -> next fine label of the same CIFAR-100 superclass, cyclically.

    Within each superclass the five fine labels are taken in ascending order; each
    maps to the next and the largest to the smallest (e.g. aquatic mammals
    4 -> 30 -> 55 -> 72 -> 95 -> 4).  Every class is a source, so the map is a
    permutation of range(100) without fixed points.
    """
    members: dict[int, list[int]] = {}
    for fine, coarse in enumerate(CIFAR100_COARSE_LABELS):
        members.setdefault(coarse, []).append(fine)  # ascending by construction
    mapping = {}
    for fines in members.values():
        for i, fine in enumerate(fines):
            mapping[fine] = fines[(i + 1) % len(fines)]
    return mapping


# A wrong table would silently produce cross-superclass noise; fail loudly instead.
assert len(CIFAR100_COARSE_LABELS) == 100
assert sorted(CIFAR100_COARSE_LABELS) == sorted(list(range(20)) * 5)

# The maps ``map`` may name, with the class count each needs (the config's help lists
# these names).  Built once: load-time noise may validate a spec per sample.
NAMED_MAPS = {
    "cifar10": (10, CIFAR10_ASYMMETRIC_MAP),
    "fmnist": (10, FASHION_MNIST_ASYMMETRIC_MAP),
    "cifar100": (100, cifar100_superclass_map()),
}
_SPEC_FIELDS = ("type", "rate", "seed", "map", "matrix")
# Bumping this changes every noisy label; only do it on purpose.
_HASH_DOMAIN = "nrd-dist/noise/v1"


# ----------------------------------------------------------------------------- spec


def noise_spec_to_dict(spec: Any) -> dict[str, Any]:
    """Normalise a noise spec to a plain dict with the keys of ``_SPEC_FIELDS``.

    Accepts ``None`` (no noise), any ``Mapping`` (a YAML dict, an OmegaConf node),
    a dataclass instance, or any object exposing the fields as attributes.  Absent
    fields and fields set to ``None`` both come out as ``None``; extra fields are
    ignored (the typed config owns the check for unknown keys).  No validation.
    """
    if spec is None:
        return {"type": "none", "rate": None, "seed": None, "map": None, "matrix": None}
    if isinstance(spec, Mapping):
        source = dict(spec)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        source = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    else:
        source = {name: getattr(spec, name) for name in _SPEC_FIELDS if hasattr(spec, name)}
    return {name: source.get(name) for name in _SPEC_FIELDS}


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `seed: true` in YAML is a mistake, not a seed.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_class_index(value: Any, field: str, num_classes: int) -> int:
    """An int in [0, num_classes); YAML mapping keys may arrive as strings."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{field}: {value!r} is not a class index") from None
    if not _is_int(value):
        raise ValueError(f"{field}: {value!r} is not a class index")
    value = int(value)
    if not 0 <= value < num_classes:
        raise ValueError(f"{field}: class {value} out of range [0, {num_classes})")
    return value


def _map_choices() -> str:
    return f"{', '.join(NAMED_MAPS)} or an explicit {{from: to}} mapping"


def _check_rate(rate: Any) -> None:
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise.rate: noise rate must lie in [0, 1], got {rate!r}")


def _resolve_map(raw: Any, num_classes: int) -> dict[int, int]:
    if isinstance(raw, str):
        if raw not in NAMED_MAPS:
            raise ValueError(f"noise.map: unknown {raw!r}; valid: {_map_choices()}")
        expected_classes, mapping = NAMED_MAPS[raw]
        if num_classes != expected_classes:
            raise ValueError(f"noise.map: {raw!r} needs num_classes={expected_classes}, got {num_classes}")
        return dict(mapping)
    if isinstance(raw, Mapping):
        if not raw:
            raise ValueError("noise.map: empty mapping")
        resolved: dict[int, int] = {}
        for src, dst in raw.items():
            src_i = _as_class_index(src, "noise.map", num_classes)
            dst_i = _as_class_index(dst, f"noise.map[{src_i}]", num_classes)
            if src_i in resolved:  # e.g. both 3 and "3" given
                raise ValueError(f"noise.map: class {src_i} given twice")
            resolved[src_i] = dst_i
        return resolved
    raise ValueError(f"noise.map: expected {_map_choices()}, got {type(raw).__name__}")


def _resolve_matrix(raw: Any, num_classes: int) -> np.ndarray:
    try:
        matrix = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("noise.matrix: not a rectangular table of numbers") from None
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"noise.matrix: shape {matrix.shape}, expected ({num_classes}, {num_classes})")
    for row_index, row in enumerate(matrix):
        if not np.all(np.isfinite(row)) or np.any(row < 0):
            raise ValueError(f"noise.matrix: row {row_index} has negative or non-finite entries")
        row_sum = float(row.sum())
        if abs(row_sum - 1.0) > 1e-6:
            raise ValueError(f"noise.matrix: row {row_index} sums to {row_sum!r}, not 1")
    return matrix


def _validate(spec: Any, num_classes: int) -> dict[str, Any]:
    """Validated spec: type, rate (float), seed (int), kernel (C x C), passes, fingerprint.

    ``passes`` is the map's ``(source, target)`` pairs in order (empty without a map);
    only ``asymmetric_sequential`` uses it, ``kernel`` serves every other kind.
    """
    raw = noise_spec_to_dict(spec)
    kind = raw["type"]
    if kind is None:
        # A spec without a type means "no noise" only if it asks for none.
        if raw["rate"] not in (None, 0, 0.0):
            raise ValueError(f"noise.type: required with rate {raw['rate']!r}")
        kind = "none"
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise.type: unknown {kind!r}; valid: {', '.join(NOISE_TYPES)}")
    if kind == "none":
        if raw["rate"] is not None:
            _check_rate(raw["rate"])  # unused, but out of range it is a mistake all the same
        return {"type": "none", "rate": 0.0}
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")

    rate = raw["rate"]
    if rate is None and kind == "matrix":
        rate = 1.0  # the matrix alone is the whole transition
    if rate is None:
        raise ValueError(f"noise.rate: required for type {kind!r}")
    _check_rate(rate)
    seed = raw["seed"]
    if seed is None:
        raise ValueError(f"noise.seed: required for type {kind!r}")
    if not _is_int(seed):
        raise ValueError(f"noise.seed: expected an int, got {seed!r}")
    # A field the type does not use is almost surely a config mistake.
    if raw["map"] is not None and kind not in _MAP_TYPES:
        raise ValueError(f"noise.map: only used with type 'asymmetric' or 'asymmetric_sequential', not {kind!r}")
    if raw["matrix"] is not None and kind != "matrix":
        raise ValueError(f"noise.matrix: only used with type 'matrix', not {kind!r}")

    C = num_classes
    kernel_params: Any = None
    passes: list[tuple[int, int]] = []
    if kind == "symmetric":
        kernel = np.full((C, C), 1.0 / C)
    elif kind == "symmetric_exclusive":
        kernel = (np.ones((C, C)) - np.eye(C)) / (C - 1)
    elif kind in _MAP_TYPES:
        if raw["map"] is None:
            raise ValueError(f"noise.map: {kind} noise needs a map: {_map_choices()}")
        mapping = _resolve_map(raw["map"], C)
        kernel = np.eye(C)
        for src, dst in mapping.items():
            kernel[src] = 0.0
            kernel[src, dst] = 1.0
        kernel_params = sorted(mapping.items())
        passes = list(mapping.items())  # dicts keep the map's order: the pass order
    else:  # matrix
        if raw["matrix"] is None:
            raise ValueError("noise.matrix: matrix noise needs a row-stochastic num_classes x num_classes matrix")
        kernel = _resolve_matrix(raw["matrix"], C)
        # repr of float64 round-trips exactly, so equal matrices hash equally.
        kernel_params = [[repr(float(p)) for p in row] for row in kernel]

    # The sequential kind hashes as "asymmetric" (and without the pass order) so that
    # it shares that kind's draws; see the module docstring.
    hashed_kind = "asymmetric" if kind == "asymmetric_sequential" else kind
    fingerprint = json.dumps(
        {"type": hashed_kind, "num_classes": C, "kernel": kernel_params},
        sort_keys=True,
        separators=(",", ":"),
    )
    return {
        "type": kind,
        "rate": float(rate),
        "seed": int(seed),
        "kernel": kernel,
        "passes": passes,
        "fingerprint": fingerprint,
    }


def check_spec(spec: Any, num_classes: int) -> None:
    """Raise ValueError naming the offending field (``noise.rate: ...``) for an invalid
    spec: the one check of a noise spec, which the config runs too."""
    _validate(spec, num_classes)


# ---------------------------------------------------------------------- randomness


def _hash_prefix(seed: int, fingerprint: str, domain: str = _HASH_DOMAIN):
    prefix = hashlib.blake2b(digest_size=16)
    # seed is an int, fingerprint fixed-format JSON and domain NUL-free, so this
    # prefix is unambiguous; the per-sample suffix puts the clean label (digits only)
    # last, so even a key containing NUL cannot collide with another (key, label).
    prefix.update(f"{domain}\x00{seed}\x00{fingerprint}\x00".encode())
    return prefix


def _keyed_uniforms(keys: Sequence[str], labels: np.ndarray, prefix) -> np.ndarray:
    """Shape (N, 2): two U[0, 1) numbers per sample from ``prefix``, its key and label.

    Each is the top 53 bits of one half of a 128-bit BLAKE2b digest, i.e. an exact
    dyadic uniform.
    """
    digests = bytearray()
    for key, clean in zip(keys, labels.tolist()):
        if not isinstance(key, str):
            raise TypeError(f"keys: expected str sample keys, got {type(key).__name__}")
        h = prefix.copy()
        h.update(f"{key}\x00{clean}".encode())
        digests += h.digest()
    words = np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2)
    return (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _sample_uniforms(keys: Sequence[str], labels: np.ndarray, seed: int, fingerprint: str):
    """Two independent U[0, 1) numbers per sample, from its key and clean label only.

    Returns ``(u_corrupt, u_class)``, float64 arrays of shape (N,).
    """
    uniforms = _keyed_uniforms(keys, labels, _hash_prefix(seed, fingerprint))
    return uniforms[:, 0], uniforms[:, 1]


def _pass_uniforms(keys, labels, seed: int, fingerprint: str, source: int) -> np.ndarray:
    """One U[0, 1) per sample for the sequential pass over class ``source``.

    Its own hash domain makes it independent of :func:`_sample_uniforms` and of the
    other passes' draws.
    """
    prefix = _hash_prefix(seed, fingerprint, f"{_HASH_DOMAIN}/pass-{source}")
    return _keyed_uniforms(keys, labels, prefix)[:, 0]


def _as_labels(labels: Any, num_classes: int, field: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D sequence, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{field}: expected integer class labels, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        value = int(array[np.argmax(bad)])
        raise ValueError(f"{field}: label {value} out of range [0, {num_classes})")
    return array


# ----------------------------------------------------------------------------- API


def apply_noise(keys: Sequence[str], labels: Any, spec: Any, num_classes: int) -> np.ndarray:
    """Noisy labels for the given samples.

    Args:
        keys: N sample keys (str), e.g. the webdataset ``__key__``; they identify a
            sample across shards and runs, so they must be stable.
        labels: N clean class indices in ``[0, num_classes)``.
        spec: the noise spec (``type``, ``rate``, ``seed`` and, per type, ``map`` (in
            pass order for ``asymmetric_sequential``) or ``matrix``) as a mapping or an
            object with those attributes; ``None`` means no noise.
        num_classes: C.

    Returns:
        int64 array of shape (N,).  A fresh copy of ``labels`` when the spec asks for
        no noise (``None``, type ``none`` or rate 0).  Element ``i`` depends only on
        ``(seed, keys[i], labels[i], spec)`` (see the module docstring).

    Raises:
        ValueError naming the offending field (``noise.type``, ``noise.rate``, ...)
        for an invalid spec, or ``labels`` for out-of-range labels.
    """
    params = _validate(spec, num_classes)
    clean = _as_labels(labels, num_classes, "labels")
    if len(keys) != len(clean):
        raise ValueError(f"keys: {len(keys)} keys for {len(clean)} labels")
    if params["type"] == "none" or params["rate"] == 0.0 or len(clean) == 0:
        return clean.copy()

    u_corrupt, u_class = _sample_uniforms(keys, clean, params["seed"], params["fingerprint"])
    if params["type"] == "asymmetric_sequential":
        return _relabel_sequentially(keys, clean, u_corrupt, params)

    # Inverse-CDF draw from row `clean` of the kernel, for corrupted samples only,
    # grouped by class so memory stays O(N) rather than O(N * C).  Scaling u by the
    # row's total keeps the threshold below the last cumulative value, so a class
    # of probability 0 is never drawn, whatever the float rounding of the sums.
    cumulative = np.cumsum(params["kernel"], axis=1)
    noisy = clean.copy()
    corrupted = np.flatnonzero(u_corrupt < params["rate"])
    if corrupted.size == 0:
        return noisy
    corrupted = corrupted[np.argsort(clean[corrupted], kind="stable")]
    classes = clean[corrupted]
    starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    ends = np.r_[starts[1:], len(corrupted)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        members = corrupted[start:end]
        row = cumulative[classes[start]]
        noisy[members] = np.searchsorted(row, u_class[members] * row[-1], side="right")
    return noisy


def _relabel_sequentially(keys, clean: np.ndarray, u_own_pass: np.ndarray, params) -> np.ndarray:
    """``asymmetric_sequential``: each map pair in order flips, with probability ``rate``,
    the samples whose *current* label is its source.

    Only the pass over a class moves samples out of it, so a sample is still in its
    clean class when that class's pass comes, and it draws ``u_own_pass`` there (the
    draw ``asymmetric`` corrupts it with).  Sources are distinct, so a sample meets any
    other pass at most once, and draws afresh for it, keyed by the pass's source.
    """
    rate, seed, fingerprint = params["rate"], params["seed"], params["fingerprint"]
    noisy = clean.copy()
    # Load-time noise comes one sample at a time: skip empty passes without numpy.
    class_sizes = np.bincount(clean, minlength=params["kernel"].shape[0]).tolist()
    for source, target in params["passes"]:
        if class_sizes[source] == 0:
            continue
        members = np.flatnonzero(noisy == source)
        draws = u_own_pass[members]  # fancy indexing: a copy
        arrived = clean[members] != source
        if arrived.any():
            moved = members[arrived]
            draws[arrived] = _pass_uniforms([keys[i] for i in moved], clean[moved], seed, fingerprint, source)
        flipped = members[draws < rate]
        noisy[flipped] = target
        class_sizes[source] -= len(flipped)
        class_sizes[target] += len(flipped)
    return noisy


def _sequential_transition(passes, rate: float, num_classes: int) -> np.ndarray:
    """Product, in map order, of the passes' matrices: pass ``s -> t`` is the identity
    with row ``s`` replaced by ``(1 - rate) e_s + rate e_t``.

    A sample's label distribution is a row vector multiplied on the right by each pass
    in turn, and the passes draw independently, so this is the exact expectation of the
    realised matrix (e.g. CIFAR-10 at 0.4: cat stays cat with 0.6 + 0.4 * 0.4 = 0.76).
    """
    matrix = np.eye(num_classes)
    for source, target in passes:
        step = np.eye(num_classes)
        step[source, source] -= rate
        step[source, target] += rate  # source == target: back to 1, a no-op pass
        matrix = matrix @ step
    return matrix


def transition_matrix(spec: Any, num_classes: int) -> np.ndarray:
    """Expected transition matrix ``T[i, j] = P(noisy = j | clean = i)``, shape (C, C).

    Equals ``(1 - rate) * I + rate * K`` for the spec's kernel ``K``; for
    ``asymmetric_sequential``, the product of its passes' matrices in map order (see
    :func:`_sequential_transition`).  Rows sum to 1.  The identity for no noise.
    """
    params = _validate(spec, num_classes)
    identity = np.eye(num_classes)
    if params["type"] == "none":
        return identity
    rate = params["rate"]
    if params["type"] == "asymmetric_sequential":
        return _sequential_transition(params["passes"], rate, num_classes)
    return (1.0 - rate) * identity + rate * params["kernel"]


def noise_report(clean_labels: Any, noisy_labels: Any, num_classes: int) -> dict[str, Any]:
    """What the noise did, as plain JSON-serialisable Python values (for manifests).

    Counted from the labels alone, so it means the same for every noise kind: its
    ``transition_matrix`` estimates :func:`transition_matrix` of the spec used (for
    ``asymmetric_sequential``, the product of the passes, not ``(1 - rate) I + rate K``).

    Returns a dict with:
        ``num_samples``: N (int).
        ``realised_rate``: fraction of samples with noisy != clean (float; 0.0 if N=0).
        ``counts``: C x C nested lists of ints, ``counts[i][j]`` = #(clean i, noisy j).
        ``transition_matrix``: ``counts`` with each row divided by its sum (floats);
            a row of a class with no samples is all zeros, not NaN.
    """
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    clean = _as_labels(clean_labels, num_classes, "clean_labels")
    noisy = _as_labels(noisy_labels, num_classes, "noisy_labels")
    if clean.shape != noisy.shape:
        raise ValueError(f"noisy_labels: {len(noisy)} labels for {len(clean)} clean labels")
    C = num_classes
    counts = np.bincount(clean * C + noisy, minlength=C * C).reshape(C, C)
    row_totals = counts.sum(axis=1, keepdims=True)
    # max(total, 1) only avoids 0/0; those rows are all-zero counts anyway.
    normalised = counts / np.maximum(row_totals, 1)
    n = int(len(clean))
    realised = float(np.count_nonzero(clean != noisy) / n) if n else 0.0
    return {
        "num_samples": n,
        "realised_rate": realised,
        "transition_matrix": [[float(p) for p in row] for row in normalised],
        "counts": [[int(c) for c in row] for row in counts],
    }

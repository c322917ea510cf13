"""Tests for nrd_dist.data.noise: determinism per sample, statistics, maps, errors."""

import dataclasses
import json
import math
import time
from statistics import NormalDist

import numpy as np
import pytest

from nrd_dist.config import ConfigError, load_config
from nrd_dist.data.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    CIFAR100_COARSE_LABELS,
    apply_noise,
    check_spec,
    cifar100_superclass_map,
    noise_report,
    noise_spec_to_dict,
    transition_matrix,
)


def make_samples(n, num_classes, seed=0, prefix="train"):
    """n webdataset-like keys and clean labels drawn uniformly over the classes."""
    rng = np.random.default_rng(seed)
    keys = [f"{prefix}/{i:07d}" for i in range(n)]
    return keys, rng.integers(0, num_classes, size=n)


# A small matrix with a zero entry (never drawn) and an identity row.
MATRIX_4 = [
    [0.7, 0.2, 0.1, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.25, 0.25, 0.25, 0.25],
    [0.05, 0.0, 0.45, 0.5],
]

SPECS = {
    "symmetric": (dict(type="symmetric", rate=0.4, seed=7), 10),
    "symmetric_exclusive": (dict(type="symmetric_exclusive", rate=0.4, seed=7), 10),
    "asym_cifar10": (dict(type="asymmetric", rate=0.4, map="cifar10", seed=7), 10),
    "asym_cifar100": (dict(type="asymmetric", rate=0.4, map="cifar100", seed=7), 100),
    "asym_seq_cifar10": (dict(type="asymmetric_sequential", rate=0.4, map="cifar10", seed=7), 10),
    "asym_seq_cifar100": (dict(type="asymmetric_sequential", rate=0.4, map="cifar100", seed=7), 100),
    "matrix": (dict(type="matrix", matrix=MATRIX_4, seed=7), 4),
}


# ---------------------------------------------------------------- per-sample purity


@pytest.mark.parametrize("name", list(SPECS))
def test_same_label_whatever_order_subset_or_sharding(name):
    spec, C = SPECS[name]
    keys, labels = make_samples(5000, C)
    full = apply_noise(keys, labels, spec, C)
    assert full.dtype == np.int64 and full.shape == (5000,)
    assert (full != labels).any()  # the check below must not be vacuous

    rng = np.random.default_rng(1)
    perm = rng.permutation(len(keys))
    shuffled = apply_noise([keys[i] for i in perm], labels[perm], spec, C)
    np.testing.assert_array_equal(shuffled, full[perm])

    subset = np.sort(rng.choice(len(keys), size=777, replace=False))
    np.testing.assert_array_equal(apply_noise([keys[i] for i in subset], labels[subset], spec, C), full[subset])

    for shard_size in (1, 13, 1000, 4096):
        shards = [
            apply_noise(keys[s : s + shard_size], labels[s : s + shard_size], spec, C)
            for s in range(0, len(keys), shard_size)
        ]
        np.testing.assert_array_equal(np.concatenate(shards), full)


def test_seed_changes_labels_and_same_seed_repeats():
    keys, labels = make_samples(5000, 10)
    spec = dict(type="symmetric_exclusive", rate=0.4, seed=1)
    a = apply_noise(keys, labels, spec, 10)
    np.testing.assert_array_equal(a, apply_noise(keys, labels, dict(spec), 10))
    b = apply_noise(keys, labels, {**spec, "seed": 2}, 10)
    # Independent draws: about 1 - (0.6^2 + 0.4^2 / 9) ~ 62% of labels differ.
    assert np.mean(a != b) > 0.5


def test_label_depends_on_key_not_position():
    keys, labels = make_samples(2000, 10)
    spec = dict(type="symmetric_exclusive", rate=0.5, seed=3)
    a = apply_noise(keys, labels, spec, 10)
    other_keys = [k.replace("train/", "val/") for k in keys]
    assert np.mean(a != apply_noise(other_keys, labels, spec, 10)) > 0.3


def test_rates_are_nested():
    """Samples corrupted at a low rate stay corrupted, to the same label, at a higher one."""
    keys, labels = make_samples(10000, 10)
    low = apply_noise(keys, labels, dict(type="symmetric_exclusive", rate=0.2, seed=5), 10)
    high = apply_noise(keys, labels, dict(type="symmetric_exclusive", rate=0.5, seed=5), 10)
    flipped_low = low != labels
    assert flipped_low.sum() > 1000
    np.testing.assert_array_equal(high[flipped_low], low[flipped_low])
    assert (high != labels).sum() > flipped_low.sum()


def test_spec_forms_dict_dataclass_attrs_and_named_vs_explicit_map():
    @dataclasses.dataclass
    class NoiseConfig:
        type: str = "none"
        rate: float = 0.0
        seed: int = 0
        map: object = None
        matrix: object = None
        other_field: str = "ignored"

    class Attrs:
        type, rate, seed, map = "asymmetric", 0.3, 11, "cifar10"

    keys, labels = make_samples(3000, 10)
    as_dict = dict(type="asymmetric", rate=0.3, seed=11, map="cifar10")
    expected = apply_noise(keys, labels, as_dict, 10)
    dc = NoiseConfig(type="asymmetric", rate=0.3, seed=11, map="cifar10")
    np.testing.assert_array_equal(apply_noise(keys, labels, dc, 10), expected)
    np.testing.assert_array_equal(apply_noise(keys, labels, Attrs(), 10), expected)
    assert noise_spec_to_dict(dc) == {**as_dict, "matrix": None}
    # The named map is hashed in resolved form, so the explicit equivalent (with
    # YAML-style string keys) gives the very same labels.
    explicit = {**as_dict, "map": {"9": 1, "2": 0, "3": 5, "5": 3, "4": 7}}
    np.testing.assert_array_equal(apply_noise(keys, labels, explicit, 10), expected)


@pytest.mark.parametrize(
    "spec",
    [None, {"type": "none"}, dict(type="symmetric", rate=0.0, seed=1), {"rate": 0}],
)
def test_no_noise_returns_a_copy(spec):
    keys, labels = make_samples(100, 10)
    out = apply_noise(keys, labels, spec, 10)
    np.testing.assert_array_equal(out, labels)
    assert out.dtype == np.int64
    out[0] = (labels[0] + 1) % 10
    assert out[0] != labels[0]  # not a view of the caller's array


def test_empty_input():
    out = apply_noise([], [], dict(type="symmetric", rate=0.5, seed=0), 10)
    assert out.dtype == np.int64 and out.shape == (0,)


def test_fast_enough_for_fashion_mnist():
    keys, labels = make_samples(70000, 10)
    start = time.perf_counter()
    apply_noise(keys, labels, dict(type="symmetric", rate=0.5, seed=0), 10)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------- statistics


def family_z(num_tests, alpha=0.0027):
    """z bound that keeps the chance of any false alarm among num_tests at alpha.

    alpha = 0.0027 is the two-sided tail of 3 standard deviations, so a single
    test uses exactly 3 sigma; many entries get a Bonferroni-widened bound.
    """
    return NormalDist().inv_cdf(1 - alpha / (2 * max(num_tests, 1)))


def assert_transitions_match(clean, noisy, expected, num_classes):
    """Every count within the (family-wise) 3-sigma binomial bound; zeros exact."""
    counts = np.array(noise_report(clean, noisy, num_classes)["counts"])
    row_n = counts.sum(axis=1)
    random_entries = (expected > 0) & (expected < 1)
    z = family_z(int(random_entries.sum()))
    for i in range(num_classes):
        for j in range(num_classes):
            p, n, c = expected[i, j], row_n[i], counts[i, j]
            if p == 0.0 or p == 1.0:
                assert c == p * n, f"T[{i},{j}]={p}: got {c} of {n}"
            else:
                sd = math.sqrt(n * p * (1 - p))
                assert abs(c - n * p) <= z * sd, f"T[{i},{j}]={p}: got {c} of {n}"


@pytest.mark.parametrize(
    "name, balanced_rate",
    [
        ("symmetric", 0.4 * 9 / 10),  # redraws may land on the clean class
        ("symmetric_exclusive", 0.4),
        ("asym_cifar10", 0.4 * 5 / 10),  # 5 of the 10 classes are sources
        ("asym_cifar100", 0.4),  # every class is a source
        ("asym_seq_cifar10", (4 * 0.4 + 0.4 * 0.6) / 10),  # dog->cat brings back cats
        # Passes go round each 5-cycle in ascending order, a moved sample meeting the
        # next pass too: only the smallest class's samples that flip 5 times come home.
        ("asym_seq_cifar100", 0.4 - 0.4**5 / 5),
        ("matrix", (0.3 + 0.0 + 0.75 + 0.5) / 4),
    ],
)
def test_realised_noise_matches_spec(name, balanced_rate):
    spec, C = SPECS[name]
    T = transition_matrix(spec, C)
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    # The expected rate for balanced classes, from the matrix, is the hand value.
    assert np.mean(1 - np.diag(T)) == pytest.approx(balanced_rate)

    keys, clean = make_samples(50000, C, seed=123)
    noisy = apply_noise(keys, clean, spec, C)
    report = noise_report(clean, noisy, C)

    # Realised flip rate: a sum of independent Bernoullis with the class's rate.
    q = 1 - np.diag(T)[clean]
    mean, sd = q.mean(), math.sqrt(np.sum(q * (1 - q))) / len(q)
    assert abs(report["realised_rate"] - mean) <= 3 * sd
    assert_transitions_match(clean, noisy, T, C)


def test_transition_matrix_closed_forms():
    C, rate = 10, 0.4
    sym = transition_matrix(dict(type="symmetric", rate=rate, seed=0), C)
    assert sym[3, 3] == pytest.approx(1 - rate + rate / C)
    assert sym[3, 4] == pytest.approx(rate / C)
    exc = transition_matrix(dict(type="symmetric_exclusive", rate=rate, seed=0), C)
    assert exc[3, 3] == pytest.approx(1 - rate)
    assert exc[3, 4] == pytest.approx(rate / (C - 1))
    asym = transition_matrix(dict(type="asymmetric", rate=rate, seed=0, map="cifar10"), C)
    assert asym[9, 1] == pytest.approx(rate) and asym[9, 9] == pytest.approx(1 - rate)
    assert asym[6, 6] == 1.0  # frog is not a source
    mat = transition_matrix(dict(type="matrix", matrix=MATRIX_4, seed=0), 4)
    np.testing.assert_allclose(mat, MATRIX_4)  # rate defaults to 1 for a matrix
    half = transition_matrix(dict(type="matrix", matrix=MATRIX_4, rate=0.5, seed=0), 4)
    np.testing.assert_allclose(half, 0.5 * np.eye(4) + 0.5 * np.array(MATRIX_4))
    np.testing.assert_array_equal(transition_matrix(None, 5), np.eye(5))


# --------------------------------------------------------------------------- maps


def test_cifar10_map_at_rate_one():
    keys = [f"k{i}" for i in range(10)]
    noisy = apply_noise(keys, np.arange(10), dict(type="asymmetric", rate=1.0, seed=0, map="cifar10"), 10)
    #              airplane auto bird cat deer dog frog horse ship truck
    assert noisy.tolist() == [0, 1, 0, 5, 7, 3, 6, 7, 8, 1]


def test_cifar100_map_stays_in_superclass_cyclically():
    mapping = cifar100_superclass_map()
    coarse = CIFAR100_COARSE_LABELS
    assert sorted(mapping) == list(range(100))
    assert sorted(mapping.values()) == list(range(100))  # a permutation
    for fine, target in mapping.items():
        assert target != fine and coarse[target] == coarse[fine]
        # Five steps around the superclass return to the start.
        node = fine
        for _ in range(5):
            node = mapping[node]
        assert node == fine
    # aquatic mammals: beaver, dolphin, otter, seal, whale
    assert [mapping[c] for c in (4, 30, 55, 72, 95)] == [30, 55, 72, 95, 4]
    # fish: aquarium_fish, flatfish, ray, shark, trout
    assert [mapping[c] for c in (1, 32, 67, 73, 91)] == [32, 67, 73, 91, 1]
    # vehicles 2: lawn_mower, rocket, streetcar, tank, tractor
    assert [mapping[c] for c in (41, 69, 81, 85, 89)] == [69, 81, 85, 89, 41]

    keys = [f"k{i}" for i in range(100)]
    spec = dict(type="asymmetric", rate=1.0, seed=0, map="cifar100")
    noisy = apply_noise(keys, np.arange(100), spec, 100)
    assert noisy.tolist() == [mapping[c] for c in range(100)]


def test_explicit_map_with_yaml_string_keys():
    keys, labels = make_samples(4000, 5)
    spec = dict(type="asymmetric", rate=1.0, seed=0, map={"0": 1, "1": "0", "4": 2})
    noisy = apply_noise(keys, labels, spec, 5)
    expected = np.array([{0: 1, 1: 0, 4: 2}.get(c, c) for c in labels.tolist()])
    np.testing.assert_array_equal(noisy, expected)
    int_keys = dict(type="asymmetric", rate=0.5, seed=0, map={0: 1, 1: 0, 4: 2})
    str_keys = {**int_keys, "map": {"0": 1, "1": 0, "4": 2}}
    np.testing.assert_array_equal(apply_noise(keys, labels, int_keys, 5), apply_noise(keys, labels, str_keys, 5))


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, num_classes, match",
    [
        (dict(type="symetric", rate=0.2, seed=0), 10, r"noise\.type: unknown 'symetric'; valid: none, symmetric"),
        ({"rate": 0.2, "seed": 0}, 10, r"noise\.type: required"),
        (dict(type="symmetric", rate=1.5, seed=0), 10, r"noise\.rate: .*\[0, 1\].*1\.5"),
        (dict(type="none", rate=1.5), 10, r"noise\.rate: noise rate must lie in \[0, 1\], got 1\.5"),
        (dict(type="symmetric", rate=0.2, seed=0), 1, r"num_classes: expected an int >= 2"),
        (dict(type="symmetric", rate=-0.1, seed=0), 10, r"noise\.rate"),
        (dict(type="symmetric", rate=float("nan"), seed=0), 10, r"noise\.rate"),
        (dict(type="symmetric", seed=0), 10, r"noise\.rate: required"),
        (dict(type="symmetric", rate=0.2), 10, r"noise\.seed: required"),
        (dict(type="symmetric", rate=0.2, seed=True), 10, r"noise\.seed"),
        (dict(type="asymmetric", rate=0.2, seed=0), 10, r"noise\.map: asymmetric noise needs a map: cifar10, fmnist"),
        (dict(type="asymmetric", rate=0.2, seed=0, map="cifar1000"), 10, r"noise\.map: unknown 'cifar1000'"),
        (
            dict(type="asymmetric", rate=0.2, seed=0, map="cifar100"),
            10,
            r"noise\.map: 'cifar100' needs num_classes=100",
        ),
        (dict(type="asymmetric", rate=0.2, seed=0, map={0: 10}), 10, r"noise\.map\[0\]: class 10 out of range"),
        (dict(type="asymmetric", rate=0.2, seed=0, map={-1: 2}), 10, r"noise\.map: class -1 out of range"),
        (dict(type="asymmetric", rate=0.2, seed=0, map={"cat": 2}), 10, r"noise\.map: 'cat' is not a class index"),
        (dict(type="asymmetric", rate=0.2, seed=0, map={3: 1, "3": 2}), 10, r"noise\.map: class 3 given twice"),
        (dict(type="symmetric", rate=0.2, seed=0, map="cifar10"), 10, r"noise\.map: only used with type 'asymmetric'"),
        (
            dict(type="asymmetric_sequential", rate=0.2, seed=0),
            10,
            r"noise\.map: asymmetric_sequential noise needs a map",
        ),
        (dict(type="asymmetric_sequential", rate=0.2, seed=0, map="cifar100"), 10, r"noise\.map: 'cifar100' needs"),
        (dict(type="matrix", seed=0), 4, r"noise\.matrix: matrix noise needs a row-stochastic"),
        (dict(type="matrix", seed=0, matrix=[[1, 0], [0, 1]]), 4, r"noise\.matrix: shape \(2, 2\), expected \(4, 4\)"),
        (dict(type="matrix", seed=0, matrix=[[1, 0], [0.5, 0.4]]), 2, r"noise\.matrix: row 1 sums to"),
        (dict(type="matrix", seed=0, matrix=[[1.5, -0.5], [0, 1]]), 2, r"noise\.matrix: row 0 has negative"),
        (dict(type="matrix", seed=0, matrix=[[1, 0], [0]]), 2, r"noise\.matrix"),
    ],
)
def test_invalid_specs_raise_naming_the_field(spec, num_classes, match):
    with pytest.raises(ValueError, match=match):
        apply_noise(["a", "b"], [0, 1], spec, num_classes)
    with pytest.raises(ValueError, match=match):
        transition_matrix(spec, num_classes)


def test_check_spec_is_the_judge_and_no_noise_needs_no_class_count():
    check_spec(dict(type="asymmetric", rate=0.2, seed=0, map="cifar10"), 10)
    with pytest.raises(ValueError, match=r"noise\.map: 'cifar100' needs num_classes=100"):
        check_spec(dict(type="asymmetric", rate=0.2, seed=0, map="cifar100"), 10)
    # No noise flips nothing, so even one class will do (as the config's default spec needs).
    check_spec(None, 1)
    check_spec(dict(type="none", rate=0.0, seed=0), 1)
    np.testing.assert_array_equal(apply_noise(["a", "b"], [0, 0], None, 1), [0, 0])


def test_matrix_rows_within_tolerance_are_accepted():
    spec = dict(type="matrix", seed=0, matrix=[[0.5, 0.5 + 5e-7], [0.0, 1.0]])
    assert apply_noise(["a", "b"], [0, 1], spec, 2)[1] == 1


def test_invalid_labels_and_keys():
    spec = dict(type="symmetric", rate=0.5, seed=0)
    with pytest.raises(ValueError, match=r"labels: label 10 out of range"):
        apply_noise(["a", "b"], [0, 10], spec, 10)
    with pytest.raises(ValueError, match=r"keys: 1 keys for 2 labels"):
        apply_noise(["a"], [0, 1], spec, 10)
    with pytest.raises(TypeError, match=r"keys: expected str"):
        apply_noise([1, 2], [0, 1], spec, 10)


# ------------------------------------------------------------------------- report


def test_noise_report_hand_computed():
    clean = [0, 0, 0, 0, 1, 1, 2]
    noisy = [0, 1, 1, 2, 1, 0, 2]  # four changed: 0->1, 0->1, 0->2, 1->0
    report = noise_report(clean, noisy, 4)
    assert report == {
        "num_samples": 7,
        "realised_rate": 4 / 7,
        "transition_matrix": [
            [0.25, 0.5, 0.25, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # class 3 has no samples: zeros, not NaN
        ],
        "counts": [[1, 2, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    }
    # Plain Python numbers only, so it goes straight into manifest.json.
    assert json.loads(json.dumps(report)) == report
    assert type(report["realised_rate"]) is float
    assert type(report["counts"][0][0]) is int
    assert type(report["transition_matrix"][0][0]) is float


def test_noise_report_of_numpy_inputs_and_empty():
    report = noise_report(np.array([1, 1]), np.array([1, 1], dtype=np.int32), 2)
    assert report["realised_rate"] == 0.0 and report["counts"] == [[0, 0], [0, 2]]
    empty = noise_report([], [], 3)
    assert empty["num_samples"] == 0 and empty["realised_rate"] == 0.0
    with pytest.raises(ValueError, match="noisy_labels"):
        noise_report([0, 1], [0], 2)


# ------------------------------------------------------ asymmetric, sequential passes

CAT, DOG = 3, 5
SEQUENTIAL = dict(type="asymmetric_sequential", rate=0.4, seed=0, map="cifar10")


def balanced_cifar10(per_class=5000):
    """50,000 webdataset-like keys, 5,000 per CIFAR-10 class (as the training set)."""
    labels = np.repeat(np.arange(10), per_class)
    return [f"train/{i:07d}" for i in range(len(labels))], labels


def peers_relabel(labels, pairs, rate, rng):
    """The GJS / NRD authors' asymmetric noise: per pair in order, an exact count
    int(rate * n) of the n samples currently labelled source, by random choice."""
    noisy = labels.copy()
    for source, target in pairs:
        members = np.flatnonzero(noisy == source)
        chosen = rng.choice(members, size=int(rate * len(members)), replace=False)
        noisy[chosen] = target
    return noisy


def mislabeled(clean, noisy, cls=None):
    mask = np.ones(len(clean), bool) if cls is None else clean == cls
    return float(np.mean(noisy[mask] != clean[mask]))


def test_sequential_cifar10_asym40_rates_match_the_peers():
    keys, clean = balanced_cifar10()
    sequential = apply_noise(keys, clean, SEQUENTIAL, 10)
    independent = apply_noise(keys, clean, {**SEQUENTIAL, "type": "asymmetric"}, 10)
    # cat->dog then dog->cat sends 0.4 of the moved cats back: 0.4 * 0.6 stay moved.
    assert mislabeled(clean, sequential, CAT) == pytest.approx(0.24, abs=0.02)
    assert mislabeled(clean, sequential) == pytest.approx(0.184, abs=0.01)
    assert mislabeled(clean, sequential, DOG) == pytest.approx(0.40, abs=0.02)
    # The default definition is unchanged.
    assert mislabeled(clean, independent, CAT) == pytest.approx(0.40, abs=0.02)
    assert mislabeled(clean, independent) == pytest.approx(0.20, abs=0.01)

    peers = peers_relabel(clean, CIFAR10_ASYMMETRIC_MAP.items(), 0.4, np.random.default_rng(0))
    assert mislabeled(clean, peers, CAT) == pytest.approx(0.24, abs=0.02)
    ours = np.array(noise_report(clean, sequential, 10)["transition_matrix"])
    theirs = np.array(noise_report(clean, peers, 10)["transition_matrix"])
    np.testing.assert_allclose(ours, theirs, atol=0.03)


def test_sequential_does_not_depend_on_sample_order():
    keys, clean = balanced_cifar10()
    full = apply_noise(keys, clean, SEQUENTIAL, 10)
    perm = np.random.default_rng(3).permutation(len(keys))
    shuffled = apply_noise([keys[i] for i in perm], clean[perm], SEQUENTIAL, 10)
    by_key = dict(zip(keys, full.tolist()))
    assert [by_key[keys[i]] for i in perm] == shuffled.tolist()
    # A cat sent to dog and back needs both passes; it must still be decided per key
    # when the dog samples it meets are elsewhere (here: one sample at a time).
    cats = np.flatnonzero(clean == CAT)[:500]
    alone = [apply_noise([keys[i]], clean[[i]], SEQUENTIAL, 10)[0] for i in cats]
    assert alone == full[cats].tolist()


def test_sequential_transition_matrix_is_the_product_of_the_passes():
    T = transition_matrix(SEQUENTIAL, 10)
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    assert T[CAT, CAT] == pytest.approx(0.6 + 0.4 * 0.4) and T[CAT, DOG] == pytest.approx(0.24)
    assert T[DOG, CAT] == pytest.approx(0.4) and T[DOG, DOG] == pytest.approx(0.6)
    assert T[9, 1] == pytest.approx(0.4) and T[6, 6] == 1.0  # as asymmetric elsewhere
    # Passes in the other order move the loss to dog instead.
    reversed_pairs = dict(reversed(list(CIFAR10_ASYMMETRIC_MAP.items())))
    T_rev = transition_matrix({**SEQUENTIAL, "map": reversed_pairs}, 10)
    assert T_rev[DOG, DOG] == pytest.approx(0.76) and T_rev[CAT, CAT] == pytest.approx(0.6)

    keys, clean = balanced_cifar10()
    noisy = apply_noise(keys, clean, SEQUENTIAL, 10)
    empirical = np.array(noise_report(clean, noisy, 10)["transition_matrix"])
    np.testing.assert_allclose(empirical, T, atol=0.02)
    assert_transitions_match(clean, noisy, T, 10)  # and every count within 3 sigma


def test_sequential_differs_from_independent_only_on_cats_sent_back():
    keys, clean = balanced_cifar10()
    sequential = apply_noise(keys, clean, SEQUENTIAL, 10)
    independent = apply_noise(keys, clean, {**SEQUENTIAL, "type": "asymmetric"}, 10)
    differ = sequential != independent
    assert set(clean[differ].tolist()) == {CAT}
    assert set(independent[differ].tolist()) == {DOG} and set(sequential[differ].tolist()) == {CAT}
    assert differ.sum() == pytest.approx(5000 * 0.4 * 0.4, abs=4 * math.sqrt(5000 * 0.16 * 0.84))


def test_sequential_map_order():
    keys = [f"k{i}" for i in range(10)]
    at_one = apply_noise(keys, np.arange(10), {**SEQUENTIAL, "rate": 1.0}, 10)
    #                   airplane auto bird cat deer dog frog horse ship truck
    assert at_one.tolist() == [0, 1, 0, 3, 7, 3, 6, 7, 8, 1]  # cat goes to dog and back

    keys, clean = balanced_cifar10(1000)
    base = apply_noise(keys, clean, SEQUENTIAL, 10)
    # Moving deer->horse, which meets no other pair, to the front changes no label ...
    deer_first = {4: 7, **CIFAR10_ASYMMETRIC_MAP}
    np.testing.assert_array_equal(apply_noise(keys, clean, {**SEQUENTIAL, "map": deer_first}, 10), base)
    # ... and an explicit map in the named map's order is the named map.
    explicit = {str(k): v for k, v in CIFAR10_ASYMMETRIC_MAP.items()}
    np.testing.assert_array_equal(apply_noise(keys, clean, {**SEQUENTIAL, "map": explicit}, 10), base)
    # dog->cat before cat->dog: the dogs come back instead of the cats.
    dog_first = {9: 1, 2: 0, 4: 7, 5: 3, 3: 5}
    other = apply_noise(keys, clean, {**SEQUENTIAL, "map": dog_first}, 10)
    assert mislabeled(clean, other, DOG) == pytest.approx(0.24, abs=0.04)
    assert mislabeled(clean, other, CAT) == pytest.approx(0.40, abs=0.04)


def test_sequential_config_loads_and_misuse_names_the_key():
    cfg = load_config(
        None,
        [
            "data.noise.type=asymmetric_sequential",
            "data.noise.rate=0.4",
            "data.noise.map={9: 1, 2: 0, 4: 7, 3: 5, 5: 3}",
        ],
    )
    assert list(cfg.data.noise.map.items()) == list(CIFAR10_ASYMMETRIC_MAP.items())  # order kept
    keys, clean = balanced_cifar10(200)
    np.testing.assert_array_equal(
        apply_noise(keys, clean, cfg.data.noise, 10), apply_noise(keys, clean, SEQUENTIAL, 10)
    )
    with pytest.raises(ConfigError, match=r"^data\.noise\.map: asymmetric_sequential noise needs a map"):
        load_config(None, ["data.noise.type=asymmetric_sequential", "data.noise.rate=0.4"])
    with pytest.raises(
        ConfigError,
        match=r"^data\.noise\.map: only used with type 'asymmetric' or "
        r"'asymmetric_sequential', not 'symmetric'",
    ):
        load_config(None, ["data.noise.type=symmetric", "data.noise.rate=0.4", "data.noise.map=cifar10"])
    with pytest.raises(ConfigError, match=r"^data\.noise\.type: .*did you mean 'asymmetric_sequential'"):
        load_config(None, ["data.noise.type=asymmetric_sequental", "data.noise.rate=0.4", "data.noise.map=cifar10"])

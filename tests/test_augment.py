"""Tests for nrd_dist.data.augment: the student / teacher / eval views of each policy,
Cutout, TrainViews, and the teacher view on a real Fashion-MNIST image."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from nrd_dist.data.augment import (
    NATIVE_IMAGE_SIZE,
    NORMALIZATION,
    POLICIES,
    Cutout,
    Policy,
    TrainViews,
    build_policy,
    check_policy,
    view_size,
)

FMNIST_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

# (policy name, build_policy kwargs, input shape [C, H, W], expected output side)
CASES = {
    "fmnist": ("fmnist", {}, (1, 28, 28), 28),
    "cifar": ("cifar", {}, (3, 32, 32), 32),
    "imagenet": ("imagenet", {}, (3, 300, 260), 224),
    "imagenet_small": ("imagenet", dict(image_size=64, resize_size=73), (3, 300, 260), 64),
}
VIEWS = ("student", "teacher", "eval")


def random_image(shape, seed=0):
    """A uint8 image with structure (a gradient plus noise), so crops and flips show."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    ramp = torch.linspace(0, 160, w).expand(c, h, w) + torch.linspace(0, 60, h)[:, None]
    noise = torch.randint(0, 36, shape, generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


def normalise(img, name):
    """What ToDtype(float32, scale=True) + Normalize(mean, std) should give, by hand."""
    mean, std = NORMALIZATION[name]
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return (img.float() / 255.0 - mean) / std


def ops(transform):
    assert isinstance(transform, v2.Compose)
    return list(transform.transforms)


def index_of(transforms, cls):
    hits = [i for i, t in enumerate(transforms) if type(t) is cls]
    assert len(hits) == 1, f"expected exactly one {cls.__name__} in {transforms}"
    return hits[0]


def load_fmnist_first_image():
    with gzip.open(FMNIST_TEST_IMAGES, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    assert (magic, rows, cols) == (2051, 28, 28) and n > 0
    first = np.frombuffer(raw, dtype=np.uint8, count=rows * cols, offset=16)
    return torch.from_numpy(first.reshape(1, rows, cols).copy())


# ----------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("case", CASES)
def test_views_have_right_shape_and_dtype(case):
    name, kwargs, shape, side = CASES[case]
    policy = build_policy(name, **kwargs)
    assert policy.name == name
    img = random_image(shape)
    torch.manual_seed(0)
    for view in VIEWS:
        out = getattr(policy, view)(img)
        assert out.dtype == torch.float32, (view, out.dtype)
        assert out.shape == (shape[0], side, side), (view, out.shape)
        assert torch.isfinite(out).all(), view


@pytest.mark.parametrize("case", CASES)
def test_eval_is_deterministic(case):
    name, kwargs, shape, _ = CASES[case]
    policy = build_policy(name, **kwargs)
    img = random_image(shape, seed=1)
    torch.manual_seed(1)
    a = policy.eval(img)
    torch.manual_seed(2)  # a different RNG state must not matter
    b = policy.eval(img)
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["fmnist", "cifar"])
def test_eval_of_small_images_is_plain_normalisation(case):
    name, kwargs, shape, _ = CASES[case]
    policy = build_policy(name, **kwargs)
    img = random_image(shape, seed=2)
    torch.testing.assert_close(policy.eval(img), normalise(img, name), rtol=1e-5, atol=1e-5)
    # Exactly two ops: no resize or crop at the native size.
    assert [type(t) for t in ops(policy.eval)] == [v2.ToDtype, v2.Normalize]


def test_imagenet_eval_is_resize_then_center_crop_by_hand():
    img = random_image((3, 300, 260), seed=3)
    out = build_policy("imagenet", image_size=64, resize_size=73).eval(img)
    resized = v2.functional.resize(img, [73], antialias=True)  # shorter side -> 73
    assert resized.shape == (3, 84, 73)
    expected = normalise(v2.functional.center_crop(resized, [64, 64]), "imagenet")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_normalisation_statistics():
    # ImageNet's are the standard torchvision ones; every policy has one (mean, std) per channel.
    assert NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert len(NORMALIZATION["fmnist"][0]) == len(NORMALIZATION["fmnist"][1]) == 1
    assert len(NORMALIZATION["cifar"][0]) == len(NORMALIZATION["cifar"][1]) == 3
    for mean, std in NORMALIZATION.values():
        assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("view", ["student", "teacher"])
def test_training_views_are_random_but_seeded(case, view):
    name, kwargs, shape, _ = CASES[case]
    transform = getattr(build_policy(name, **kwargs), view)
    img = random_image(shape, seed=4)

    torch.manual_seed(123)
    first = [transform(img) for _ in range(3)]
    # Random: consecutive draws are not all the same view.
    assert any(not torch.equal(first[0], other) for other in first[1:]), "view is not random"

    torch.manual_seed(123)
    again = [transform(img) for _ in range(3)]
    for a, b in zip(first, again):
        assert torch.equal(a, b), "same torch seed must give the same views"


@pytest.mark.parametrize("case", CASES)
def test_views_do_not_modify_the_input(case):
    name, kwargs, shape, _ = CASES[case]
    policy = build_policy(name, **kwargs)
    img = random_image(shape, seed=5)
    before = img.clone()
    torch.manual_seed(0)
    for view in VIEWS:
        getattr(policy, view)(img)
    assert torch.equal(img, before)


# ----------------------------------------------------------------------------- composition


@pytest.mark.parametrize("case", CASES)
def test_teacher_starts_with_augmix_and_student_has_none(case):
    name, kwargs, _, _ = CASES[case]
    policy = build_policy(name, **kwargs)
    teacher, student = ops(policy.teacher), ops(policy.student)
    assert type(teacher[0]) is v2.AugMix
    assert not any(isinstance(t, v2.AugMix) for t in student)
    assert not any(isinstance(t, v2.AugMix) for t in ops(policy.eval))
    # After AugMix, the teacher is the dataset's crop and flip, then conversion + normalisation.
    assert type(teacher[-2]) is v2.ToDtype and teacher[-2].dtype == torch.float32 and teacher[-2].scale
    assert type(teacher[-1]) is v2.Normalize
    mean, std = NORMALIZATION[name]
    assert tuple(teacher[-1].mean) == mean and tuple(teacher[-1].std) == std
    assert type(teacher[2]) is v2.RandomHorizontalFlip


def test_teacher_crop_and_flip_follow_the_dataset():
    fm, cf, im = build_policy("fmnist"), build_policy("cifar"), build_policy("imagenet")
    assert [type(t) for t in ops(fm.teacher)[1:3]] == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert ops(fm.teacher)[1].padding == [2, 2, 2, 2]
    assert [type(t) for t in ops(cf.teacher)[1:3]] == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert ops(cf.teacher)[1].size == (32, 32) and ops(cf.teacher)[1].padding == [4, 4, 4, 4]
    assert [type(t) for t in ops(im.teacher)[1:3]] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert ops(im.teacher)[1].size == (224, 224)
    # The teacher is not RandAugmented, colour-jittered or cut out.
    for policy in (fm, cf, im):
        assert not any(isinstance(t, (v2.RandAugment, v2.ColorJitter, Cutout)) for t in ops(policy.teacher))


def test_cifar_student_composition():
    student = ops(build_policy("cifar", cutout=5).student)
    ra = student[index_of(student, v2.RandAugment)]
    assert (ra.num_ops, ra.magnitude) == (1, 3)
    crop = student[index_of(student, v2.RandomCrop)]
    assert crop.size == (32, 32) and crop.padding == [4, 4, 4, 4]
    flip = student[index_of(student, v2.RandomHorizontalFlip)]
    assert flip.p == 0.5
    cut = student[index_of(student, Cutout)]
    assert cut.length == 5
    # Order: RandAugment, crop, flip on uint8; Cutout after Normalize (erases to the mean).
    order = [
        index_of(student, c)
        for c in (v2.RandAugment, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize, Cutout)
    ]
    assert order == sorted(order) == list(range(6))
    assert build_policy("cifar").student.transforms[-1].length == 16  # the GJS default


def test_cifar_student_cutout_erases_to_the_dataset_mean():
    # A constant image: RandAugment(magnitude 3), crop and flip leave most pixels at the
    # same value; Cutout adds a square of exact zeros (the mean after normalisation).
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    policy_cut, policy_none = build_policy("cifar", cutout=16), build_policy("cifar", cutout=0)
    torch.manual_seed(0)
    with_cut = torch.stack([policy_cut.student(img) for _ in range(20)])
    torch.manual_seed(0)
    without = torch.stack([policy_none.student(img) for _ in range(20)])
    zeros_cut = (with_cut == 0).all(dim=1).flatten(1).sum(1)
    zeros_none = (without == 0).all(dim=1).flatten(1).sum(1)
    assert (zeros_none == 0).all()
    assert (zeros_cut > 0).all() and (zeros_cut <= 16 * 16).all()
    assert (zeros_cut == 16 * 16).any()


def test_imagenet_student_and_eval_composition():
    policy = build_policy("imagenet")
    student = ops(policy.student)
    assert [type(t) for t in student] == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ColorJitter,
        v2.ToDtype,
        v2.Normalize,
    ]
    assert student[0].size == (224, 224)
    jitter = student[2]
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.2, 0.2))
    ev = ops(policy.eval)
    assert [type(t) for t in ev] == [v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize]
    assert list(ev[0].size) == [256] and ev[1].size == (224, 224)

    small = build_policy("imagenet", image_size=64, resize_size=73)
    assert ops(small.student)[0].size == (64, 64)
    assert list(ops(small.eval)[0].size) == [73] and ops(small.eval)[1].size == (64, 64)


def test_fmnist_student_composition():
    student = ops(build_policy("fmnist").student)
    assert [type(t) for t in student] == [v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    assert student[0].size == (28, 28) and student[0].padding == [2, 2, 2, 2]


def test_unknown_policy_names_the_config_key():
    with pytest.raises(ValueError, match=r"augment\.policy: unknown policy 'mnist'; valid: fmnist, cifar, imagenet"):
        build_policy("mnist")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=0), r"augment\.image_size: must be > 0, got 0"),
        (dict(resize_size=-1), r"augment\.resize_size: must be > 0, got -1"),
        (dict(cutout=-1), r"augment\.cutout: must be >= 0, got -1"),
    ],
)
def test_policy_arguments_are_judged_here(kwargs, message):
    # build_policy and the config run the same check (check_policy).
    with pytest.raises(ValueError, match=message):
        check_policy("cifar", **kwargs)
    with pytest.raises(ValueError, match=message):
        build_policy("cifar", **kwargs)


def test_view_size_is_the_native_size_unless_given():
    assert set(NATIVE_IMAGE_SIZE) == set(POLICIES)
    assert NATIVE_IMAGE_SIZE == {"fmnist": 28, "cifar": 32, "imagenet": 224}
    for policy, size in NATIVE_IMAGE_SIZE.items():
        assert view_size(policy) == size and view_size(policy, 48) == 48
        torch.manual_seed(0)
        shape = (3, 300, 260) if policy == "imagenet" else (3 - 2 * (policy == "fmnist"), size, size)
        assert build_policy(policy).eval(random_image(shape)).shape[-1] == size
    # At another size the small datasets' eval view resizes.
    assert [type(t) for t in ops(build_policy("cifar", image_size=24).eval)][0] is v2.Resize


# ----------------------------------------------------------------------------- Cutout


def fixed_centre(monkeypatch, cy, cx):
    """Make Cutout's two torch.randint draws return (cy, cx)."""
    draws = iter([cy, cx])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor(next(draws)))


@pytest.mark.parametrize("length", [16, 5, 8])
def test_cutout_zeroes_an_exact_centred_square(monkeypatch, length):
    img = torch.ones(3, 32, 32)
    fixed_centre(monkeypatch, 15, 12)
    out = Cutout(length)(img)
    y0, x0 = 15 - length // 2, 12 - length // 2
    expected = torch.ones(3, 32, 32)
    expected[:, y0 : y0 + length, x0 : x0 + length] = 0.0
    assert torch.equal(out, expected)
    assert int((out[0] == 0).sum()) == length * length
    assert torch.equal(img, torch.ones(3, 32, 32)), "Cutout must not modify its input"


def test_cutout_is_clipped_at_the_border(monkeypatch):
    img = torch.ones(1, 32, 32)
    fixed_centre(monkeypatch, 0, 31)
    out = Cutout(16)(img)
    # Rows [-8, 8) and columns [23, 39) clipped to the image: 8 x 9 pixels.
    expected = torch.ones(1, 32, 32)
    expected[:, 0:8, 23:32] = 0.0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("length", [16, 5])
def test_cutout_random_centres(length):
    torch.manual_seed(0)
    img = torch.ones(3, 32, 32)
    counts = []
    for _ in range(200):
        out = Cutout(length)(img)
        zero = out == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2]), "same square on every channel"
        rows = zero[0].any(1).nonzero().flatten()
        cols = zero[0].any(0).nonzero().flatten()
        # The zeroed set is one axis-aligned rectangle (its bounding box is all zeros).
        assert zero[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert len(rows) <= length and len(cols) <= length
        counts.append(int(zero[0].sum()))
    assert min(counts) > 0 and max(counts) <= length * length
    assert counts.count(length * length) > 0.15 * len(counts)  # unclipped squares are common
    assert len(set(counts)) > 1  # and some are clipped by the border


def test_cutout_length_zero_is_a_noop():
    img = torch.randn(3, 32, 32)
    out = Cutout(0)(img)
    assert torch.equal(out, img)
    # cutout=0 in the policy removes any zeroing (checked statistically above) too.
    assert ops(build_policy("cifar", cutout=0).student)[-1].length == 0


# ----------------------------------------------------------------------------- TrainViews


class Recorder:
    """Wrap a transform and record the exact objects it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, img):
        self.calls.append(img)
        return self.fn(img)


def recording_policy(name="cifar"):
    base = build_policy(name)
    student, teacher, eval_ = Recorder(base.student), Recorder(base.teacher), Recorder(base.eval)
    return Policy(name, student, teacher, eval_), student, teacher, eval_


def test_train_views_transform_one_decoded_image_once_each():
    policy, student, teacher, eval_ = recording_policy()
    img = random_image((3, 32, 32), seed=6)
    torch.manual_seed(0)
    s, t = TrainViews(policy)(img)
    assert len(student.calls) == 1 and student.calls[0] is img
    assert len(teacher.calls) == 1 and teacher.calls[0] is img
    assert eval_.calls == []
    assert s.shape == t.shape == (3, 32, 32) and s.dtype == t.dtype == torch.float32
    assert not torch.equal(s, t)


def test_train_views_match_the_policy_transforms_under_the_same_seed():
    policy = build_policy("cifar")
    img = random_image((3, 32, 32), seed=7)
    torch.manual_seed(5)
    s, t = TrainViews(policy)(img)
    torch.manual_seed(5)
    s_ref = policy.student(img)
    t_ref = policy.teacher(img)
    assert torch.equal(s, s_ref) and torch.equal(t, t_ref)


def test_train_views_without_teacher():
    policy, student, teacher, _ = recording_policy("fmnist")
    img = random_image((1, 28, 28), seed=8)
    s, t = TrainViews(policy, with_teacher=False)(img)
    assert t is None
    assert teacher.calls == []
    assert len(student.calls) == 1 and student.calls[0] is img
    assert s.shape == (1, 28, 28)


# ----------------------------------------------------------------------------- real data


def test_fmnist_teacher_view_on_a_real_image():
    img = load_fmnist_first_image()
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28) and img.float().std() > 10
    policy = build_policy("fmnist")

    # Every view the student-side crop + flip alone can produce from this image.
    padded = torch.nn.functional.pad(
        normalise(img, "fmnist"),
        (2, 2, 2, 2),
        value=float(normalise(torch.zeros(1, 1, 1, dtype=torch.uint8), "fmnist")),
    )
    crops_flips = []
    for dy in range(5):
        for dx in range(5):
            crop = padded[:, dy : dy + 28, dx : dx + 28]
            crops_flips += [crop, crop.flip(-1)]

    for seed in range(5):
        torch.manual_seed(seed)
        s, t = TrainViews(policy)(img)
        assert torch.isfinite(s).all() and torch.isfinite(t).all()
        assert not torch.equal(s, t)
        # The student view is one of the crop/flip variants; the teacher's (AugMix first) is not.
        assert any(torch.allclose(s, c, atol=1e-5) for c in crops_flips)
        assert not any(torch.allclose(t, c, atol=1e-3) for c in crops_flips)

"""Named augmentation policies: student, teacher and eval views (docs/design.md section 1).

Every transform takes a decoded ``uint8`` image tensor ``[C, H, W]`` and returns a
normalised ``float32`` tensor ``[C, S, S]`` (``S``: :func:`view_size`, the policy's
native size in :data:`NATIVE_IMAGE_SIZE` unless ``image_size`` says otherwise).
Augmentations run on uint8 (cheaper than float and what AugMix/RandAugment expect);
conversion and normalisation come last.

Policies:
* ``fmnist`` (Fashion-MNIST, grey): student RandomCrop(pad 2) + flip; eval: none.
* ``cifar`` (CIFAR-10/100): student RandAugment(num_ops=1, magnitude=3),
  RandomCrop(pad 4), flip, Cutout(``cutout``); eval: none.
* ``imagenet`` (WebVision / ImageNet): student RandomResizedCrop + flip +
  ColorJitter(0.4, 0.4, 0.4, 0.2); eval Resize(``resize_size``) + CenterCrop.
* The teacher view of every policy: AugMix, then the policy's crop and flip.
* At a size other than the native one, the eval view of fmnist and cifar resizes.

:func:`check_policy` is the one judge of the arguments (the config runs it too); its
messages name the argument as ``augment.<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torchvision.transforms import v2

# Per-channel statistics of the training sets (0-1 scale).
NORMALIZATION = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
POLICIES = tuple(NORMALIZATION)
# The side of every view when no image_size is given: the datasets' own image sizes.
NATIVE_IMAGE_SIZE = {"fmnist": 28, "cifar": 32, "imagenet": 224}
# RandomCrop's padding for the small datasets (imagenet crops with RandomResizedCrop).
CROP_PADDING = {"fmnist": 2, "cifar": 4}

Transform = Callable[[torch.Tensor], torch.Tensor]


class Cutout(torch.nn.Module):
    """Zero a ``length`` x ``length`` square at a uniformly random centre (DeVries & Taylor
    2017); the square may be clipped by the border. Applied after normalisation, so the
    erased region is the dataset mean, as in the GJS/NRD reference training."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.length <= 0:
            return img
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, ()).item())
        cx = int(torch.randint(w, ()).item())
        # Square [c - length//2, c - length//2 + length): exactly length x length for odd
        # lengths too (the paper's 5), where c +- length//2 would give (length-1)^2.
        half = self.length // 2
        y0, y1 = max(cy - half, 0), min(cy - half + self.length, h)
        x0, x1 = max(cx - half, 0), min(cx - half + self.length, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img


@dataclass
class Policy:
    """The three views of one dataset family."""

    name: str
    student: Transform
    teacher: Transform
    eval: Transform


def check_policy(name: str, image_size: Optional[int] = None, resize_size: int = 256, cutout: int = 16) -> None:
    """Raise ValueError naming the argument (``augment.cutout: ...``) if one is invalid."""
    if name not in NORMALIZATION:
        raise ValueError(f"augment.policy: unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"augment.image_size: must be > 0, got {image_size}")
    if resize_size <= 0:
        raise ValueError(f"augment.resize_size: must be > 0, got {resize_size}")
    if cutout < 0:
        raise ValueError(f"augment.cutout: must be >= 0, got {cutout}")


def view_size(name: str, image_size: Optional[int] = None) -> int:
    """The side in pixels of every view of policy ``name``: ``image_size``, or the
    policy's native size when it is None."""
    return NATIVE_IMAGE_SIZE[name] if image_size is None else image_size


def build_policy(name: str, image_size: Optional[int] = None, resize_size: int = 256, cutout: int = 16) -> Policy:
    """Build the named policy; ``image_size`` None: the policy's native size."""
    check_policy(name, image_size, resize_size, cutout)
    size = view_size(name, image_size)
    crop_flip = _crop_flip(name, size)
    # torchvision's AugMix defaults: severity 3, width 3, random depth, alpha 1
    teacher = [v2.AugMix()] + crop_flip + _finish(name)
    student = _student_view(name, crop_flip, cutout)
    return Policy(name, v2.Compose(student), v2.Compose(teacher), v2.Compose(_eval_view(name, size, resize_size)))


def _crop_flip(name: str, size: int) -> list:
    """The crop and flip that the student and teacher views share."""
    if name == "imagenet":
        crop = v2.RandomResizedCrop(size, antialias=True)
    else:
        crop = v2.RandomCrop(size, padding=CROP_PADDING[name])
    return [crop, v2.RandomHorizontalFlip()]


def _student_view(name: str, crop_flip: list, cutout: int) -> list:
    if name == "cifar":
        # Cutout after Normalize, so that the erased square is the dataset mean.
        return [v2.RandAugment(num_ops=1, magnitude=3)] + crop_flip + _finish(name) + [Cutout(cutout)]
    if name == "imagenet":
        return crop_flip + [v2.ColorJitter(0.4, 0.4, 0.4, 0.2)] + _finish(name)
    return crop_flip + _finish(name)


def _eval_view(name: str, size: int, resize_size: int) -> list:
    if name == "imagenet":
        return [v2.Resize(resize_size, antialias=True), v2.CenterCrop(size)] + _finish(name)
    # The small datasets' images come at the native size: no resize unless asked for another.
    resize = [v2.Resize(size, antialias=True)] if size != NATIVE_IMAGE_SIZE[name] else []
    return resize + _finish(name)


def _finish(policy: str) -> list:
    """uint8 -> float32 in [0, 1], then normalised with the training set's statistics."""
    mean, std = NORMALIZATION[policy]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class TrainViews:
    """All training views from one decoded image: ``(student_view, teacher_view)``.

    ``student_views > 1`` (multi-view losses such as GJS) returns a tuple of that many
    independently augmented student views in place of one. With ``with_teacher=False``
    (baselines without a teacher) the teacher view is not built at all and ``None`` is
    returned in its place.
    """

    def __init__(self, policy: Policy, with_teacher: bool = True, student_views: int = 1):
        self.policy = policy
        self.with_teacher = with_teacher
        self.student_views = student_views

    def __call__(self, image: torch.Tensor):
        if self.student_views == 1:
            student_view = self.policy.student(image)
        else:
            student_view = tuple(self.policy.student(image) for _ in range(self.student_views))
        teacher_view = self.policy.teacher(image) if self.with_teacher else None
        return student_view, teacher_view

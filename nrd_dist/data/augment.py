"""Named augmentation policies: student, teacher and eval views (DESIGN.md section 1).

Every transform takes a decoded ``uint8`` image tensor ``[C, H, W]`` and returns a
normalised ``float32`` tensor ``[C, S, S]`` (``S = image_size``). Augmentations run on
uint8 (cheaper than float and what AugMix/RandAugment expect); conversion and
normalisation come last.

Policies:
* ``fmnist`` (28 px grey): student RandomCrop(pad 2) + flip; eval: none.
* ``cifar`` (32 px): student RandAugment(num_ops=1, magnitude=3), RandomCrop(pad 4),
  flip, Cutout(``cutout``); eval: none.
* ``imagenet`` (WebVision / ImageNet, 224 px): student RandomResizedCrop + flip +
  ColorJitter(0.4, 0.4, 0.4, 0.2); eval Resize(``resize_size``) + CenterCrop.
* The teacher view of every policy: AugMix, then the policy's crop and flip.
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


def _finish(policy: str) -> list:
    mean, std = NORMALIZATION[policy]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def build_policy(name: str, image_size: Optional[int] = None, resize_size: int = 256,
                 cutout: int = 16) -> Policy:
    """Build the named policy. ``image_size`` defaults to 28 / 32 / 224 per policy."""
    if name not in NORMALIZATION:
        raise ValueError(f"data.augment.policy: unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    augmix = v2.AugMix()  # torchvision defaults: severity 3, width 3, random depth, alpha 1
    if name == "fmnist":
        size = image_size or 28
        crop_flip = [v2.RandomCrop(size, padding=2), v2.RandomHorizontalFlip()]
        student = crop_flip + _finish(name)
        eval_ = ([v2.Resize(size, antialias=True)] if size != 28 else []) + _finish(name)
    elif name == "cifar":
        size = image_size or 32
        crop_flip = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
        student = [v2.RandAugment(num_ops=1, magnitude=3)] + crop_flip + _finish(name) + [Cutout(cutout)]
        eval_ = ([v2.Resize(size, antialias=True)] if size != 32 else []) + _finish(name)
    else:  # imagenet
        size = image_size or 224
        crop_flip = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        student = crop_flip + [v2.ColorJitter(0.4, 0.4, 0.4, 0.2)] + _finish(name)
        eval_ = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(size)] + _finish(name)
    teacher = [augmix] + crop_flip + _finish(name)
    return Policy(name, v2.Compose(student), v2.Compose(teacher), v2.Compose(eval_))


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

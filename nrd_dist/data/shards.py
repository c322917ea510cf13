"""WebDataset shard streams: (student view, teacher view, label, clean label, key) batches.

Shards follow docs/design.md section 3: ``{prefix}-{000000..N}.tar``, one sample per key,
the image as ``.jpg``/``.png``, the training label as ``.cls`` and, when known, the
clean label as ``.clean.cls``; a ``manifest.json`` beside them counts each shard's
samples (:func:`manifest_counts`).

Randomness is a function of ``(seed, epoch, rank, worker)``: the shard order comes from
``(seed, epoch)`` (identical on every rank, so the split is a partition), the sample
shuffle buffer from ``(seed, epoch, rank, worker)``. A stream made with
``per_sample_seed=True`` instead transforms each sample under a seed of its own, drawn
from ``(seed, key)`` (:func:`sample_seed`). A batch is a dict::

    {"student": float [B, C, S, S], "teacher": float [B, C, S, S] (training with a teacher),
     "label": int64 [B], "clean_label": int64 [B] (-1 where unknown), "key": list[str],
     "shard": list[str] (the shard URL of each sample, with ``with_shard=True``)}
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import random
import tarfile
import warnings
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset
from torchvision.io import ImageReadMode, decode_image

from nrd_dist.config import to_dict
from nrd_dist.data import storage
from nrd_dist.data.noise import apply_noise
from nrd_dist.data.writer import MANIFEST_NAME

if TYPE_CHECKING:
    from nrd_dist.config import Config

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

# torchvision 0.29 (pinned) warns that its decoders will move to torchcodec; they are
# still the fastest uint8 decoders available here, and one warning per sample is noise.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


class ShardError(ValueError):
    """A problem with the shards themselves; the message names the URL or sample key."""


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs
    (unlike ``hash()``, which is salted per process for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# The salt of the per-sample seeds. The name is historical (the diagnostics tools drew
# their views this way first); changing it would redraw every view, and with them the
# label-correction numbers of every run and diagnosis made so far.
SAMPLE_SEED_SALT = "diagnostics-views"


def sample_seed(seed: int, key: str) -> int:
    """The seed a ``per_sample_seed`` stream transforms sample ``key`` under: a function of
    ``(seed, key)`` alone, so not of the worker, batch, rank or position that reads it."""
    return mix_seed(SAMPLE_SEED_SALT, seed, key)


def expand_urls(spec: Union[str, Sequence[str]], what: str = "data.train") -> list[str]:
    """Expand brace patterns (``train-{000000..000009}.tar``), lists and globs (local or
    remote: ``s3://bucket/train-*.tar``) into a list of shard URLs; every shard is checked
    to exist and be non-empty (remote ones with one metadata request each)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(patterns):
        raise ShardError(f"{what}: no shard URL given")
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            path = _local_path(url)
            if path is None:
                urls.extend(storage.expand_remote(url, what))
            elif glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ShardError(f"{what}: no shard matches {pattern!r}")
                urls.extend(matches)
            else:
                urls.append(url)
    for url in urls:
        path = _local_path(url)
        if path is None:
            storage.check_exists(url, what)
            continue
        if not os.path.isfile(path):
            raise ShardError(f"{what}: shard {url!r} does not exist (from pattern {patterns!r})")
        if os.path.getsize(path) == 0:
            raise ShardError(f"{what}: shard {url!r} is empty (0 bytes)")
    return urls


def manifest_counts(urls: Sequence[str]) -> dict[str, int]:
    """URL -> sample count, from the ``manifest.json`` beside each shard (one read per
    folder). Shards that no readable manifest lists are left out: the caller decides
    whether it needs them (``data.samples_per_epoch``) or only checks the ones it has
    (truncation, see ``StreamSpec.expected_counts``)."""
    listed: dict[str, dict[str, int]] = {}  # folder -> shard name -> count
    counts = {}
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in listed:
            listed[folder] = _manifest_shards(folder)
        if name in listed[folder]:
            counts[url] = listed[folder][name]
    return counts


def _manifest_shards(folder: str) -> dict[str, int]:
    """Shard name -> count of the manifest in ``folder``; empty without a readable one."""
    try:
        manifest = json.loads(storage.read_text(f"{folder}/{MANIFEST_NAME}"))
        return {shard["name"]: shard["count"] for shard in manifest["shards"]}
    except (OSError, ValueError, KeyError):
        return {}


def _local_path(url: str) -> Optional[str]:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return parsed.path if parsed.scheme == "file" else url
    if len(parsed.scheme) == 1:  # a Windows drive letter, not a scheme
        return url
    return None


def decode_sample(sample: dict[str, Any], channels: int) -> tuple[torch.Tensor, int, int]:
    """(uint8 image [C, H, W], training label, clean label or -1) of a raw tar sample."""
    key, url = sample.get("__key__"), sample.get("__url__")
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_bytes is None:
        raise ShardError(f"sample {key!r} in {url!r} has no image ({'/'.join(IMAGE_EXTENSIONS)}); "
                         f"it has: {sorted(k for k in sample if not k.startswith('__'))}")
    if "cls" not in sample:
        raise ShardError(f"sample {key!r} in {url!r} has no .cls label")
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        check_png_checksums(image_bytes)
        image = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), mode=mode)
        label = int(sample["cls"])
        clean = int(sample["clean.cls"]) if "clean.cls" in sample else -1
    except (RuntimeError, ValueError) as err:
        raise ShardError(f"sample {key!r} in {url!r} cannot be decoded: {err}") from None
    return image, label, clean


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_checksums(data: bytes) -> None:
    """Raise ValueError if a PNG's chunks fail their CRC-32.

    torchvision 0.29's PNG decoder crashes the whole process (SIGSEGV after libpng's
    "IDAT: incorrect data check") on a PNG with a flipped bit in its pixel data, so a
    bit-rotted sample would kill a DataLoader worker instead of being skipped. The CRCs
    catch that corruption first, at C speed (zlib.crc32). Not a PNG: nothing to do.
    """
    if not data.startswith(PNG_SIGNATURE):
        return
    view = memoryview(data)
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length = int.from_bytes(view[offset:offset + 4], "big")
        end = offset + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"PNG chunk at byte {offset} runs past the end (truncated)")
        if zlib.crc32(view[offset + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise ValueError(f"PNG chunk {bytes(view[offset + 4:offset + 8])!r} at byte {offset} fails its CRC")
        if view[offset + 4:offset + 8] == b"IEND":
            return
        offset = end + 4
    raise ValueError("PNG ends before its IEND chunk (truncated)")


@dataclasses.dataclass
class StreamSpec:
    """How a run reads its shards: everything a :class:`ShardStream` needs besides the
    URLs, the transform and what the stream is for. One per run (:meth:`from_config`);
    its streams differ by ``dataclasses.replace`` (e.g. ``noise=None`` for a clean
    validation set).

    Fields:
        num_classes: labels must lie in ``[0, num_classes)``.
        channels: 1 (grey) or 3 (RGB) decoding.
        seed: ``run.seed``; with :meth:`ShardStream.set_epoch` it fixes all data randomness.
        shuffle_buffer: samples per worker held for shuffling (0: no sample shuffle;
            training streams only).
        noise: load-time label noise spec (``data.noise`` as a dict), or None.
        rank, world_size: this process's place among the data-parallel ranks.
        sampling: ``epoch`` (a seeded per-epoch shard permutation dealt to the (rank,
            worker) slots, then top-ups) or ``resampled`` (seeded draws with replacement).
        storage_options, retries, retry_backoff_s: ``data.storage`` and the retry
            policy for remote shards.
        expected_counts: shard URL -> sample count from the manifests
            (:func:`manifest_counts`; detects truncated shards).
    """

    num_classes: int
    channels: int = 3
    seed: int = 0
    shuffle_buffer: int = 1000
    noise: Optional[dict] = None
    rank: int = 0
    world_size: int = 1
    sampling: str = "epoch"
    storage_options: Optional[dict] = None
    retries: int = 4
    retry_backoff_s: float = 0.5
    expected_counts: Optional[dict[str, int]] = None

    def __post_init__(self) -> None:
        if self.sampling not in ("epoch", "resampled"):
            raise ValueError(f"data.sampling: must be 'epoch' or 'resampled', got {self.sampling!r}")
        # Copies: a stream must not see later changes to the caller's dicts.
        self.storage_options = dict(self.storage_options or {})
        self.expected_counts = dict(self.expected_counts or {})

    @classmethod
    def from_config(cls, cfg: Config, *, load_time_noise: bool = True, rank: int = 0, world_size: int = 1,
                    expected_counts: Optional[dict[str, int]] = None) -> StreamSpec:
        """The spec of a run's streams. ``load_time_noise``: apply ``data.noise`` (if any)
        to the labels, as for training; False for clean validation sets."""
        data = cfg.data
        noise = to_dict(data.noise) if load_time_noise and data.noise.type != "none" else None
        return cls(num_classes=data.num_classes, channels=cfg.model.in_channels, seed=cfg.run.seed,
                   shuffle_buffer=data.shuffle_buffer, noise=noise, rank=rank, world_size=world_size,
                   sampling=data.sampling, storage_options=data.storage, retries=data.retries,
                   retry_backoff_s=data.retry_backoff_s, expected_counts=expected_counts)


class ShardStream(IterableDataset):
    """Samples from webdataset shards, split by rank and DataLoader worker.

    ``ShardStream(urls, transform, spec, train=...)``, or with the fields of
    :class:`StreamSpec` as keywords in place of ``spec``:
    ``ShardStream(urls, transform, 10, channels=1, train=False)``.

    Args:
        urls: shard URLs (see :func:`expand_urls`).
        transform: decoded uint8 image -> ``(student_view, teacher_view or None)`` for
            training, or -> the ``image`` field (a tensor, or any collatable structure of
            tensors) for evaluation (``train=False``).
        spec: how to read the shards (:class:`StreamSpec`), or its ``num_classes``.
        train: shuffle shards and samples, produce two views, never run dry (the caller
            takes a fixed number of batches per epoch); else a fixed order, each sample once.
        per_sample_seed: run ``transform`` under torch's global RNG seeded with
            :func:`sample_seed` ``(spec.seed, key)`` and restored afterwards. A sample's
            random views are then a function of ``(seed, key)`` alone: the same whatever
            the number of workers or ranks, the batch size, the other samples read, and
            in whichever process; and the stream draws nothing from the RNG of the
            process it runs in (``workers=0``).
        with_shard: each sample also carries its shard's URL (``shard``).

    Bad data does not stop the stream: a sample that cannot be decoded or has a label
    out of range, and a shard that ends early (truncated), are reported in the ``bad``
    field of the next sample yielded (newline-separated ``kind: key in URL: reason``;
    empty when nothing happened) and the stream goes on, so the caller can count them
    against ``data.max_bad_fraction`` and every rank still gets its batches. Storage
    errors (missing object, denied access, retries exhausted) do stop it.
    """

    # A stream that reads this many bad samples in a row has nothing usable (wrong
    # data.num_classes, wrong files): stop instead of searching forever.
    MAX_BAD_IN_A_ROW = 200

    def __init__(self, urls: Sequence[str], transform: Callable, spec: Union[StreamSpec, int, None] = None, *,
                 train: bool = True, per_sample_seed: bool = False, with_shard: bool = False, **spec_fields: Any):
        super().__init__()
        if not isinstance(spec, StreamSpec):
            spec = StreamSpec(**({} if spec is None else {"num_classes": spec}), **spec_fields)
        elif spec_fields:
            raise TypeError(f"ShardStream: give a StreamSpec or its fields, not both ({', '.join(spec_fields)})")
        if not urls:
            raise ShardError("no shard URLs")
        self.urls = list(urls)
        self.transform = transform
        self.spec = spec
        self.train = train
        self.shuffle_buffer = spec.shuffle_buffer if train else 0
        self.per_sample_seed = per_sample_seed
        self.with_shard = with_shard
        # Shared memory, so persistent DataLoader workers (which keep the copy of this
        # stream they were started with) see each new epoch too.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch; reaches running workers as well."""
        self._epoch.value = epoch

    def shards_for(self, worker: int, num_workers: int, epoch: Optional[int] = None) -> list[str]:
        """The shards of one (rank, worker) slot in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        shards = list(self.urls)
        if self.train:
            random.Random(mix_seed("shards", self.seed, epoch)).shuffle(shards)
        slot = self.rank * num_workers + worker
        return shards[slot::self.spec.world_size * num_workers]

    def shard_sequence(self, worker: int, num_workers: int, epoch: int) -> Iterator[str]:
        """The shards one (rank, worker) slot reads in ``epoch``.

        Evaluation: the dealt shards, once (so every sample is counted exactly once over
        all ranks). Training never runs dry: after its dealt shards (none in
        ``resampled`` mode) a slot draws shards from a seeded stream, so every rank can
        take the same number of batches per epoch even when the shard count does not
        divide by ranks x workers; uneven counts would otherwise hang a collective.
        """
        if not self.train or self.spec.sampling == "epoch":
            yield from self.shards_for(worker, num_workers, epoch)
        if not self.train:
            return
        rng = random.Random(mix_seed("top-up", self.seed, epoch, self.rank, worker))
        while True:
            yield self.urls[rng.randrange(len(self.urls))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        storage.configure(spec.storage_options, spec.retries, spec.retry_backoff_s)  # maybe a fresh worker process
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Read once: the shared epoch may move on (set_epoch) while a persistent worker
        # still finishes batches of this one, which the DataLoader then discards.
        epoch = self.epoch
        if info is not None:
            # The augmentations draw from the worker's global RNGs: seed them from
            # (seed, epoch, rank, worker) at each epoch's start, so a persistent worker
            # and a fresh one (a resumed run) augment alike.
            augment_seed = mix_seed("augment", self.seed, epoch, self.rank, worker)
            torch.manual_seed(augment_seed)
            random.seed(augment_seed)
            np.random.seed(augment_seed % 2**32)
        rng = random.Random(mix_seed("samples", self.seed, epoch, self.rank, worker))
        bad: list[str] = []  # reports not yet handed on
        samples = self._good_samples(self._raw_samples(self.shard_sequence(worker, num_workers, epoch), bad), bad)
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for sample in samples:
            out = self._transformed(sample)
            out["bad"] = "\n".join(bad)
            bad.clear()
            yield out

    def _raw_samples(self, shards: Iterator[str], bad: list[str]) -> Iterator[dict[str, Any]]:
        for url in shards:
            count = 0
            try:
                for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
                    count += 1
                    yield sample
            except storage.StorageError as err:
                raise storage.StorageError(err.args[0]) from None  # without the args webdataset appends
            except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                # webdataset appends the stream and URL to the exception's args
                reason = str(err.args[0]) if err.args else type(err).__name__
                bad.append(f"truncated shard: - in {url}: {reason} after {count} samples; rest of shard skipped")
                continue
            expected = self.spec.expected_counts.get(url)
            if expected is not None and count < expected:
                # tarfile ends a stream cut at a member boundary silently: only the
                # manifest's count tells a truncated shard from a short one.
                bad.append(f"truncated shard: - in {url}: {count} of the manifest's {expected} samples")
            elif count == 0:
                raise ShardError(f"shard {url!r} holds no samples")

    def _good_samples(self, raw: Iterator[dict[str, Any]], bad: list[str]) -> Iterator[dict[str, Any]]:
        in_a_row = 0
        for sample in raw:
            try:
                decoded = self._decoded(sample)
            except ShardError as err:
                bad.append(f"bad sample: {err}")  # the message names the key and shard URL
                in_a_row += 1
                if in_a_row >= self.MAX_BAD_IN_A_ROW:
                    raise ShardError(f"{in_a_row} bad samples in a row, none usable; the last: {err}") from None
                continue
            in_a_row = 0
            yield decoded

    def _decoded(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Decode and check the labels only: cheap enough to run before the shuffle buffer,
        and keeps the buffer holding compact uint8 images instead of float views."""
        num_classes, noise = self.spec.num_classes, self.spec.noise
        image, label, clean = decode_sample(raw, self.spec.channels)
        key = raw["__key__"]
        for name, value in (("label", label), ("clean label", clean)):
            if value >= num_classes or value < (-1 if name == "clean label" else 0):
                raise ShardError(f"sample {key!r} in {raw.get('__url__')!r}: {name} {value} is out of "
                                 f"range for data.num_classes={num_classes}")
        if noise is not None:
            # Load-time noise keys on the clean label when the shard has one, so noise
            # baked in by tools/ and noise applied here agree sample for sample.
            base = clean if clean >= 0 else label
            label = int(apply_noise([key], [base], noise, num_classes)[0])
            clean = base
        return {"image": image, "label": label, "clean_label": clean, "key": key, "shard": raw.get("__url__", "")}

    def _transformed(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample as yielded: its views (or eval image), labels and key."""
        if not self.per_sample_seed:
            return self._apply_transform(sample)
        # fork_rng restores the global torch RNG afterwards: the seed must not leak into
        # the next sample, nor the draws into whatever else this process does with it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, sample["key"]))
            return self._apply_transform(sample)

    def _apply_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = {"label": sample["label"], "clean_label": sample["clean_label"], "key": sample["key"]}
        if self.with_shard:
            out["shard"] = sample["shard"]
        if self.train:
            student_view, teacher_view = self.transform(sample["image"])
            out["student"] = student_view
            if teacher_view is not None:
                out["teacher"] = teacher_view
        else:
            out["image"] = self.transform(sample["image"])
        return out


def _shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer: once full, each incoming sample swaps with a random slot."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def make_loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool = True,
                pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader over ``stream``; call :func:`set_epoch` before each epoch.

    ``persistent`` keeps the worker processes between epochs (no start-up and no empty
    prefetch queue at each epoch's start); the batches are the same either way.
    """
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # A fixed generator: the DataLoader would otherwise draw its workers' base seed
        # from the global RNG. The workers reseed per epoch (ShardStream.__iter__).
        generator=torch.Generator().manual_seed(mix_seed("workers", stream.spec.seed, 0, stream.spec.rank)),
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Fix all of the next epoch's data randomness to ``(seed, epoch, rank)``: shard order,
    shuffle buffers and the workers' augmentation seeds, however many epochs ran before
    in this process and whether or not the workers persist."""
    stream: ShardStream = loader.dataset  # type: ignore[assignment]
    stream.set_epoch(epoch)

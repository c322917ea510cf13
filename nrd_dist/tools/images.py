"""Image bytes for the shards: each file decode-checked, then copied unchanged, shrunk, or
re-encoded (make_shards' docstring, "Images", states the rules), optionally in a pool of
worker processes that still yields results in order."""

from __future__ import annotations

import io
import multiprocessing
from collections import deque
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from PIL import Image

from nrd_dist.tools.sources import Options, Source

# Formats the loader (torchvision decode_image) reads and we copy unchanged; others are re-encoded.
COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


class Loaded(NamedTuple):
    """One decoded sample: the bytes to store and what was done, or an error."""

    ext: str = ""
    data: bytes = b""
    resized: bool = False
    reencoded: bool = False
    error: str = ""


def resized_size(width: int, height: int, shorter: Optional[int]) -> Optional[tuple[int, int]]:
    """(width, height) with the shorter side ``shorter`` px, or None when no shrink is due."""
    if not shorter or min(width, height) <= shorter:
        return None
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def load_image(path: str, resize_shorter: Optional[int], jpeg_quality: int) -> Loaded:
    """Read, check and (maybe) shrink one image file; errors come back as values."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Loaded(error="missing file")
    except OSError as err:
        return Loaded(error=f"cannot read: {err}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            target = resized_size(*image.size, resize_shorter)
            if target is None and fmt in COPY_FORMATS:
                if fmt in ("JPEG", "MPO"):
                    image.draft(None, (1, 1))  # a 1/8-scale decode still reads every byte
                image.load()
                return Loaded(COPY_FORMATS[fmt], data)
            if target is not None and fmt in ("JPEG", "MPO"):
                image.draft(None, (2 * target[0], 2 * target[1]))
            image.load()
            out = image if image.mode in ("RGB", "L") else image.convert("RGB")
            if target is not None:
                out = out.resize(target, Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            out.save(buffer, format="JPEG", quality=jpeg_quality)
            return Loaded("jpg", buffer.getvalue(), resized=target is not None, reencoded=target is None)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
        return Loaded(error=f"cannot decode image ({type(err).__name__}: {err})")


def _load_chunk(paths: list[str], resize_shorter: Optional[int], jpeg_quality: int) -> list[Loaded]:
    return [load_image(p, resize_shorter, jpeg_quality) for p in paths]


class Decoder:
    """Decoded samples of ``source`` at given indices, in order; with ``workers > 1`` (file
    datasets) computed ahead in a process pool, at most ``window`` chunks in flight."""

    CHUNK = 8

    def __init__(self, source: Source, opts: Options):
        self.source, self.opts = source, opts
        self.pool = None
        if source.files is not None and opts.workers > 1:
            # spawn: the parent may hold threads (fsspec's IO loop); forking those is unsafe.
            self.pool = multiprocessing.get_context("spawn").Pool(opts.workers)
        self.window = 4 * max(opts.workers, 1)

    def one(self, index: int) -> Loaded:
        if self.source.files is None:
            ext, data = self.source.image(index)
            return Loaded(ext, data)
        return load_image(self.source.files[index], self.opts.resize_shorter, self.opts.jpeg_quality)

    def stream(self, indices: list[int]) -> Iterator[Loaded]:
        if self.pool is None:
            for index in indices:
                yield self.one(index)
            return
        pending: deque = deque()
        submitted = 0
        while submitted < len(indices) or pending:
            while len(pending) < self.window and submitted < len(indices):
                chunk = [self.source.files[i] for i in indices[submitted : submitted + self.CHUNK]]
                pending.append(
                    self.pool.apply_async(_load_chunk, (chunk, self.opts.resize_shorter, self.opts.jpeg_quality))
                )
                submitted += len(chunk)
            yield from pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

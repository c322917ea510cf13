"""Reading an existing shard folder as the training loader sees it: the ``manifest.json``
beside the shards, and each tar's samples grouped by the loader's own key rule, hashed as
they stream past (so one sequential read both checks and uses a shard)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from typing import Any, BinaryIO, Callable, Iterator, Optional

from nrd_dist.data.storage import StorageError
from nrd_dist.data.writer import MANIFEST_NAME
from nrd_dist.tools.location import Location, storage_failure


def read_manifest_at(location: Location) -> tuple[dict[str, Any], bytes]:
    """The manifest (checked to list shards) and its raw bytes."""
    url = location.url(MANIFEST_NAME)
    try:
        raw = location.fs.cat_file(location.join(MANIFEST_NAME))
    except FileNotFoundError:
        raise StorageError(f"{url}: no manifest (is {location.url()} a shard folder?)") from None
    except IsADirectoryError:
        raise StorageError(f"{url}: is a folder, not a manifest") from None
    except Exception as err:  # noqa: BLE001 - permissions, network, endpoint: all fatal here
        raise storage_failure(url, "read", err) from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StorageError(f"{url}: not valid JSON ({err})") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise StorageError(f"{url}: no 'shards' list of {{name, count, sha256, bytes}} entries")
    return manifest, raw


class HashingReader:
    """A read-only binary stream that hashes (sha256) and counts what passes through it."""

    def __init__(self, raw: BinaryIO, on_read: Optional[Callable[[int], Any]] = None):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        if self.on_read is not None:
            self.on_read(len(data))
        return data

    def drain(self) -> None:
        """Read to the end (the tar reader stops before the archive's zero padding)."""
        while self.read(1 << 20):
            pass


def iter_samples(stream: BinaryIO, lcase: bool = True) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``(key, [(suffix, bytes), ...])`` per sample of a tar stream, read sequentially.

    Members are grouped exactly as the training loader groups them (webdataset's
    ``base_plus_ext`` key rule; consecutive members with one key form a sample; names
    without an extension and non-file members are skipped), so counts agree with what
    training sees. Raises ``tarfile.TarError`` for an unreadable or truncated tar.
    """
    from webdataset.tariterators import base_plus_ext  # the loader's own key rule

    key: Optional[str] = None
    members: list[tuple[str, bytes]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None:
                continue
            data = tar.extractfile(info).read()
            if prefix != key:
                if members:
                    yield key, members
                key, members = prefix, []
            members.append((suffix.lower() if lcase else suffix, data))
    if members:
        yield key, members

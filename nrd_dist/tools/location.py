"""A folder on local disk or behind an fsspec URL (``s3://bucket/fmnist/train``), as the
shard tools read and write it.

Remote filesystems take the options of ``data.storage`` through
:func:`nrd_dist.data.storage.fsspec_options` (same names, fail-fast timeouts), plus the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` ...), which s3fs reads
itself. Every write lands whole or not at all: a local file is renamed into place, a
remote one is a single upload, so a killed run never leaves a half-written file under its
final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import fsspec

from nrd_dist.data import storage
from nrd_dist.data.storage import StorageError


def storage_failure(url: str, action: str, err: BaseException) -> StorageError:
    """The error the tools raise when storage fails: ``{url}: cannot {action} ({type}: {err})``."""
    return StorageError(f"{url}: cannot {action} ({type(err).__name__}: {err})")


@dataclass
class Location:
    """A folder on some filesystem: ``fs`` and its fs-native ``path`` (no trailing slash)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def join(self, name: str) -> str:
        return posixpath.join(self.path, name) if not self.is_local else os.path.join(self.path, name)

    def child(self, name: str) -> Location:
        return Location(self.fs, self.join(name))

    def url(self, name: str = "") -> str:
        """What messages and manifests show: the local path, or the protocol URL without
        any user:password part."""
        path = self.join(name) if name else self.path
        if self.is_local:
            return path
        parts = urlsplit(self.fs.unstrip_protocol(path))
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """Sorted names directly in the folder; none when it does not exist."""
        self.fs.invalidate_cache()  # a listing cached before our own writes would be stale
        try:
            paths = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.replace(os.sep, "/").rstrip("/")) for p in paths)

    def tar_names(self) -> list[str]:
        """Names of the ``*.tar`` files directly in the folder."""
        return [name for name in self.names() if name.endswith(".tar")]

    def read_text(self, name: str) -> Optional[str]:
        """The file's text, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.join(name)).decode()
        except FileNotFoundError:
            return None

    def matches(self, name: str, size: int, sha256: str) -> bool:
        """Whether ``name`` exists with this size and sha256 (the size is checked first,
        so a wrong file is rarely read)."""
        path = self.join(name)
        try:
            if self.fs.size(path) != size:
                return False
            digest = hashlib.sha256()
            with self.fs.open(path, "rb", block_size=8 << 20) as f:
                while block := f.read(8 << 20):
                    digest.update(block)
            return digest.hexdigest() == sha256
        except FileNotFoundError:
            return False

    def get(self, name: str, local_file: str) -> None:
        """Download ``name`` to ``local_file``."""
        try:
            self.fs.get_file(self.join(name), local_file)
        except Exception as err:  # noqa: BLE001 - missing, permissions, network: say where
            raise storage_failure(self.url(name), "read", err) from None

    # ------------------------------------------------------------------ writing

    def write_text(self, name: str, text: str) -> None:
        """Atomically: a local temporary file renamed into place, or one object PUT."""
        if not self.is_local:
            self.fs.pipe_file(self.join(name), text.encode())
            return
        os.makedirs(self.path, exist_ok=True)
        tmp = self.join(f"{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.join(name))

    def put(self, local_file: str | Path, name: str) -> None:
        """Move a finished local file to ``name``: a rename on the same local filesystem
        (atomic), an upload otherwise (an object appears whole or not at all)."""
        if self.is_local:
            os.replace(local_file, self.join(name))
            return
        try:
            self.fs.put_file(str(local_file), self.join(name))
        except Exception as err:  # noqa: BLE001 - say where; the caller's policy prints it
            raise storage_failure(self.url(name), "write", err) from None
        os.remove(local_file)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.join(name))

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A local folder for files being written, removed afterwards. For a local
        folder it lies inside it (created if need be), so that :meth:`put` is a rename on
        one filesystem; ``{prefix}*`` folders there were left by killed runs and are
        removed first. For a remote folder it lies in the system's temporary folder
        (nothing is created remotely: object stores have no folders, and a missing
        bucket is an error to report, not to create)."""
        parent = None
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            for stale in Path(self.path).glob(f"{prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
            parent = self.path
        path = Path(tempfile.mkdtemp(prefix=prefix if parent else f"nrd-{prefix.strip('.-')}-", dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def open_location(url: str, storage_options: Optional[dict[str, Any]] = None) -> Location:
    """A :class:`Location` for a local path or fsspec URL. Remote URLs take the storage
    options as ``data.storage`` does (same names, fail-fast timeouts); a fresh filesystem
    instance every time, so no listing cached by an earlier call in this process."""
    protocol = fsspec.core.split_protocol(url)[0]
    remote = protocol not in (None, "file", "local")
    options = storage.fsspec_options(protocol, storage_options or {}) if remote else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except (ImportError, ValueError, TypeError) as err:
        # e.g. an unknown protocol or a storage option the filesystem does not take
        raise storage_failure(url, "open", err) from None
    return Location(fs, path.rstrip("/") or path)


def same_location(a: Location, b: Location) -> bool:
    if _protocols(a.fs) != _protocols(b.fs):
        return False
    if a.is_local:
        return os.path.realpath(a.path) == os.path.realpath(b.path)
    return a.path == b.path

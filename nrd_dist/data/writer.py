"""Writing shards and their manifest (docs/design.md section 3).

Shards are plain POSIX tar files, ``{prefix}-{000000}.tar``. Member metadata is fixed
(mtime 0, mode 0444, no owner names) so the same samples always give byte-identical
shards and therefore identical sha256 checksums: re-runs can be verified, and skipped
when a shard with a matching checksum already exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int


@dataclass
class ShardWriter:
    """Writes samples into numbered tar shards of ``shard_size`` samples each.

    Each shard is written under a temporary name and renamed when complete, so a crash
    never leaves a truncated file under a shard's real name.
    """

    out_dir: Path
    prefix: str
    shard_size: int
    shards: list[ShardInfo] = field(default_factory=list)
    _tar: Optional[tarfile.TarFile] = None
    _count: int = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: ``fields`` maps extensions (``png``, ``cls``, ``clean.cls``) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        if self._tar is None:
            self._open()
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._close()

    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        path = self._path(len(self.shards))
        self._tmp = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        path = self._path(len(self.shards))
        os.replace(self._tmp, path)
        self.shards.append(ShardInfo(path.name, self._count, sha256_file(path), path.stat().st_size))
        self._tar = None

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary file, then rename)."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())

"""One split's output folder as make_shards writes it, ``OUT/{split}/``: the shards
``{split}-{i:06d}.tar``, ``manifest.json``, and the progress record
``{split}.progress.json`` that lets a rerun of the same request resume (make_shards'
docstring, "Resuming and --force", states the contract)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from nrd_dist.data.writer import MANIFEST_NAME
from nrd_dist.tools.location import Location


def _with_map_order(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with the order of an ``asymmetric_sequential`` noise map made explicit:
    that kind applies its pairs in order, and ``sort_keys`` would hide a reordering (two
    requests that differ only there must not resume each other's outputs). Every other
    request hashes as before, so existing outputs keep their fingerprints."""
    noise = request.get("noise")
    sequential = isinstance(noise, dict) and noise.get("type") == "asymmetric_sequential"
    if not (sequential and isinstance(noise.get("map"), dict)):
        return request
    return {**request, "noise_map_order": [[str(k), str(v)] for k, v in noise["map"].items()]}


class SplitOutput:
    """``location`` (the split's folder) holding the outputs of one ``request`` (what the
    progress record fingerprints: everything that decides the shards' bytes)."""

    def __init__(self, location: Location, split: str, request: dict[str, Any]):
        self.location = location
        self.split = split
        self.request = request
        self.fingerprint = hashlib.sha256(json.dumps(_with_map_order(request), sort_keys=True).encode()).hexdigest()
        self.progress_name = f"{split}.progress.json"

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def _is_shard(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.split)}-\d+\.tar", name) is not None

    def existing(self) -> list[str]:
        """The names in the folder that this tool writes (shards, manifest, progress record)."""
        return [n for n in self.location.names() if self._is_shard(n) or n in (MANIFEST_NAME, self.progress_name)]

    def recorded_shards(self) -> list[dict[str, Any]]:
        """The shards an earlier run of this same request recorded. Raises
        FileExistsError when the folder's outputs come from another request, or have
        no progress record to say where they come from."""
        text = self.location.read_text(self.progress_name)
        progress = json.loads(text) if text else None
        if progress is None or progress.get("fingerprint") != self.fingerprint:
            why = (
                f"no {self.progress_name} records how they were made"
                if progress is None
                else _describe_change(progress.get("request", {}), self.request)
            )
            raise FileExistsError(
                f"{self.location.url()} already holds shards of another request ({why}); pass --force to overwrite"
            )
        return progress.get("shards", [])

    def save_progress(self, records: list[dict[str, Any]], complete: bool) -> None:
        """Record the finished shards; the complete record is rewritten only if it changed."""
        text = (
            json.dumps(
                {"fingerprint": self.fingerprint, "request": self.request, "complete": complete, "shards": records},
                indent=1,
            )
            + "\n"
        )
        if complete:
            self.write_if_changed(self.progress_name, text)
        else:
            self.location.write_text(self.progress_name, text)

    def write_if_changed(self, name: str, text: str) -> None:
        """So that a rerun with nothing to do touches nothing."""
        if self.location.read_text(name) != text:
            self.location.write_text(name, text)

    def remove_unrecorded_shards(self, records: list[dict[str, Any]]) -> None:
        """Delete this split's shards that ``records`` do not list, so that the folder
        holds exactly the manifest's shards."""
        recorded = {r["name"] for r in records}
        for name in self.location.names():
            if self._is_shard(name) and name not in recorded:
                self.location.delete(name)


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]
    return (
        "; ".join(c if not c.startswith("source_digest") else "the source listing changed" for c in changed)
        or "same request, different format"
    )

"""Where shards live: local paths, or any fsspec URL (``s3://``, ``gs://``, ``http(s)://``,
``file://``), behind one opener registered with webdataset.

* **Options** come from ``data.storage`` (``endpoint_url``, ``profile``, ``region``,
  ``anonymous``, and any other fsspec option of the protocol) plus the standard AWS
  environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` ...), which
  s3fs reads itself.
* **Retries**: a transient error (connection refused or reset, timeout, 5xx) while
  opening *or in the middle of reading* a shard is retried with exponential backoff; a
  read resumes at the byte it stopped at, so a blip costs nothing. Missing objects and
  denied access are not transient: they fail at once, naming the URL.
* **Secrets** (``key``, ``secret``, ``token`` ... in ``data.storage`` and the AWS secret
  variables) are scrubbed from every message this module raises and from the config
  the run writes (:func:`redact_config`).

``configure`` must run in every process that opens shards (DataLoader workers
included); :class:`nrd_dist.data.shards.ShardStream` does that at the start of each
iteration.
"""

from __future__ import annotations

import io
import os
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from webdataset.gopen import gopen_schemes

# fsspec protocols opened through this module (webdataset's own handlers for http(s)
# and gs shell out to curl / gsutil, which need not exist and do not retry).
PROTOCOLS = ("s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "hf", "memory")
SECRET_OPTION = re.compile(r"(key|secret|token|password|credential)", re.IGNORECASE)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
# Our portable names -> s3fs's; anything else in data.storage passes through unchanged.
S3_ALIASES = {"anonymous": "anon", "endpoint": "endpoint_url"}


class StorageError(ValueError):
    """A shard URL cannot be listed or read; the message names the URL (never a secret)."""


class _Settings:
    options: dict[str, Any] = {}
    retries: int = 4
    backoff_s: float = 0.5


def configure(options: Optional[dict[str, Any]] = None, retries: int = 4, backoff_s: float = 0.5) -> None:
    """Set this process's storage options (``data.storage``) and retry policy."""
    _Settings.options = dict(options or {})
    _Settings.retries = retries
    _Settings.backoff_s = backoff_s


def is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"


def fsspec_options(protocol: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``data.storage`` translated into the keyword arguments of the protocol's filesystem."""
    options = dict(_Settings.options if options is None else options)
    if protocol not in ("s3", "s3a"):
        return options
    out: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = dict(options.pop("client_kwargs", {}) or {})
    config_kwargs: dict[str, Any] = dict(options.pop("config_kwargs", {}) or {})
    region = options.pop("region", None)
    if region:
        client_kwargs["region_name"] = region
    for name, value in options.items():
        out[S3_ALIASES.get(name, name)] = value
    # Fail fast on a dead endpoint instead of botocore's 60 s connect timeout and its
    # own retries; our retry loop (with backoff) is the one that counts and reports.
    config_kwargs.setdefault("connect_timeout", 5)
    config_kwargs.setdefault("read_timeout", 60)
    config_kwargs.setdefault("retries", {"max_attempts": 1})
    out["client_kwargs"] = client_kwargs
    out["config_kwargs"] = config_kwargs
    return out


def filesystem(url: str):
    import fsspec

    protocol = urlparse(url).scheme
    fs = fsspec.filesystem(protocol, **fsspec_options(protocol))
    if protocol in ("s3", "s3a"):
        # s3fs also retries every call itself (5 tries with sleeps; a class attribute, not an
        # option): nested inside our loop, a dead endpoint took ~9 s per attempt of ours.
        fs.retries = 1
    return fs


# ------------------------------------------------------------------ secrets


def secrets(options: Optional[dict[str, Any]] = None) -> list[str]:
    """The secret strings that must never be printed: data.storage values under secret
    names, and the AWS secret environment variables."""
    options = _Settings.options if options is None else options
    found = [str(v) for k, v in _walk(options) if SECRET_OPTION.search(k) and v]
    found += [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _walk(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def redact(text: str, options: Optional[dict[str, Any]] = None) -> str:
    for secret in secrets(options):
        text = text.replace(secret, "***")
    return text


def redact_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with ``data.storage`` secrets replaced by ``***``."""
    def scrub(node: Any, name: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, k) for k, v in node.items()}
        return "***" if SECRET_OPTION.search(name) and node else node

    out = dict(tree)
    if isinstance(out.get("data"), dict) and "storage" in out["data"]:
        out["data"] = {**out["data"], "storage": scrub(out["data"]["storage"])}
    return out


# ------------------------------------------------------------------ errors


# botocore's credential errors, by name (botocore is only there when s3fs is used).
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "NoRegionError")


def _is_permanent(err: BaseException) -> bool:
    return (isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                             ValueError, TypeError))
            or type(err).__name__ in CREDENTIAL_ERRORS)


def explain(url: str, err: BaseException, attempts: int = 1) -> StorageError:
    """A clear, secret-free error for ``url``."""
    detail = redact(f"{type(err).__name__}: {err}")
    if isinstance(err, FileNotFoundError):
        bucket = urlparse(url).netloc
        what = f"shard {url!r} does not exist (no such key, or no such bucket {bucket!r})"
    elif type(err).__name__ in CREDENTIAL_ERRORS:
        what = (f"no usable credentials or settings for shard {url!r}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or data.storage (profile, region, anonymous: true for public buckets)")
    elif isinstance(err, PermissionError):
        what = (f"access to shard {url!r} was denied: check the credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID, "
                "data.storage.profile) and the bucket policy")
    else:
        what = f"cannot read shard {url!r} after {attempts} attempt(s)"
    return StorageError(f"{what} [{detail}]")


def _retrying(url: str, action: Callable[[], Any], before_retry: Optional[Callable[[], None]] = None):
    """Run ``action()``; retry transient errors with exponential backoff, calling
    ``before_retry()`` (e.g. reopen a broken stream) before each new attempt."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - classified below, never swallowed
            if _is_permanent(err) or attempt > _Settings.retries:
                raise explain(url, err, attempt) from None
            time.sleep(_Settings.backoff_s * 2 ** (attempt - 1))
            if before_retry is not None:
                before_retry()


# ------------------------------------------------------------------ reading


class RetryingReader(io.RawIOBase):
    """A read-only byte stream over a remote object that survives transient errors: on
    one it reopens the object and seeks back to the byte it had reached."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.position = 0
        self._fs = filesystem(url)
        self._file = None
        self._open()

    def _open(self) -> None:
        def do_open():
            handle = self._fs.open(self.url, "rb")
            if self.position:
                handle.seek(self.position)
            return handle

        self._file = _retrying(self.url, do_open)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = _retrying(self.url, lambda: self._file.read(len(buffer)), before_retry=self._reopen)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def _reopen(self) -> None:
        """After a broken read: a fresh connection, at the byte reached so far."""
        self._close_file()
        self._fs.invalidate_cache()
        self._open()

    def _close_file(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass

    def close(self) -> None:
        if self._file is not None:
            self._close_file()
            self._file = None
        super().close()


def open_url(url: str, mode: str = "rb", bufsize: int = 1 << 20, **_: Any):
    """webdataset's opener for fsspec URLs (registered below)."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are opened read-only")
    return io.BufferedReader(RetryingReader(url), buffer_size=bufsize)


for _protocol in PROTOCOLS:
    gopen_schemes[_protocol] = open_url


# ------------------------------------------------------------------ listing


def expand_remote(pattern: str, what: str) -> list[str]:
    """A remote URL, or a glob over one (``s3://bucket/train-*.tar``), as sorted URLs.

    Every rank lists for itself; object stores list in key order, and the result is
    sorted, so all ranks get the same list.
    """
    import glob as globlib

    fs = filesystem(pattern)
    protocol = urlparse(pattern).scheme
    if globlib.has_magic(urlparse(pattern).path):
        matches = _retrying(pattern, lambda: fs.glob(pattern))
        if not matches:
            raise StorageError(f"{what}: no shard matches {pattern!r}")
        return sorted(m if "://" in m else f"{protocol}://{m}" for m in matches)
    return [pattern]


def read_text(url: str) -> str:
    """A small text object (a manifest), local or remote."""
    if not is_remote(url):
        with open(urlparse(url).path if url.startswith("file://") else url) as f:
            return f.read()
    fs = filesystem(url)
    return _retrying(url, lambda: fs.cat_file(url).decode())


def check_exists(url: str, what: str) -> None:
    """Fail before any worker starts if a remote shard is missing or unreadable."""
    fs = filesystem(url)
    info = _retrying(url, lambda: fs.info(url))
    if info.get("type") == "directory":
        raise StorageError(f"{what}: {url!r} is a folder, not a shard")
    if not info.get("size"):
        raise StorageError(f"{what}: shard {url!r} is empty (0 bytes)")

"""Command-line pieces the shard tools share: ``--storage-options``, the ``--noise-*``
flags, and the error policy of a tool that may hold credentials."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

import yaml

from nrd_dist.data import storage
from nrd_dist.data.noise import NAMED_MAPS, NOISE_TYPES
from nrd_dist.data.storage import StorageError

# A transition matrix cannot be given on a command line; no noise is no --noise-type.
COMMAND_LINE_NOISE_TYPES = [t for t in NOISE_TYPES if t not in ("none", "matrix")]


# ----------------------------------------------------------------------------- storage


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help='fsspec options for remote URLs, e.g. \'{"endpoint_url": "http://host:9000"}\' '
        "(default: the AWS environment)",
    )


def parse_storage_options(text: Optional[str]) -> dict[str, Any]:
    """``--storage-options`` JSON -> dict; the error never echoes the text (it may hold keys)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise StorageError(f"--storage-options: not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(options, dict):
        raise StorageError(f"--storage-options: expected a JSON object, got {type(options).__name__}")
    return options


def run_cli(body: Callable[[dict[str, Any]], int], storage_options_text: Optional[str]) -> int:
    """Run a tool's ``body(storage_options)`` with the tools' error policy: any failure is
    one ``error:`` line on stderr with every secret redacted, and exit status 2."""
    options: dict[str, Any] = {}
    try:
        options = parse_storage_options(storage_options_text)
        return body(options)
    except Exception as err:  # noqa: BLE001 - no traceback: it could carry a credential
        message = str(err) if isinstance(err, (ValueError, FileExistsError)) else f"{type(err).__name__}: {err}"
        print(storage.redact(f"error: {message}", options), file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- noise spec


def add_noise_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--noise-type/--noise-rate/--noise-seed/--noise-map``, as the data config names them.

    ``required`` is for a tool whose whole job is the noise (inject_noise): type and rate
    must be given and the type is checked here. Otherwise (make_shards) no
    ``--noise-type`` means no noise, and ``apply_noise`` checks the spec when it is used.
    """
    parser.add_argument(
        "--noise-type",
        default=None,
        required=required,
        choices=COMMAND_LINE_NOISE_TYPES if required else None,
        help=f"label noise to bake in: {', '.join(COMMAND_LINE_NOISE_TYPES)}",
    )
    parser.add_argument(
        "--noise-rate",
        type=float,
        default=None if required else 0.0,
        required=required,
        help="probability that a sample's label is resampled",
    )
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument(
        "--noise-map",
        default=None,
        help=f"map of the asymmetric kinds: {', '.join(NAMED_MAPS)} or YAML such as '{{0: 2, 6: 0}}' "
        "(asymmetric_sequential applies its pairs in the order written)",
    )


def noise_spec_from_args(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """The ``data.noise`` mapping the arguments describe, or None without ``--noise-type``."""
    if not args.noise_type:
        return None
    spec: dict[str, Any] = {"type": args.noise_type, "rate": args.noise_rate, "seed": args.noise_seed}
    if args.noise_map is not None:
        spec["map"] = yaml.safe_load(args.noise_map)
    return spec

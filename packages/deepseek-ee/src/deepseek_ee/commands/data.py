"""`deepseek-ee data prepare`: tokenize many files into packed token shards on a Dask cluster."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from deepseek_core.argtypes import positive_int

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'64MB', '1GiB', '512k', '1000' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64MB, 1GB, 500000)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def register(subparsers: Any) -> None:
    """Add `data` (with `data prepare`) to the deepseek-ee CLI."""
    data = subparsers.add_parser("data", help="prepare training data (Dask pipeline)")
    data_sub = data.add_subparsers(dest="data_command", metavar="{prepare}")
    data_sub.required = True
    p = data_sub.add_parser(
        "prepare",
        help="tokenize .txt/.jsonl/.parquet files into packed token shards",
        description="Tokenize many .txt, .jsonl and .parquet files (local paths, globs, directories or "
        "fsspec URLs such as s3://bucket/corpus/*.jsonl) in parallel on a Dask cluster into packed token "
        "shards plus index.json. Rerunning with the same output directory resumes.",
    )
    p.add_argument(
        "--input",
        "-i",
        action="extend",
        nargs="+",
        required=True,
        metavar="GLOB_OR_URL",
        help="input files: paths, globs (quote them), directories or URLs; repeatable",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory with tokenizer.json")
    p.add_argument(
        "--scheduler",
        metavar="tcp://HOST:8786",
        help="existing Dask scheduler (default: a LocalCluster of --workers processes)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="LocalCluster worker processes (default 2)"
    )
    p.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=None,
        help="maximum tokens per shard file (default 33554432)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=parse_size,
        default=None,
        help="input bytes per task; larger files are split (default 64MB)",
    )
    p.add_argument(
        "--dtype", choices=["uint16", "uint32"], help="token dtype (default: from vocabulary size)"
    )
    p.add_argument(
        "--text-field", default="text", help="jsonl field / parquet column with the text (default text)"
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        default="fail",
        help="bad records (invalid UTF-8, bad jsonl line): fail the run (default) or skip and list",
    )
    p.add_argument("--append-eos", action="store_true", help="append the tokenizer's EOS after each document")
    p.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=None,
        help="tasks submitted at once (default: 2 x worker threads)",
    )
    p.add_argument(
        "--storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='fsspec options for remote inputs, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'',
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of `data prepare`; returns the exit status."""
    from ..data import DataError, prepare_dataset
    from ..data.pipeline import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_TOKENS
    from . import CommandError

    try:
        index = prepare_dataset(
            args.input,
            args.output,
            args.tokenizer,
            scheduler=args.scheduler,
            n_workers=args.workers,
            shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
            chunk_bytes=args.chunk_bytes or DEFAULT_CHUNK_BYTES,
            dtype=args.dtype,
            text_field=args.text_field,
            on_error=args.on_error,
            append_eos=args.append_eos,
            max_in_flight=args.max_in_flight,
            storage_options=args.storage_options,
            progress=not args.quiet,
        )
    except DataError as exc:
        hint = ""
        if exc.line is not None or exc.row is not None:
            hint = "\n(fix the record or pass --on-error skip; a rerun keeps the shards already finished)"
        raise CommandError(f"{exc}{hint}", 1) from None
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CommandError(str(exc), 2) from None
    if index.skipped and args.quiet:  # the summary is printed by prepare_dataset unless quiet
        print(
            f"skipped {len(index.skipped)} bad records (listed in {args.output}/index.json)", file=sys.stderr
        )
    print(f"{index.total_tokens} tokens, {len(index.shards)} shards ({index.dtype}) in {args.output}")
    return 0

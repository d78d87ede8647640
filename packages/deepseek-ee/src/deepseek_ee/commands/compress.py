"""`deepseek-ee compress`: INT8-quantize a checkpoint behind a held-out perplexity gate.

Exit codes: 0 written (gate passed, or --force); 1 the gate failed (nothing written; the message says by
how much); 2 bad input.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deepseek_core.argtypes import bounded, positive_int

from . import CommandError

_FRACTION = bounded(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1) (0.02 = 2%)")
_CLIP_RATIO = bounded(float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")

METHODS = ("dynamic_quantization", "weight_only")


def register(subparsers: Any) -> None:
    """Add `compress` to the deepseek-ee CLI."""
    p = subparsers.add_parser(
        "compress",
        help="INT8-quantize a checkpoint, gated on held-out perplexity",
        description="Quantize a float checkpoint to INT8 (dynamic: int8 weights and per-token int8 "
        "activations; weight_only: int8 weights, float activations), measure held-out perplexity before and "
        "after on --eval-data, and write the INT8 checkpoint to --output only if perplexity rose by at most "
        "--max-loss (relative). Exits 1, saying by how much, when the gate fails. The report is printed "
        "and saved as JSON (--report, else OUTPUT/compression_report.json, or OUTPUT.compression_report.json "
        "beside it when nothing was written).",
    )
    p.add_argument(
        "--model",
        help="float checkpoint directory (config.json + safetensors + tokenizer), or its s3:// / gs:// URL",
    )
    p.add_argument(
        "--output", help="where to write the INT8 checkpoint directory (a path or s3:// / gs:// URL)"
    )
    p.add_argument("--config", type=Path, help="EE YAML config: its `compression` section gives defaults")
    p.add_argument("--method", choices=METHODS, help="quantization method (default dynamic_quantization)")
    p.add_argument(
        "--max-loss", type=_FRACTION, help="largest relative perplexity increase allowed (default 0.02)"
    )
    p.add_argument("--eval-data", help="held-out text (.txt/.jsonl/.parquet; a path or URL) for the gate")
    p.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="tokens of eval data used (default 16384)"
    )
    p.add_argument(
        "--eval-window", type=positive_int, default=256, help="tokens per eval window (default 256)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="eval windows per forward pass (default 8)"
    )
    p.add_argument("--report", type=Path, help="where to save the JSON report")
    p.add_argument(
        "--granularity",
        choices=("per-channel", "per-tensor"),
        default="per-channel",
        help="weight scales: one per output channel (default; accurate) or one per matrix (coarser, loses accuracy)",
    )
    p.add_argument(
        "--clip-ratio",
        type=_CLIP_RATIO,
        default=1.0,
        help="fraction of each weight range kept before rounding; values beyond it saturate (default 1.0: no "
        "clipping). Lower values trade outlier accuracy for resolution and usually lose accuracy.",
    )
    p.add_argument(
        "--quantize-embeddings", action="store_true", help="also store the token embedding as int8 rows"
    )
    p.add_argument("--keep-lm-head-float", action="store_true", help="leave the output projection in float")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="MODULE",
        help="keep this module (and its children) float",
    )
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write the INT8 checkpoint even if the gate fails or there is no eval data",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handle `deepseek-ee compress`: remote --model / --eval-data are fetched (hash-verified) first, and a
    remote --output is written locally, then published (the checkpoint with its manifest last; when the gate
    failed, only the report, beside the URL)."""
    from deepseek_core import storage

    section: Any = None
    if args.config is not None:
        from ..config import load_ee_config

        section = load_ee_config(args.config).compression
        if section.dtype != "int8":
            raise CommandError(
                f"{args.config}: compression.dtype {section.dtype!r} is not supported (int8)", 2
            )
    if args.model is None:
        raise CommandError("--model: required (a float checkpoint directory)", 2)
    destination = args.output or (section.output_dir if section and section.output_dir else None)
    if destination is None:
        raise CommandError("--output: required (or compression.output_dir in --config)", 2)
    remote = storage.is_remote(destination)
    with tempfile.TemporaryDirectory(prefix="deepseek-compress-") as staging:
        output = Path(staging) / "int8" if remote else Path(destination)
        report = _compress(args, section, output, Path(staging))
        if remote and report.written:
            storage.upload_directory(output, destination)
            print(f"  published: {destination}")
        elif remote and args.report is None and report.report_path:
            from ..compression.gate import REPORT_NAME

            published = f"{destination}.{REPORT_NAME}"
            with storage.open_url(published, "wb") as sink:
                sink.write(Path(report.report_path).read_bytes())
            print(f"  report: {published}")
    _judge(report, destination, args.force)
    return 0


def _local_path(url: str, what: str, fetch: Any) -> Path:
    """`url` itself when local; else what `fetch(url)` downloads, with errors naming the option `what`."""
    from deepseek_core import storage

    if not storage.is_remote(url):
        return Path(url)
    try:
        return Path(fetch(url))
    except (OSError, ImportError, ValueError) as exc:
        raise CommandError(f"{what}: cannot read {url}: {exc}", 2) from None


def _compress(args: argparse.Namespace, section: Any, output: Path, staging: Path) -> Any:
    """Fetch the inputs, run the compression and the gate into `output`; print and return the report."""
    from deepseek_core import storage

    from ..compression import compress_checkpoint

    def download(url: str) -> Path:
        target = staging / f"eval-data{Path(url).suffix}"
        with storage.open_url(url, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
        return target

    method = args.method or (section.method if section else "dynamic_quantization")
    max_loss = (
        args.max_loss if args.max_loss is not None else (section.max_loss_increase if section else 0.02)
    )
    model = _local_path(args.model, "--model", storage.fetch_checkpoint)
    eval_url = args.eval_data or (section.eval_data if section else None)
    eval_data = _local_path(eval_url, "--eval-data", download) if eval_url else None
    if not (model / "config.json").is_file():
        raise CommandError(
            f"--model: {model / 'config.json'} not found (is {model} a checkpoint directory?)", 2
        )
    if eval_data is None and not args.force:
        raise CommandError(
            "--eval-data: required: the accuracy gate needs held-out text (use --force to write without checking)",
            2,
        )
    if eval_data is not None and not eval_data.is_file():
        raise CommandError(f"--eval-data: {eval_data} not found", 2)
    try:
        report = compress_checkpoint(
            model,
            output,
            method=method,
            eval_data=eval_data,
            max_loss=max_loss,
            granularity=args.granularity,
            clip_ratio=args.clip_ratio,
            quantize_embeddings=args.quantize_embeddings,
            quantize_lm_head=not args.keep_lm_head_float,
            modules_to_not_convert=args.skip or None,
            eval_tokens=args.eval_tokens,
            eval_window=args.eval_window,
            batch_size=args.batch_size,
            force=args.force,
            report_path=args.report,
            max_shard_size=args.max_shard_size,
            progress=True,
        )
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None
    print(report.summary())
    print(f"  report: {report.report_path}")
    return report


def _judge(report: Any, destination: str, force: bool) -> None:
    """Exit 1 when the gate failed (unless forced); warn about what --force let through."""
    if report.passed is False and not force:
        assert report.before is not None and report.after is not None
        raise CommandError(
            f"accuracy gate failed: perplexity rose {report.relative_change:.2%}, over the "
            f"{report.max_loss:.2%} limit by {report.excess:.2%} ({report.before['perplexity']:.4f} -> "
            f"{report.after['perplexity']:.4f}); {destination} was not written",
            1,
        )
    if report.passed is False:
        print(
            f"WARNING: --force: wrote {destination} although the accuracy gate failed (over the limit by "
            f"{report.excess:.2%})"
        )
    elif report.passed is None:
        print(f"WARNING: --force without eval data: wrote {destination} with no accuracy check")

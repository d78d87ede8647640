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

from . import CommandError

METHODS = ("dynamic_quantization", "weight_only")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0.02 = 2%), got {value}")
    return value


def _clip_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
        "--max-loss", type=_fraction, help="largest relative perplexity increase allowed (default 0.02)"
    )
    p.add_argument("--eval-data", help="held-out text (.txt/.jsonl/.parquet; a path or URL) for the gate")
    p.add_argument(
        "--eval-tokens", type=_positive_int, default=16384, help="tokens of eval data used (default 16384)"
    )
    p.add_argument(
        "--eval-window", type=_positive_int, default=256, help="tokens per eval window (default 256)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="eval windows per forward pass (default 8)"
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
        type=_clip_ratio,
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
    remote --output is written locally, then published with its manifest last."""
    from deepseek_core import storage

    with tempfile.TemporaryDirectory(prefix="deepseek-compress-") as staging:
        try:
            output = _compress(args, Path(staging))
        except CommandError:
            # A failed gate writes its report beside the (unwritten) output: publish it beside the URL too.
            report = Path(staging) / "int8.compression_report.json"
            if storage.is_remote(args.output or "") and report.is_file() and args.report is None:
                with storage.open_url(f"{args.output}.compression_report.json", "wb") as sink:
                    sink.write(report.read_bytes())
                print(f"  report: {args.output}.compression_report.json")
            raise
        if output is not None and storage.is_remote(args.output or ""):
            storage.upload_directory(output, args.output)
            print(f"  published: {args.output}")
    return 0


def _local(url: str | None, staging: Path, what: str) -> Path | None:
    """A local path for `url`; a remote file is downloaded into `staging`, a remote checkpoint fetched."""
    from deepseek_core import storage

    if url is None or not storage.is_remote(url):
        return Path(url) if url is not None else None
    try:
        if what == "--model":
            return storage.fetch_checkpoint(url)
        target = staging / f"eval-data{Path(url).suffix}"
        with storage.open_url(url, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
        return target
    except (OSError, ImportError, ValueError) as exc:
        raise CommandError(f"{what}: cannot read {url}: {exc}", 2) from None


def _compress(args: argparse.Namespace, staging: Path) -> Path | None:
    """Run the compression and the gate; return the local INT8 directory written (None: nothing written)."""
    from deepseek_core import storage

    from ..compression import compress_checkpoint

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
    output_arg = args.output or (section.output_dir if section and section.output_dir else None)
    if output_arg is None:
        raise CommandError("--output: required (or compression.output_dir in --config)", 2)
    args.output = output_arg
    output = staging / "int8" if storage.is_remote(output_arg) else Path(output_arg)
    method = args.method or (section.method if section else "dynamic_quantization")
    max_loss = (
        args.max_loss if args.max_loss is not None else (section.max_loss_increase if section else 0.02)
    )
    model = _local(args.model, staging, "--model")
    assert model is not None
    eval_data = _local(args.eval_data or (section.eval_data if section else None), staging, "--eval-data")
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
    if report.passed is False and not args.force:
        assert report.before is not None and report.after is not None
        raise CommandError(
            f"accuracy gate failed: perplexity rose {report.relative_change:.2%}, over the {max_loss:.2%} limit "
            f"by {report.excess:.2%} ({report.before['perplexity']:.4f} -> {report.after['perplexity']:.4f}); "
            f"{args.output} was not written",
            1,
        )
    if report.passed is False:
        print(
            f"WARNING: --force: wrote {args.output} although the accuracy gate failed (over the limit by {report.excess:.2%})"
        )
    elif report.passed is None:
        print(f"WARNING: --force without eval data: wrote {args.output} with no accuracy check")
    return output

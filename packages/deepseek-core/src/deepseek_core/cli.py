"""The `deepseek-core` console command: `serve` (the OpenAI-compatible server) and `info` (model sizes).

`main(argv)` returns an exit status; editions reuse it, or reuse `add_serve_arguments` / `run_serve` for
their own `serve` subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .argtypes import bounded, non_negative_float, non_negative_int, positive_int

API_KEY_ENV = "DEEPSEEK_API_KEY"


_port = bounded(int, lambda v: 0 <= v <= 65535, "must be a TCP port (0-65535)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `serve` to `parser`."""
    parser.add_argument("--model", required=True, help="checkpoint directory (or model id) to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"accepted bearer key (repeatable; or set ${API_KEY_ENV})",
    )
    keys.add_argument("--api-key-file", metavar="FILE", help="file of accepted keys, one per line")
    parser.add_argument(
        "--served-model-name", default=None, help="name clients pass as `model` (default: --model)"
    )
    parser.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=None,
        help="answer 429 when more sequences than this would wait (default: unbounded)",
    )
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGTERM (default 30)",
    )
    parser.add_argument("--max-num-seqs", type=positive_int, default=None, help="sequences run at once")
    parser.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=None, help="tokens per engine step"
    )
    parser.add_argument("--num-kv-blocks", type=positive_int, default=None, help="KV-cache blocks")
    parser.add_argument(
        "--step-priority",
        choices=["normal", "idle"],
        default="normal",
        help="CPU priority of the engine's stepping thread; idle: request handling always goes first (Linux)",
    )
    parser.add_argument("--audit-log", metavar="FILE", default=None, help="append one JSON line per request")
    parser.add_argument(
        "--audit-log-include-text",
        action="store_true",
        help="also log prompt and completion text (off by default)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def _api_keys(args: argparse.Namespace) -> list[str] | None:
    from .serving.auth import read_key_file

    if args.api_key_file:
        return read_key_file(args.api_key_file)
    if args.api_key:
        if any(not k.strip() for k in args.api_key):
            raise ValueError("--api-key: an empty key is not allowed")
        return [k.strip() for k in args.api_key]
    env = os.environ.get(API_KEY_ENV, "").strip()
    return [env] if env else None


def build_engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """An AsyncLLM from the serve options."""
    from .engine import AsyncLLM

    kwargs = {}
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    step_priority = getattr(args, "step_priority", "normal")
    return AsyncLLM(args.model, dtype=args.dtype, device=device, step_priority=step_priority, **kwargs)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve until SIGTERM; 0 after a clean drain."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        from .serving.app import create_app
        from .serving.server import run_server
    except ImportError as exc:
        print(
            f"error: serving needs the [serve] extra: pip install 'deepseek-core[serve]' ({exc})",
            file=sys.stderr,
        )
        return 2
    api_keys = _api_keys(args)
    engine = build_engine(args)
    app = create_app(
        engine,
        served_model_name=args.served_model_name or args.model,
        api_keys=api_keys,
        max_waiting=args.max_waiting,
        drain_timeout=args.drain_timeout,
        audit_log=args.audit_log,
        audit_log_include_text=args.audit_log_include_text,
        shutdown_engine=True,
    )
    logging.getLogger("deepseek_core.serving").info(
        "serving %s on http://%s:%d (auth %s)",
        args.served_model_name or args.model,
        args.host,
        args.port,
        "on" if api_keys else "off",
    )
    run_server(
        app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level
    )
    return 0


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{nbytes} B"


def run_info(args: argparse.Namespace) -> int:
    """Print the parameter count and memory per dtype of a preset or a checkpoint directory."""
    from .config import ModelConfig
    from .presets import preset_names

    target = args.target
    if target in preset_names():
        config = ModelConfig.from_preset(target)
        source = f"preset {target}"
    else:
        config = ModelConfig.from_pretrained(target)
        source = str(target)
    params = config.param_count()
    print(
        f"model:       {source} ({config.model_type}{', MLA' if config.is_mla else ''}"
        f"{', MoE' if config.is_moe else ''})"
    )
    print(f"parameters:  {params:,} ({params / 1e6:.1f}M)")
    print(
        f"layers:      {config.num_hidden_layers}, hidden {config.hidden_size}, vocab {config.vocab_size}, "
        f"context {config.max_position_embeddings}"
    )
    print("weights:")
    for dtype, nbytes in config.memory_table().items():
        print(f"  {dtype:<9} {_human(nbytes):>12}")
    kv = config.kv_cache_bytes_per_token("bfloat16")
    print(
        f"kv cache:    {_human(kv)} per token (bfloat16), {_human(kv * config.max_position_embeddings)} "
        "per full-context sequence"
    )
    return 0


def build_parser(prog: str = "deepseek-core") -> argparse.ArgumentParser:
    """The argument parser of `deepseek-core`."""
    parser = argparse.ArgumentParser(prog=prog, description="DeepSeek-family models: serve and inspect.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a checkpoint over the OpenAI API (completions, chat, models).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    info = sub.add_parser("info", help="parameter count and memory of a preset or checkpoint")
    info.add_argument(
        "target", metavar="PRESET_OR_DIR", help="a preset name (e.g. deepseek-tiny) or a directory"
    )
    info.set_defaults(func=run_info)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "deepseek-core") -> int:
    """Run the CLI; returns the exit status (errors are printed, not raised)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

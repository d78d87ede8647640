"""`deepseek-cne pipeline`: compile the Kubeflow pipeline; `evaluate` is its accuracy-gate step."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add `pipeline compile` and `pipeline evaluate` to the CLI."""
    p = subparsers.add_parser("pipeline", help="Kubeflow pipeline: compile it, or run its evaluate step")
    sub = p.add_subparsers(dest="pipeline_command", required=True, metavar="SUBCOMMAND")

    c = sub.add_parser("compile", help="compile prepare -> train -> compress -> evaluate -> deploy (kfp v2)")
    c.add_argument(
        "--output", default="pipeline.yaml", help="pipeline file, .yaml or .json (default pipeline.yaml)"
    )
    c.set_defaults(handler=run_compile)

    e = sub.add_parser("evaluate", help="accuracy gate: candidate loss vs baseline loss on held-out text")
    e.add_argument("--baseline", required=True, help="reference checkpoint (dir or s3:// / gs:// URL)")
    e.add_argument("--candidate", required=True, help="checkpoint under test (e.g. the INT8 one)")
    e.add_argument("--data", required=True, help="held-out text: .txt, or .jsonl with a 'text' field")
    e.add_argument(
        "--max-loss-increase", type=float, default=0.02, help="relative loss increase allowed (0.02)"
    )
    e.add_argument("--tokenizer", help="tokenizer dir (default: the baseline's)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-tokens", type=int, default=32768, help="tokens scored at most (default 32768)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32)")
    e.add_argument("--device", default=None, help="cpu | cuda (default cpu)")
    e.add_argument("--report", help="write the JSON accuracy report here")
    e.add_argument("--passed", help="write 'true' or 'false' here (the pipeline's gate value)")
    e.add_argument("--fail-on-regression", action="store_true", help="exit 3 when the gate fails")
    e.set_defaults(handler=run_evaluate)


def run_compile(args: argparse.Namespace) -> int:
    """Entry point of `deepseek-cne pipeline compile`."""
    from ..pipeline import compile_pipeline

    print(f"wrote {compile_pipeline(args.output)}", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Entry point of `deepseek-cne pipeline evaluate`."""
    from ..evaluate import evaluate_gate, write_outputs

    report = evaluate_gate(
        args.baseline,
        args.candidate,
        args.data,
        max_loss_increase=args.max_loss_increase,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        device=args.device,
    )
    write_outputs(report, args.report, args.passed)
    print(json.dumps(report.to_dict()))
    return 3 if args.fail_on_regression and not report.passed else 0

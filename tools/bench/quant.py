"""INT8 decode throughput: our engine in float32, INT8 weight-only and INT8 dynamic, against transformers in
float32 and transformers + torch.ao dynamic INT8 (quantize_dynamic on LlamaForCausalLM), in one run.

Same random weights everywhere (the ~134M preset, saved with save_model, loaded by transformers), greedy
decoding after a --prompt-len prompt, ignore_eos, at batch 1 and batch 16 (16 equal-length prompts: no padding
on either side). Decode tokens/s = batch x (N - 1) / (time to generate N tokens - time to generate 1), so the
prompt's prefill is not counted. Variants run interleaved, --rounds times, medians. --clock cpu times process
CPU seconds instead of wall seconds: on a machine shared with other jobs, with --threads 1, that is what stays
comparable. Goal: INT8 weight-only >= 3x our float32 at batch 1, and faster than the transformers INT8 baseline.

    python tools/bench/quant.py                        # batch 1 and 16, 64 new tokens, 3 rounds, wall clock
    python tools/bench/quant.py --threads 1 --clock cpu
    python tools/bench/quant.py --quick                # 32 new tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_summary, print_table  # noqa: E402
from deepseek_core import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from deepseek_core.engine import LLM, SamplingParams  # noqa: E402
from deepseek_core.quant import kernel_isa, quantize_model, tensor_bytes  # noqa: E402

KV_BYTES = 512 << 20  # plenty for 16 sequences of ~100 tokens; the default would reserve 1 GiB per engine


def hf_int8_baseline(model: Any) -> tuple[Any, str]:
    """transformers model with dynamic INT8 linears: torch.ao quantize_dynamic if it still works, else torchao."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return quantized, "torch.ao.quantization.quantize_dynamic (qint8, fbgemm/x86)"
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model, f"torchao Int8DynamicActivationInt8WeightConfig (quantize_dynamic failed: {exc})"


def ours_run(
    llm: LLM, prompts: torch.Tensor, n: int, outputs: dict[str, Any], name: str
) -> Callable[[], None]:
    """Generate n greedy tokens per prompt with our engine, recording the tokens under `name`."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def run() -> None:
        outs = llm.generate(prompts.tolist(), params)
        assert all(len(o.token_ids) == n for o in outs)
        outputs[name] = [o.token_ids for o in outs]

    return run


def hf_run(
    model: Any, prompts: torch.Tensor, n: int, outputs: dict[str, Any], name: str
) -> Callable[[], None]:
    """Generate exactly n greedy tokens per prompt with transformers' generate."""

    def run() -> None:
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
        outputs[name] = out[:, prompts.shape[1] :].tolist()

    return run


def run_round(
    fns: dict[str, dict[int, Callable[[], Any]]],
    samples: dict[str, dict[int, list[float]]],
    clock: Callable[[], float],
) -> None:
    for name, by_len in fns.items():
        for n, fn in by_len.items():
            start = clock()
            fn()
            samples[name][n].append(clock() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deepseek-134m")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall or process CPU seconds"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    batches = [int(b) for b in args.batches.split(",")]
    config = ModelConfig.from_preset(args.preset)
    print(f"# INT8 decode: {args.preset} ({config.param_count() / 1e6:.0f}M), {machine_summary()}")
    print(
        f"# native INT8 kernels: {kernel_isa()}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{args.rounds} rounds, {args.clock} clock"
    )

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(Transformer(config), tmp)
        f32 = load_model(tmp)
        ours: dict[str, LLM] = {"ours float32": LLM(f32, max_num_seqs=max(batches), kv_cache_bytes=KV_BYTES)}
        sizes = {"ours float32": tensor_bytes(f32)}
        for method, label in (
            ("weight_only", "ours int8 weight-only"),
            ("dynamic_quantization", "ours int8 dynamic"),
        ):
            q = quantize_model(load_model(tmp), method)
            ours[label] = LLM(q, max_num_seqs=max(batches), kv_cache_bytes=KV_BYTES)
            sizes[label] = tensor_bytes(q)
        hf: dict[str, Any] = {}
        baseline_name = "none"
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf["transformers float32"] = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            hf_q, baseline_name = hf_int8_baseline(
                AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            )
            hf["transformers int8 dynamic"] = hf_q
        print(f"# transformers INT8 baseline: {baseline_name}")

        rows: list[dict[str, object]] = []
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(2, config.vocab_size, (batch, args.prompt_len), generator=gen)
            outputs: dict[str, list[list[int]]] = {}
            lengths = (1, args.new_tokens)
            fns = {
                name: {n: ours_run(llm, prompts, n, outputs, name) for n in lengths}
                for name, llm in ours.items()
            }
            fns.update(
                {
                    name: {n: hf_run(model, prompts, n, outputs, name) for n in lengths}
                    for name, model in hf.items()
                }
            )
            samples: dict[str, dict[int, list[float]]] = {name: {n: [] for n in lengths} for name in fns}
            with torch.inference_mode():
                for by_len in fns.values():  # warm-up
                    by_len[1]()
                for _ in range(args.rounds):
                    run_round(fns, samples, clock)
            tps = {
                name: batch
                * (args.new_tokens - 1)
                / (statistics.median(ts[args.new_tokens]) - statistics.median(ts[1]))
                for name, ts in samples.items()
            }
            reference = outputs["ours float32"]
            for name in fns:
                same = sum(a == b for ra, rb in zip(outputs[name], reference) for a, b in zip(ra, rb))
                rows.append(
                    {
                        "batch": batch,
                        "variant": name,
                        "tokens/s": f"{tps[name]:.1f}",
                        "vs ours f32": f"{tps[name] / tps['ours float32']:.2f}x",
                        "vs hf int8": f"{tps[name] / tps['transformers int8 dynamic']:.2f}x" if hf else "-",
                        "weight MB": f"{sizes[name] / 1e6:.0f}" if name in sizes else "-",
                        "greedy = ours f32": f"{same / (batch * args.new_tokens):.0%}",
                    }
                )
    print_table(rows)


if __name__ == "__main__":
    main()

"""Generation throughput: our engine (paged KV cache, continuous batching) against transformers' generate.

Same random weights on both sides (ours saved with save_model, loaded by transformers' from_pretrained), in
one run, with ratios:

1. Single stream: batch 1, a 32-token prompt, 128 new greedy tokens, per dtype. Goal: >= 1.5x transformers
   (the ratio is the median of per-round ratios; each round runs both sides back to back).
   Also the fraction of the memory-bandwidth limit: weight bytes read per token x tokens/s / measured read
   bandwidth (a large tensor sum, measured here).
2. Mixed workload: N requests (prompts 16-512 tokens, outputs 16-256, shapes from a seeded RNG) submitted at
   once. Ours: continuous batching. Transformers: static batching at its best (sorted by prompt length,
   left-padded batches, each batch generating its longest output; the best of --hf-batch-sizes).
   Goal: >= 2x total throughput (useful generated tokens / s). Also p50/p99 time to first token and
   inter-token latency.

    python tools/bench/decode.py --quick                       # a few minutes on a laptop CPU
    python tools/bench/decode.py                               # the full figures (CPU: long)
    python tools/bench/decode.py --device cuda --preset deepseek-llm-7b-base --dtypes bfloat16 --cuda-graphs

On CPU, --threads 1 gives steadier figures on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_summary, print_table  # noqa: E402
from deepseek_core import ModelConfig, Transformer, save_model  # noqa: E402
from deepseek_core.engine import LLM, SamplingParams  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, mbytes: int = 512) -> float:
    """Bytes/s of summing a large float32 tensor (best of several runs): the memory-read roof."""
    x = torch.ones(mbytes * (1 << 20) // 4, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights a decode step reads (the embedding table is only indexed, one row per token)."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head.weight is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class StepClock:
    """A transformers streamer that timestamps every generation step (one put() per step for the batch)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first put() is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- single stream
def single_stream(
    ours: LLM, hf: Any, device: torch.device, prompt_len: int, new_tokens: int, rounds: int
) -> dict:
    vocab = ours.config.vocab_size
    prompt = torch.randint(2, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def run_ours() -> list[int]:
        return ours.generate([prompt], params)[0].token_ids

    def run_hf() -> list[int]:
        out = hf.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0
        )
        return out[0, prompt_len:].tolist()

    with torch.inference_mode():
        same = run_ours() == run_hf()  # also the warm-up
        samples: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(rounds):
            for name, fn in (("ours", run_ours), ("hf", run_hf)):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                samples[name].append(time.perf_counter() - start)
    return {
        "ours": new_tokens / statistics.median(samples["ours"]),
        "hf": new_tokens / statistics.median(samples["hf"]),
        # Each round runs both back to back: the median of per-round ratios is steadier on a noisy machine
        # than the ratio of the two medians.
        "ratio": statistics.median(h / o for o, h in zip(samples["ours"], samples["hf"])),
        "same_tokens": same,
    }


# ---------------------------------------------------------------------------------------------- mixed workload
def make_workload(n: int, vocab: int, prompt_range: tuple[int, int], out_range: tuple[int, int], seed: int):
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        requests.append(([rng.randrange(2, vocab) for _ in range(plen)], rng.randint(*out_range)))
    return requests


def run_engine_workload(llm: LLM, requests: list[tuple[list[int], int]], device: torch.device) -> dict:
    engine = llm.engine
    start = time.perf_counter()
    arrival: dict[str, float] = {}
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    generated = 0
    for i, (prompt, n_out) in enumerate(requests):
        rid = f"r{i}"
        engine.add_request(prompt, SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True), rid)
        arrival[rid] = start
    with torch.inference_mode():
        while engine.has_unfinished_requests():
            outputs = engine.step()
            sync(device)
            now = time.perf_counter()
            for out in outputs:
                k = len(out.token_ids_delta)
                if not k:
                    continue
                generated += k
                if out.request_id not in last:
                    ttft.append(now - arrival[out.request_id])
                else:
                    itl.extend([(now - last[out.request_id]) / k] * k)
                last[out.request_id] = now
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "tokens": generated, "ttft": ttft, "itl": itl}


def run_hf_static(
    hf: Any, requests: list[tuple[list[int], int]], batch_size: int, device: torch.device
) -> dict:
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    start = time.perf_counter()
    ttft: list[float] = []
    itl: list[float] = []
    useful = 0
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[b : b + batch_size]]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (p, _) in enumerate(batch):  # left padding
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            longest = max(n for _, n in batch)
            clock = StepClock()
            hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=longest,
                pad_token_id=0,
                streamer=clock,
            )
            for _, n_out in batch:
                useful += n_out
                times = clock.times[:n_out]
                ttft.append(times[0] - start)
                itl.extend(b - a for a, b in zip(times, times[1:]))
    return {"elapsed": time.perf_counter() - start, "tokens": useful, "ttft": ttft, "itl": itl}


# ---------------------------------------------------------------------------------------------- main
def build_models(
    preset: str, layers: int | None, dtype: torch.dtype, device: torch.device, with_hf: bool, tmp: str
):
    overrides = {"num_hidden_layers": layers} if layers else {}
    config = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(dtype).eval()
    hf = None
    if with_hf:
        from transformers import AutoModelForCausalLM

        save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None  # both sides generate exactly the asked number of tokens
    return config, model, hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller mixed workload")
    parser.add_argument("--preset", default="deepseek-134m")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smaller runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--requests", type=int, default=None, help="mixed workload size (default 64, quick 16)"
    )
    parser.add_argument("--max-prompt", type=int, default=None, help="longest mixed prompt (default 512)")
    parser.add_argument("--max-output", type=int, default=None, help="longest mixed output (default 256)")
    parser.add_argument("--hf-batch-sizes", default=None, help="static batch sizes tried for transformers")
    parser.add_argument("--mixed-dtype", default="float32", help="dtype of the mixed workload ('' to skip)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (report our figures only)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cuda-graphs", action="store_true", help="our decode steps as CUDA graphs (CUDA)")
    parser.add_argument(
        "--max-batched-tokens",
        type=int,
        default=None,
        help="our engine's max_num_batched_tokens (prefill chunk)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    n_requests = args.requests or (16 if args.quick else 64)
    max_prompt = args.max_prompt or (256 if args.quick else 512)
    max_output = args.max_output or (96 if args.quick else 256)
    hf_sizes = [int(s) for s in (args.hf_batch_sizes or ("16" if args.quick else "8,16,32")).split(",")]

    print(f"# decode benchmark: {machine_summary()}, device {device}")
    bandwidth = read_bandwidth(device)
    print(f"# measured read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum over a 512 MiB float32 tensor)\n")

    rows = []
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, dtype_name)
        with tempfile.TemporaryDirectory() as tmp:
            config, model, hf = build_models(args.preset, args.layers, dtype, device, not args.no_hf, tmp)
            llm = LLM(
                model,
                max_num_seqs=1,
                max_model_len=args.prompt_len + args.new_tokens + 16,
                cuda_graphs=args.cuda_graphs,
            )
            if hf is None:
                with torch.inference_mode():
                    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
                    prompt = list(range(2, 2 + args.prompt_len))
                    llm.generate([prompt], params)
                    start = time.perf_counter()
                    llm.generate([prompt], params)
                    result = {"ours": args.new_tokens / (time.perf_counter() - start), "hf": float("nan")}
                    result["ratio"] = float("nan")
                    result["same_tokens"] = "n/a"
            else:
                result = single_stream(llm, hf, device, args.prompt_len, args.new_tokens, rounds)
            weights = weight_bytes_per_token(model)
            rows.append(
                {
                    "case": f"batch 1, {args.prompt_len}+{args.new_tokens} greedy, {config.param_count() / 1e6:.0f}M "
                    f"{dtype_name}",
                    "ours tok/s": f"{result['ours']:.1f}",
                    "transformers tok/s": f"{result['hf']:.1f}",
                    "ratio": f"{result['ratio']:.2f}x",
                    "ours % of bw roof": f"{100 * weights * result['ours'] / bandwidth:.0f}%",
                    "hf % of bw roof": f"{100 * weights * result['hf'] / bandwidth:.0f}%",
                    "same tokens": result["same_tokens"],
                }
            )
            del llm, model, hf
    print_table(rows)

    if not args.mixed_dtype:
        return
    dtype = getattr(torch, args.mixed_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        config, model, hf = build_models(args.preset, args.layers, dtype, device, not args.no_hf, tmp)
        requests = make_workload(n_requests, config.vocab_size, (16, max_prompt), (16, max_output), seed=0)
        print(
            f"\n# mixed workload: {n_requests} requests, prompts 16-{max_prompt}, outputs 16-{max_output}, "
            f"{sum(len(p) for p, _ in requests)} prompt / {sum(n for _, n in requests)} output tokens, "
            f"{args.mixed_dtype}"
        )
        llm = LLM(
            model,
            max_num_seqs=n_requests,
            max_model_len=max_prompt + max_output + 16,
            cuda_graphs=args.cuda_graphs,
            **({"max_num_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}),
        )
        llm.generate([[2, 3, 4]], SamplingParams(max_tokens=4))  # warm-up
        results = {"ours (continuous batching)": run_engine_workload(llm, requests, device)}
        if hf is not None:
            for size in hf_sizes:
                results[f"transformers static batch {size}"] = run_hf_static(hf, requests, size, device)
        mixed_rows = []
        best_hf = max(
            (r["tokens"] / r["elapsed"] for name, r in results.items() if name.startswith("transformers")),
            default=float("nan"),
        )
        for name, r in results.items():
            throughput = r["tokens"] / r["elapsed"]
            mixed_rows.append(
                {
                    "engine": name,
                    "time s": f"{r['elapsed']:.1f}",
                    "gen tok/s": f"{throughput:.1f}",
                    "vs best transformers": f"{throughput / best_hf:.2f}x",
                    "TTFT p50 s": f"{pct(r['ttft'], 50):.2f}",
                    "TTFT p99 s": f"{pct(r['ttft'], 99):.2f}",
                    "ITL p50 ms": f"{1e3 * pct(r['itl'], 50):.0f}",
                    "ITL p99 ms": f"{1e3 * pct(r['itl'], 99):.0f}",
                }
            )
        print_table(mixed_rows)


if __name__ == "__main__":
    main()

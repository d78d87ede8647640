"""Full-sequence forward throughput: our Transformer against transformers, side by side in one run.

1. The ~134M dense config (12 layers, hidden 768, 12 heads, intermediate 2048, vocab 32000), batch 4 x 512,
   float32 and bfloat16, against transformers' LlamaForCausalLM with the same weights. Goal: >= 1.2x.
   Also each side's share of this machine's measured matmul peak (a 2048^3 matmul in the same dtype): where
   transformers already runs near it, no implementation of the same FLOPs can be 1.2x faster.
2. A DeepSeek-V2-Lite-shaped MoE layer (scaled down), against transformers' DeepseekV2 MoE block, with its
   per-expert loop ("eager") and its default grouped_mm implementation. Goal: >= 2x the per-expert loop.
   Ours twice: the module as it is (grouped_mm, or the native GEMV for decode-sized calls), and as the engine
   runs it on CPU, with the experts' weights packed in panels for the native kernel (quant/csrc/panel_gemm.c).
   Their loop only visits experts that received tokens, so with 2048 tokens (~190 rows per expert) both sides
   run the same GEMM FLOPs and the peak column says how far from the machine's ceiling each side is; 256 tokens
   give ~24 rows per expert, and a decode-sized call (16 tokens, ~1.5 per expert) is bound by reading the
   experts' weights.

    python tools/bench/forward.py [--quick] [--batch 4 --seq 512] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    flops_per_token,
    interleaved,
    machine_summary,
    measured_peak_flops,
    print_table,
)
from deepseek_core import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from deepseek_core.engine.cpu_linear import PackedLinears, prepack_available  # noqa: E402


def dense_forward(
    batch: int, seq: int, dtypes: list[str], layers: int, rounds: int
) -> list[dict[str, object]]:
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_preset("deepseek-134m", num_hidden_layers=layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(Transformer(config), tmp)
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            ours = load_model(tmp, dtype=dtype).eval()
            compiled = torch.compile(ours)
            theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            variants = {"eager": lambda m=ours: m(ids), "torch.compile": lambda m=compiled: m(ids)}
            if prepack_available(dtype):  # what the engine's prefill runs on CPU: oneDNN-prepacked linears
                packed = PackedLinears(ours)

                def with_packed(m: Transformer = ours, p: PackedLinears = packed) -> torch.Tensor:
                    with p:
                        return m(ids)

                variants["eager + packed linears"] = with_packed
            with torch.inference_mode():
                diff = (compiled(ids).float() - theirs(ids).logits.float()).abs().max().item()
                times = interleaved(
                    {**variants, "transformers": lambda m=theirs: m(ids).logits},
                    rounds=rounds,
                )
            tokens = batch * seq
            # The ceiling: this machine's measured matmul FLOP/s in this dtype, against the model's FLOPs.
            peak = measured_peak_flops(torch.device("cpu"), dtype, 2048)
            flops = flops_per_token(ours, seq, training=False) * tokens
            for variant in variants:
                rows.append(
                    {
                        "case": f"forward {config.param_count() / 1e6:.0f}M {dtype_name} {batch}x{seq} {variant}",
                        "ours tok/s": f"{tokens / times[variant]:.0f}",
                        "transformers tok/s": f"{tokens / times['transformers']:.0f}",
                        "ratio": f"{times['transformers'] / times[variant]:.2f}x",
                        "% of matmul peak (ours / theirs)": f"{100 * flops / times[variant] / peak:.0f}% / "
                        f"{100 * flops / times['transformers'] / peak:.0f}%",
                        "max |dlogit|": f"{diff:.1e}",
                    }
                )
    return rows


def moe_layer(tokens: int, dtypes: list[str], rounds: int) -> list[dict[str, object]]:
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    # DeepSeek-V2-Lite's MoE shape (64 experts, top-6, 2 shared) scaled down in width to fit.
    spec = dict(
        hidden_size=1024,
        moe_intermediate_size=704,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        norm_topk_prob=False,
    )
    ours_cfg = ModelConfig.from_dict(
        {
            "model_type": "deepseek_v2",
            "vocab_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
            "kv_lora_rank": 64,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            **spec,
        }
    )
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        ours = Transformer(ours_cfg).model.layers[0].mlp.to(dtype).eval()
        hf_cfg = transformers.DeepseekV2Config(
            vocab_size=128, num_hidden_layers=1, num_attention_heads=8, intermediate_size=2048, **spec
        )
        impls = {}
        for impl in ("eager", "grouped_mm"):
            hf_cfg._experts_implementation = impl
            block = DeepseekV2Moe(hf_cfg).to(dtype).eval()
            with torch.no_grad():
                block.gate.weight.copy_(ours.gate.weight.float())
                block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
                block.experts.down_proj.copy_(ours.experts.down_proj)
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(block.shared_experts, name).weight.copy_(
                        getattr(ours.shared_experts, name).weight
                    )
            impls[impl] = block
        x = torch.randn(1, tokens, spec["hidden_size"], dtype=dtype)
        variants = {"ours": lambda m=ours, x=x: m(x)}
        packed = PackedLinears(ours)  # what the engine runs on CPU: experts and shared experts packed
        if packed.num_packed_experts:

            def with_packed(
                m: torch.nn.Module = ours, p: PackedLinears = packed, x: torch.Tensor = x
            ) -> torch.Tensor:
                with p:
                    return m(x)

            variants["ours + packed experts"] = with_packed
        with torch.inference_mode():
            diff = max(
                (variant().float() - impls["eager"](x).float()).abs().max().item()
                for variant in variants.values()
            )
            times = interleaved(
                {
                    **variants,
                    "eager": lambda m=impls["eager"], x=x: m(x),
                    "grouped_mm": lambda m=impls["grouped_mm"], x=x: m(x),
                },
                rounds=rounds,
            )
        # Matmul FLOPs per token: the routed experts it picks, the shared experts, and the router.
        width, inner = spec["hidden_size"], spec["moe_intermediate_size"]
        experts_run = spec["num_experts_per_tok"] + spec["n_shared_experts"]
        flops = tokens * 2 * (3 * width * inner * experts_run + width * spec["n_routed_experts"])
        peak = measured_peak_flops(torch.device("cpu"), dtype, 2048)
        for variant in variants:
            rows.append(
                {
                    "case": f"MoE layer 64 experts top-6 {dtype_name} {tokens} tokens {variant}",
                    "ours tok/s": f"{tokens / times[variant]:.0f}",
                    "transformers tok/s": f"{tokens / times['eager']:.0f} (loop) / "
                    f"{tokens / times['grouped_mm']:.0f} (grouped_mm)",
                    "ratio": f"{times['eager'] / times[variant]:.2f}x loop, "
                    f"{times['grouped_mm'] / times[variant]:.2f}x grouped",
                    "% of matmul peak (ours / theirs)": f"{100 * flops / times[variant] / peak:.0f}% / "
                    f"{100 * flops / min(times['eager'], times['grouped_mm']) / peak:.0f}%",
                    "max |dlogit|": f"{diff:.1e}",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--moe-tokens",
        default="2048,256,16",
        help="token counts for the MoE layer (comma-separated): prefill-sized, mid-sized and decode-sized calls",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes, one round: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.layers, args.moe_tokens, args.rounds = 1, 128, 2, "256,16", 1
    dtypes = args.dtypes.split(",")
    print(machine_summary())
    rows = dense_forward(args.batch, args.seq, dtypes, args.layers, args.rounds)
    for tokens in args.moe_tokens.split(","):
        rows += moe_layer(int(tokens), dtypes, args.rounds)
    print_table(rows)


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: timing, machine facts, and the side-by-side table."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine_summary() -> str:
    """One line naming the machine the figures come from."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}"


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median time of each fn, running them in alternation so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def print_table(rows: list[dict[str, object]]) -> None:
    """Print rows as an aligned text table (columns in first-seen order; a row may leave one blank)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(str(row.get(k, "")).ljust(widths[k]) for k in keys))


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a size x size matmul in `dtype`, the best of torch's matmul and (on CPU) oneDNN's linear on
    a prepacked weight and our panel kernel: the practical ceiling for this machine."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    candidates = [lambda: a @ b]
    if device.type == "cpu":
        from deepseek_core.engine.cpu_linear import prepack_available

        if prepack_available(dtype):
            packed = torch.ops.mkldnn._reorder_linear_weight(b, batch_size=size)
            candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        from deepseek_core.quant import kernels

        if kernels.native_library() is not None and kernels.panel_takes(b):
            panels = kernels.pack_panels(b)
            candidates.append(lambda: kernels.panel_linear(a, panels, size, None))
    repeats = 20 if device.type == "cuda" else 5
    timings = []
    for fn in candidates:
        for _ in range(3):
            fn()
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) / repeats)
    return 2 * size**3 / min(timings)


def flops_per_token(model: torch.nn.Module, seq: int, training: bool = True) -> float:
    """Training: 6 * matmul parameters (Linear layers, lm_head included) + 12 * layers * seq * attention
    width (the PaLM formula); a forward pass alone is a third of that."""
    cfg = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if cfg.is_moe and cfg.n_routed_experts:  # only num_experts_per_tok of the routed experts run per token
        matmul_params += experts * (cfg.num_experts_per_tok or 1) // cfg.n_routed_experts
    attn_width = cfg.num_attention_heads * cfg.attn_head_dim
    total = 6.0 * matmul_params + 12.0 * cfg.num_hidden_layers * seq * attn_width
    return total if training else total / 3

"""The native weight-only INT8 CPU kernel (csrc/int8_gemm.c): built with the system C compiler on first use.

Why native: torch has no fast float32-activation x int8-weight CPU matmul (aten._weight_int8pack_mm is
scalar for float32 inputs, torchao's Int8WeightOnlyConfig on CPU was slower than float32 here), while a
small AVX2 loop that widens int8 weights in registers reads 4x fewer bytes than a float32 matmul, which is
what batch-1 decode is bound by (tools/bench/quant.py measures it).

The library is compiled with `-O3 -march=native` (so for the CPU it runs on) into a cache directory keyed by
the source, compiler and CPU flags, written atomically; without a compiler, or with
DEEPSEEK_NATIVE_KERNELS=0, `native_library()` returns None and callers use torch fallbacks.
Cache directory: $DEEPSEEK_KERNEL_CACHE, else $XDG_CACHE_HOME/deepseek-core/kernels, else ~/.cache/...
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "int8_gemm.c"
# Compiled into the same library: the float GEMV of decode-sized routed-expert calls (model/moe.py).
GEMV_SOURCE = SOURCE.with_name("gemv.c")
# And the single-query attention of decode steps (engine/runner.py).
ATTENTION_SOURCE = SOURCE.with_name("decode_attention.c")
# And RMSNorm rows (model/norm.py).
NORM_SOURCE = SOURCE.with_name("rms_norm.c")
# And causal self-attention over whole sequences (model/attention.py, model/mla.py).
CAUSAL_SOURCE = SOURCE.with_name("causal_attention.c")
# And the fused rotary embedding and SwiGLU gate of forward passes (model/rope.py, model/mlp.py).
ELEMENTWISE_SOURCE = SOURCE.with_name("elementwise.c")
# And the engine's linear layers over weights packed into column panels (engine/cpu_linear.py).
PANEL_SOURCE = SOURCE.with_name("panel_gemm.c")
SOURCES = (
    SOURCE,
    GEMV_SOURCE,
    ATTENTION_SOURCE,
    NORM_SOURCE,
    CAUSAL_SOURCE,
    ELEMENTWISE_SOURCE,
    PANEL_SOURCE,
)
# Included by the float kernels (bfloat16 conversions, vector exp); part of the cache key like the sources.
HEADERS = (SOURCE.with_name("bf16.h"), SOURCE.with_name("vec_math.h"))
# -ffp-contract=off: no implicit FMA contraction, so the dynamic kernels round exactly like the torch path.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    explicit = os.environ.get("DEEPSEEK_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepseek-core" / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target` (with OpenMP when the compiler has it), through a temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        last_error = ""
        for extra in (["-fopenmp"], []):
            cmd = [compiler, *_FLAGS, *extra, *(str(source) for source in SOURCES), "-o", tmp, "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(tmp, target)
                return
            last_error = result.stderr.strip()[-2000:]
        raise RuntimeError(f"{SOURCE.parent}: compiling with {compiler} failed: {last_error}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when disabled or it cannot be built here (logged once)."""
    if os.environ.get("DEEPSEEK_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: INT8 weight-only layers use the slower torch fallback")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            b"\0".join(
                s.encode()
                for s in (
                    *(p.read_text() for p in (*SOURCES, *HEADERS)),
                    " ".join(_FLAGS),
                    compiler,
                    version,
                    _cpu_flags(),
                )
            )
        ).hexdigest()[:20]
        target = cache_dir() / f"int8_gemm-{platform.machine()}-{key}.so"
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("INT8 native kernel unavailable (%s): using the torch fallback", exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # (x, x_stride, w, scale, bias, y, M, N, K, nthreads)
    lib.ds_int8_wo_gemm.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.ds_int8_wo_gemm.restype = None
    # (x, x_stride, M, K, q, scale)
    lib.ds_quantize_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr]
    lib.ds_quantize_rows.restype = None
    # (acc, M, N, x_scale, w_scale, bias, out)
    lib.ds_rescale.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.ds_rescale.restype = None
    lib.ds_int8_kernel_isa.restype = ctypes.c_int
    lib.ds_int8_has_vnni.restype = ctypes.c_int
    # (x, x_stride, w, w_scale, bias, y, M, N, K, nthreads) -> 0 | -1
    lib.ds_int8_dyn_gemm.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.ds_int8_dyn_gemm.restype = ctypes.c_int
    # (x, x_stride, w, bias, y, M, N, K, nthreads) -> 0 | -1 (unsupported shape or CPU)
    for gemv in (lib.ds_gemv_f32, lib.ds_gemv_bf16):
        gemv.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        gemv.restype = ctypes.c_int
    lib.ds_gemv_isa.restype = ctypes.c_int
    # (x, x_stride, packed, bias, y, M, N, K, nthreads) -> 0 | -1 (unsupported CPU or shape)
    for panel in (lib.ds_panel_f32, lib.ds_panel_bf16):
        panel.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        panel.restype = ctypes.c_int
    # (x, x_stride, packed, expert_stride, offsets, E, y, N, K, nthreads) -> 0 | -1
    for grouped in (lib.ds_panel_grouped_f32, lib.ds_panel_grouped_bf16):
        grouped.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, ctypes.c_int]
        grouped.restype = ctypes.c_int
    # (q, q_head_stride, k, k_head_stride, k_row_stride, v, v_head_stride, v_row_stride, out,
    #  out_head_stride, H, KVH, L, D, Dv, scale, nthreads) -> 0 | -1
    for attn in (lib.ds_decode_attn_f32, lib.ds_decode_attn_bf16):
        attn.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64]
        attn.argtypes += [ctypes.c_float, ctypes.c_int]
        attn.restype = ctypes.c_int
    # (q, q strides b/h/s, k, k strides, v, v strides, out, out strides, B, H, KVH, S, D, Dv, scale, threads)
    strided_tensor: list[Any] = [ptr, i64, i64, i64]  # data pointer, then batch, head and row strides
    for causal in (lib.ds_causal_attn_f32, lib.ds_causal_attn_bf16):
        causal.argtypes = [*(strided_tensor * 4), *([i64] * 6), ctypes.c_float, ctypes.c_int]
        causal.restype = ctypes.c_int
    # (x, x strides b/h/s, cos, ssin, out, B, H, S, D, threads) and (g, u, out, n, threads) -> 0 | -1
    for rope_fn in (lib.ds_rope_f32, lib.ds_rope_bf16):
        rope_fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        rope_fn.restype = ctypes.c_int
    for silu_fn in (lib.ds_silu_mul_f32, lib.ds_silu_mul_bf16):
        silu_fn.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
        silu_fn.restype = ctypes.c_int
    # (x, x_stride, w, out, M, D, eps, threads) -> 0 | -1
    for norm in (lib.ds_rms_norm_f32, lib.ds_rms_norm_bf16):
        norm.argtypes = [ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        norm.restype = ctypes.c_int
    return lib


def kernel_isa() -> str:
    """'avx2' or 'avx2+vnni' (x86 paths), 'generic' (portable C) or 'none' (no native library)."""
    lib = native_library()
    if lib is None:
        return "none"
    isa = "avx2" if lib.ds_int8_kernel_isa() == 2 else "generic"
    return f"{isa}+vnni" if lib.ds_int8_has_vnni() else isa


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether the native library has the AVX512-VNNI dynamic kernel (ds_int8_dyn_gemm)."""
    lib = native_library()
    return lib is not None and bool(lib.ds_int8_has_vnni())


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as contiguous float32 (no copy when it already is)."""
    if t.dtype is not torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def _int8_gemm(
    fn: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int | None, torch.Tensor]:
    """Call a native GEMM taking (x, ldx, int8 weight, scale, bias, out, m, n, k, threads); (status, out)."""
    x = _f32(x)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    scale = _f32(scale)
    if bias is not None:
        bias = _f32(bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    status = fn(
        x.data_ptr(),
        k,
        weight.data_ptr(),
        scale.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    return status, out


def weight_only_gemm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] (CPU, float) @ (int8 weight [N, K] * scale[N])^T + bias -> float32 [M, N] via the kernel.

    The caller checks native_library() is not None. Hot path at decode: kept to a few cheap checks.
    """
    lib = native_library()
    assert lib is not None
    return _int8_gemm(lib.ds_int8_wo_gemm, x, weight, scale, bias)[1]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization of float x [M, K] (CPU) -> (int8 [M, K], float32 scale [M, 1])."""
    lib = native_library()
    assert lib is not None
    x = _f32(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    scale = torch.empty((m, 1), dtype=torch.float32)
    lib.ds_quantize_rows(x.data_ptr(), k, m, k, q.data_ptr(), scale.data_ptr())
    return q, scale


def rescale(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int32 acc [M, N] * x_scale [M, 1] * w_scale [N] (+ bias [N]) -> float32 [M, N] (CPU)."""
    lib = native_library()
    assert lib is not None
    if not acc.is_contiguous():
        acc = acc.contiguous()
    w_scale = _f32(w_scale)
    if bias is not None:
        bias = _f32(bias)
    m, n = acc.shape
    out = torch.empty((m, n), dtype=torch.float32)
    lib.ds_rescale(
        acc.data_ptr(),
        m,
        n,
        x_scale.data_ptr(),
        w_scale.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
    )
    return out


def dynamic_gemm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The whole dynamic INT8 linear in one call (VNNI CPUs): float x [M, K] -> float32 [M, N].

    The caller checks has_vnni(); the result equals quantize_rows + torch._int_mm + rescale exactly.
    """
    lib = native_library()
    assert lib is not None
    status, out = _int8_gemm(lib.ds_int8_dyn_gemm, x, weight, scale, bias)
    if status != 0:
        (m, k), n = x.shape, weight.shape[0]
        raise MemoryError(f"ds_int8_dyn_gemm failed for a [{m}, {k}] x [{n}, {k}] product")
    return out


class WeightOnlyPlan:
    """Raw pointers of one layer's int8 weight, float32 scales and float32 bias, for the decode hot path.

    Only for contiguous int8 weights and float32 scales/bias (`usable`), so the pointers always see in-place
    updates; rebuilt when a tensor is replaced (Module.to() swaps buffers).
    """

    __slots__ = ("bias_ptr", "key", "k", "n", "scale_ptr", "weight_ptr")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.key = (weight, scale, bias)
        self.n, self.k = weight.shape
        assert weight.is_contiguous() and weight.dtype is torch.int8
        self.weight_ptr = weight.data_ptr()
        self.scale_ptr = scale.data_ptr()
        self.bias_ptr = bias.data_ptr() if bias is not None else None

    @staticmethod
    def usable(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether a plan can serve these tensors without copies."""
        return (
            weight.is_contiguous()
            and scale.dtype is torch.float32
            and scale.is_contiguous()
            and (bias is None or (bias.dtype is torch.float32 and bias.is_contiguous()))
        )

    def matches(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether the plan still describes these tensors (same objects, same storage)."""
        w, s, b = self.key
        return (
            w is weight
            and s is scale
            and b is bias
            and weight.data_ptr() == self.weight_ptr
            and scale.data_ptr() == self.scale_ptr
            and (bias is None or bias.data_ptr() == self.bias_ptr)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float32 CPU x [..., K] -> float32 [..., N]."""
        lib = native_library()
        assert lib is not None
        x2 = x.reshape(-1, self.k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        lib.ds_int8_wo_gemm(
            x2.data_ptr(),
            self.k,
            self.weight_ptr,
            self.scale_ptr,
            self.bias_ptr,
            out.data_ptr(),
            x2.shape[0],
            self.n,
            self.k,
            torch.get_num_threads(),
        )
        return out


# Rows per call of the native GEMV (a few tokens' assignments to one expert).
GEMV_MAX_ROWS = 4


@functools.lru_cache(maxsize=4)
def _gemv_isa_covers(dtype: torch.dtype) -> bool:
    lib = native_library()
    if lib is None:
        return False
    isa = lib.ds_gemv_isa()
    return (dtype == torch.float32 and isa >= 1) or (dtype == torch.bfloat16 and isa >= 2)


def avx512_available() -> bool:
    """Whether the native float kernels run on this CPU (AVX-512F; bfloat16 GEMV also needs AVX512-BF16)."""
    return _gemv_isa_covers(torch.float32)


def gemv_takes(weight: torch.Tensor) -> bool:
    """Whether float_gemv runs this [N, K] weight here: float32 (AVX-512) or bfloat16 (AVX512-BF16), on CPU,
    contiguous, with K a multiple of 64 bytes (gemv.c's shape rule)."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and (weight.shape[1] * weight.element_size()) % 64 == 0
        and _gemv_isa_covers(weight.dtype)
    )


def _float_product(
    name: str, fn: Any, x: torch.Tensor, weight: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Call a float kernel taking (x, x_stride, weight, bias, y, M, N, K, threads) -> 0 | -1; returns y [M, n]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype)
    bias_ptr = bias.data_ptr() if bias is not None else None
    status = fn(
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        bias_ptr,
        out.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"{name}: the native kernel refused a [{m}, {k}] x [{n}, {k}] {x.dtype} product")
    return out


def float_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) in x's dtype, for a weight gemv_takes() and M <= GEMV_MAX_ROWS.

    Hot path at decode: the caller has checked the weight once and the dtypes; only x's layout is fixed here.
    """
    lib = native_library()
    assert lib is not None
    fn = lib.ds_gemv_f32 if x.dtype == torch.float32 else lib.ds_gemv_bf16
    return _float_product("float_gemv", fn, x, weight, weight.shape[0], bias)


PANEL_WIDTH = 32  # output channels per packed panel (panel_gemm.c)


def panel_takes(weight: torch.Tensor) -> bool:
    """Whether panel_linear runs this [N, K] weight here: float32 (AVX-512) or bfloat16 (AVX512-BF16, K even),
    on CPU."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and (weight.dtype != torch.bfloat16 or weight.shape[1] % 2 == 0)
        and _gemv_isa_covers(weight.dtype)
    )


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A weight panel_takes() in panel_gemm.c's layout: output channels in zero-padded panels of 32, k-major
    inside a panel (bfloat16: pairs of k side by side). A new tensor about the weight's size."""
    n, k = weight.shape
    padded = -(-n // PANEL_WIDTH) * PANEL_WIDTH
    w = weight.detach()
    if padded != n:
        w = torch.cat([w, w.new_zeros(padded - n, k)])
    if w.dtype == torch.bfloat16:
        return w.reshape(padded // PANEL_WIDTH, PANEL_WIDTH, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return w.reshape(padded // PANEL_WIDTH, PANEL_WIDTH, k).transpose(1, 2).contiguous()


def panel_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight[n, K]^T (+ bias) in x's dtype, the weight given as pack_panels(weight).

    Hot path of the engine's linears: the caller has checked the weight (panel_takes) and the dtypes once.
    """
    lib = native_library()
    assert lib is not None
    fn = lib.ds_panel_f32 if x.dtype == torch.float32 else lib.ds_panel_bf16
    return _float_product("panel_linear", fn, x, packed, n, bias)


def grouped_panel_linear(
    x: torch.Tensor, packed: torch.Tensor, offsets: torch.Tensor, n: int
) -> torch.Tensor:
    """Routed experts in one call: rows offsets[e] .. offsets[e + 1] - 1 of x [T, K] through expert e's weight
    [n, K], given as `packed` [E, ...] (pack_panels of each expert, stacked); offsets int64 [E + 1]. Returns
    [T, n] in x's dtype. The caller has checked the weights (panel_takes) and the dtypes once."""
    lib = native_library()
    assert lib is not None
    fn = lib.ds_panel_grouped_f32 if x.dtype == torch.float32 else lib.ds_panel_grouped_bf16
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    out = torch.empty((rows, n), dtype=x.dtype)
    experts = packed.shape[0]
    status = fn(
        x.data_ptr(),
        x.stride(0),
        packed.data_ptr(),
        packed[0].numel(),
        offsets.data_ptr(),
        experts,
        out.data_ptr(),
        n,
        k,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(
            f"grouped_panel_linear: the native kernel refused [{rows}, {k}] x {experts} x [{n}, {k}]"
        )
    return out


def decode_attention_takes(dtype: torch.dtype, head_dim: int, value_dim: int) -> bool:
    """Whether decode_attention runs here for these sizes: float32 or bfloat16, AVX-512 (decode_attention.c)."""
    return (
        dtype in (torch.float32, torch.bfloat16)
        and head_dim % 16 == 0
        and value_dim % 16 == 0
        and value_dim <= 1024
        and avx512_available()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor
) -> None:
    """Single-query attention of one sequence into `out` [H, Dv]: q [H, D], k [KVH, L, D], v [KVH, L, Dv].

    All CPU tensors of one dtype that decode_attention_takes() accepts, last dimension contiguous (any head
    and row strides); query head h reads kv head h // (H // KVH). Arithmetic in float32.
    """
    lib = native_library()
    assert lib is not None
    fn = lib.ds_decode_attn_f32 if q.dtype == torch.float32 else lib.ds_decode_attn_bf16
    heads, head_dim = q.shape
    kv_heads, length, _ = k.shape
    status = fn(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        v.data_ptr(),
        v.stride(0),
        v.stride(1),
        out.data_ptr(),
        out.stride(0),
        heads,
        kv_heads,
        length,
        head_dim,
        v.shape[-1],
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"decode_attention: the native kernel failed for {heads} heads x {length} keys")


def causal_attention_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether causal_attention runs these [B, H, S, D] / [B, KVH, S, D] / [B, KVH, S, Dv] CPU tensors here:
    float32 or bfloat16, self-attention (as many keys as queries), last dimensions contiguous, a CPU with
    AVX512-BF16 (causal_attention.c)."""
    return (
        query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.bfloat16)
        and query.device.type == "cpu"
        and query.dim() == key.dim() == value.dim() == 4
        and query.shape[2] == key.shape[2] == value.shape[2]
        and key.shape[:2] == value.shape[:2]
        and query.shape[1] % key.shape[1] == 0
        and query.shape[-1] == key.shape[-1]
        and (query.shape[-1] % 2 == 0 or query.dtype == torch.float32)
        and value.shape[-1] % 16 == 0
        and value.shape[-1] <= 512
        and all(t.stride(-1) == 1 for t in (query, key, value))
        and _gemv_isa_covers(torch.bfloat16)
    )


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Causal self-attention (query row i sees keys j <= i) of tensors causal_attention_takes() accepts, as
    [B, H, S, Dv] (a transposed view of [B, S, H, Dv] memory, which the output projection reads as is), or None
    when the native kernel declines (the caller then uses torch's scaled_dot_product_attention)."""
    lib = native_library()
    assert lib is not None
    batch, heads, seq, head_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    out = torch.empty((batch, seq, heads, value_dim), dtype=query.dtype).transpose(1, 2)
    args = []
    for t in (query, key, value, out):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    fn = lib.ds_causal_attn_f32 if query.dtype == torch.float32 else lib.ds_causal_attn_bf16
    status = fn(*args, batch, heads, kv_heads, seq, head_dim, value_dim, scale, torch.get_num_threads())
    return out if status == 0 else None


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """model/rope.py's rotation of float32 or bfloat16 x [B, H, S, D] (last dimension contiguous) by its
    [B, 1, S, D] tables, bit-identical to the torch ops, as [B, H, S, D] (a view of [B, S, H, D] memory); None
    when the native kernel does not take these tensors (elementwise.c)."""
    batch, heads, seq, dim = x.shape
    if not (
        x.dtype == cos.dtype == signed_sin.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
        and x.stride(-1) == 1
        and dim % 32 == 0
        and cos.shape == signed_sin.shape == (batch, 1, seq, dim)
        and cos.is_contiguous()
        and signed_sin.is_contiguous()
        and avx512_available()
    ):
        return None
    lib = native_library()
    assert lib is not None
    out = torch.empty((batch, seq, heads, dim), dtype=x.dtype).transpose(1, 2)
    fn = lib.ds_rope_f32 if x.dtype == torch.float32 else lib.ds_rope_bf16
    status = fn(
        x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), signed_sin.data_ptr(),
        out.data_ptr(), batch, heads, seq, dim, torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for contiguous float32 or bfloat16 tensors of one shape (SwiGLU, model/mlp.py), equal to
    the torch ops up to a rare last bit; None when the native kernel does not take them (elementwise.c)."""
    if not (
        gate.dtype == up.dtype
        and gate.dtype in (torch.float32, torch.bfloat16)
        and gate.device.type == "cpu"
        and gate.shape == up.shape
        and gate.is_contiguous()
        and up.is_contiguous()
        and gate.numel() % 16 == 0
        and avx512_available()
    ):
        return None
    lib = native_library()
    assert lib is not None
    out = torch.empty_like(gate)
    fn = lib.ds_silu_mul_f32 if gate.dtype == torch.float32 else lib.ds_silu_mul_bf16
    status = fn(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out if status == 0 else None


def rms_norm_takes(dtype: torch.dtype, dim: int) -> bool:
    """Whether rms_norm runs here: float32 or bfloat16 rows of a multiple of 16, AVX-512 (rms_norm.c)."""
    return dtype in (torch.float32, torch.bfloat16) and dim % 16 == 0 and avx512_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (model/norm.py) of x [M, D] with a weight of x's dtype, for rms_norm_takes()."""
    lib = native_library()
    assert lib is not None
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    fn = lib.ds_rms_norm_f32 if x.dtype == torch.float32 else lib.ds_rms_norm_bf16
    rows, dim = x.shape
    if fn(
        x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps, torch.get_num_threads()
    ):
        raise ValueError(
            f"rms_norm: the native kernel refused a [{x.shape[0]}, {x.shape[1]}] {x.dtype} input"
        )
    return out

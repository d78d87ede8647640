"""Prepacked float32 and bfloat16 linear layers for CPU inference.

On CPU, torch's default F.linear is slow for the skinny matrices of decoding (a few rows times a large
weight): about 12 GB/s of weight reads in float32 on a 2-core EPYC whose memory reads 33 GB/s. The engine
keeps a packed copy of each of the model's `Linear` weights and routes those layers to it, only inside its
own forward passes and only on its own thread (model/linear.py): the model itself is not modified.

On AVX-512 CPUs the copy is in column panels for the native kernel (quant/csrc/panel_gemm.c): up to about 8
rows cost what one row costs (bound by reading the weight, 24-29 GB/s), 1.5-2.4x oneDNN's prepacked linear at
2-16 rows, and it is at least as fast as oneDNN for prefill; MoE routed experts are packed the same way.
Elsewhere (and for bfloat16 on CPUs with AMX, which oneDNN drives) the copy is oneDNN's blocked layout, which
reads about twice as fast as F.linear at decode and is 1.1-1.3x faster for prefill. A weight changed in
place (its version counter moves) is repacked before its next packed use; a replaced one runs F.linear.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.linear import Linear, LinearRouter, swap_linear_router
from ..model.mlp import silu_and_mul
from ..model.moe import ExpertsRouter, RoutedExperts, swap_experts_router
from ..quant import kernels

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
log = logging.getLogger(__name__)


def prepack_available(dtype: torch.dtype) -> bool:
    """True when this torch build has oneDNN linear kernels for `dtype` usable on this CPU."""
    if dtype not in PACKABLE_DTYPES:
        return False
    mkldnn = torch.ops.mkldnn
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")
            and (dtype != torch.bfloat16 or bool(mkldnn._is_mkldnn_bf16_supported()))
        )
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=1)


@functools.cache
def _amx_available() -> bool:
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_supported()) if is_supported is not None else False


def _panels_preferred(weight: torch.Tensor) -> bool:
    """Whether the native panel kernel runs this weight here and is the faster choice: everywhere it runs,
    except bfloat16 on CPUs with AMX, whose tile unit oneDNN uses (several times vdpbf16ps' throughput)."""
    if not kernels.panel_takes(weight) or kernels.native_library() is None:
        return False
    return weight.dtype != torch.bfloat16 or not _amx_available()


@dataclass
class _Entry:
    weight: torch.Tensor
    panels: bool  # packed for the native panel kernel (else for oneDNN): decided once, by dtype and CPU
    version: int = -1  # the weight's version counter when packed
    packed: torch.Tensor | None = None  # None until packed (background packing)

    def pack(self) -> None:
        self.version = self.weight._version  # first: a change during packing shows as a version mismatch
        self.packed = kernels.pack_panels(self.weight) if self.panels else _pack(self.weight)


@dataclass
class _ExpertsEntry:
    module: RoutedExperts
    versions: tuple[int, int]  # gate_up_proj's and down_proj's version counters when packed
    gate_up: torch.Tensor  # [E, ...]: each expert's weight in panels
    down: torch.Tensor


def _experts_take_panels(module: RoutedExperts) -> bool:
    gate_up, down = module.gate_up_proj, module.down_proj
    return gate_up.dtype == down.dtype and _panels_preferred(gate_up[0]) and _panels_preferred(down[0])


def _pack_experts(module: RoutedExperts) -> _ExpertsEntry:
    return _ExpertsEntry(
        module,
        (module.gate_up_proj._version, module.down_proj._version),
        torch.stack([kernels.pack_panels(w) for w in module.gate_up_proj.detach()]),
        torch.stack([kernels.pack_panels(w) for w in module.down_proj.detach()]),
    )


class PackedLinears:
    """Routes the model's `Linear` calls (and MoE routed experts) to packed weights while active (this thread
    only).

    background=True packs in a daemon thread instead of in the constructor (a 134M float32 model takes about
    a quarter of a second): until a weight's copy is ready its layer runs the model's own path, so a server
    answers its first request without waiting for the packing. `wait()` blocks until everything is packed.
    """

    def __init__(self, model: nn.Module, background: bool = False) -> None:
        self._packed: dict[int, _Entry] = {}  # by id(weight)
        self._experts: dict[int, _ExpertsEntry | None] = {}  # MoE routed experts by id(module); None: pending
        self._expert_modules: list[RoutedExperts] = []
        self._previous = threading.local()  # per thread: the routers to restore, one pair per active `with`
        for module in model.modules():
            if isinstance(module, RoutedExperts) and _experts_take_panels(module):
                self._experts[id(module)] = None
                self._expert_modules.append(module)
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, Linear)
                and isinstance(weight, torch.Tensor)
                and weight.dtype in PACKABLE_DTYPES
                and weight.device.type == "cpu"
            ):
                self._packed[id(weight)] = _Entry(weight, _panels_preferred(weight))
        self._ready = threading.Event()
        if background:
            threading.Thread(target=self._pack_in_background, name="deepseek-prepack", daemon=True).start()
        else:
            self._pack_all()

    def _pack_all(self) -> None:
        try:
            for entry in self._packed.values():
                entry.pack()
            for module in self._expert_modules:
                self._experts[id(module)] = _pack_experts(module)
        finally:
            self._ready.set()

    def _pack_in_background(self) -> None:
        try:
            self._pack_all()
        except Exception:  # a layer without its copy keeps the model's own path: the server stays correct
            log.exception("packing the model's weights for the CPU kernels failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every weight is packed (or `timeout` seconds); True when done."""
        return self._ready.wait(timeout)

    @property
    def num_packed(self) -> int:
        """Number of `Linear` weights that get a packed copy (a background packer may not have made it yet)."""
        return len(self._packed)

    @property
    def num_packed_experts(self) -> int:
        """Number of MoE routed-expert modules with a packed copy."""
        return len(self._experts)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copies (about the size of the model's linear and expert weights)."""
        linears = sum(e.weight.numel() * e.weight.element_size() for e in self._packed.values())
        return linears + sum(
            t.numel() * t.element_size()
            for e in self._experts.values()
            if e is not None
            for t in (e.gate_up, e.down)
        )

    def linear(self, module: Linear, x: torch.Tensor) -> torch.Tensor:
        """The module's output from its packed weight (for x's dtype)."""
        weight = module.weight
        entry = self._packed.get(id(weight))
        if (
            entry is None or entry.weight is not weight or x.dtype != weight.dtype or entry.packed is None
        ):  # replaced, another dtype, or not packed yet
            return F.linear(x, weight, module.bias)
        if entry.version != weight._version:  # modified in place since packing
            entry.pack()
        packed = entry.packed
        assert packed is not None
        if entry.panels:
            rows = x.numel() // x.shape[-1]
            out = kernels.panel_linear(x.reshape(rows, x.shape[-1]), packed, weight.shape[0], module.bias)
            return out.view(*x.shape[:-1], weight.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, module.bias, "none", [], "")

    def experts(
        self, module: RoutedExperts, inputs: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor | None:
        """The routed experts' outputs for `inputs` (sorted by expert, `counts` rows each) from their panels;
        None (the module computes them itself) when they have none (yet) or x has another dtype."""
        entry = self._experts.get(id(module))
        if entry is None or entry.module is not module or inputs.dtype != module.gate_up_proj.dtype:
            return None
        if entry.versions != (module.gate_up_proj._version, module.down_proj._version):  # changed in place
            self._experts[id(module)] = entry = _pack_experts(module)
        offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        gate, up = kernels.grouped_panel_linear(
            inputs, entry.gate_up, offsets, 2 * module.intermediate_size
        ).chunk(2, dim=-1)
        return kernels.grouped_panel_linear(
            silu_and_mul(gate, up), entry.down, offsets, module.down_proj.shape[1]
        )

    def __enter__(self) -> PackedLinears:
        stack: list[tuple[LinearRouter | None, ExpertsRouter | None]] = self._previous.__dict__.setdefault(
            "stack", []
        )
        stack.append((swap_linear_router(self.linear), swap_experts_router(self.experts)))
        return self

    def __exit__(self, *exc: object) -> None:
        linear_router, experts_router = self._previous.stack.pop()
        swap_linear_router(linear_router)
        swap_experts_router(experts_router)

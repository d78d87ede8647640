"""GPU-kind scheduling: which GPU, and how many, a model needs to serve.

Policy (documented in the README, asserted in tests/cne/test_gpu.py):

* memory needed = weights in the serving dtype x ``HEADROOM`` (1.2: KV cache, activations, fragmentation)
  + ``OVERHEAD_PER_GPU`` (2 GiB: CUDA context, cuBLAS/NCCL workspaces) on every GPU of the placement;
* the weights are split evenly over ``count`` GPUs (tensor parallel), so ``count`` is a power of two
  (1, 2, 4, 8) that divides the number of attention heads;
* the fewest GPUs win (less tensor-parallel traffic), then the cheapest kind among those that fit;
* bfloat16 needs compute capability 8.0+ (A100 and newer): V100s are only chosen for float16/float32/int8;
* more than 8 of the largest kind is refused with an error (that needs multi-node serving or a smaller dtype).

GPU memory figures are what ``nvidia-smi`` reports as total memory (MiB), not the marketing numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from deepseek_core import ModelConfig

GIB = 2**30
MIB = 2**20
HEADROOM = 1.2
OVERHEAD_PER_GPU = 2 * GIB
MAX_GPUS = 8
COUNTS = (1, 2, 4, 8)

# Node labels that say which GPU a node has.
NVIDIA_LABEL = "nvidia.com/gpu.product"  # NVIDIA GPU feature discovery (GPU operator)
GKE_LABEL = "cloud.google.com/gke-accelerator"  # Google Kubernetes Engine
LABEL_SCHEMES = {"nvidia": NVIDIA_LABEL, "gke": GKE_LABEL}
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class GpuKind:
    """One GPU model: memory, bfloat16 support and the node-label values that identify it."""

    name: str
    memory_bytes: int
    bf16: bool
    nvidia_products: tuple[str, ...]  # values of nvidia.com/gpu.product (SXM and PCIe variants)
    gke_accelerator: str | None  # value of cloud.google.com/gke-accelerator (None: not offered on GKE)

    def label_values(self, scheme: str) -> tuple[str, ...]:
        """The node-label values of this kind under `scheme` ('nvidia' or 'gke')."""
        if scheme == "nvidia":
            return self.nvidia_products
        if scheme == "gke":
            return (self.gke_accelerator,) if self.gke_accelerator else ()
        raise ValueError(f"label scheme: unknown {scheme!r} (use one of {sorted(LABEL_SCHEMES)})")


# Cheapest first: among placements with the same GPU count, the first kind that fits is chosen.
GPU_KINDS: tuple[GpuKind, ...] = (
    GpuKind(
        "V100-16GB", 16160 * MIB, False, ("Tesla-V100-SXM2-16GB", "Tesla-V100-PCIE-16GB"), "nvidia-tesla-v100"
    ),
    GpuKind("V100-32GB", 32510 * MIB, False, ("Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-32GB"), None),
    GpuKind(
        "A100-40GB",
        40960 * MIB,
        True,
        ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
        "nvidia-tesla-a100",
    ),
    GpuKind(
        "A100-80GB", 81920 * MIB, True, ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"), "nvidia-a100-80gb"
    ),
    GpuKind(
        "H100-80GB", 81559 * MIB, True, ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"), "nvidia-h100-80gb"
    ),
    GpuKind("H200-141GB", 143771 * MIB, True, ("NVIDIA-H200",), "nvidia-h200-141gb"),
)


class GpuPlacementError(ValueError):
    """The model does not fit on any allowed placement."""


@dataclass(frozen=True)
class GpuChoice:
    """A placement: `count` GPUs of `kind`, holding `memory_needed_bytes` in total."""

    kind: str
    count: int
    memory_needed_bytes: int  # weights x headroom + overhead on each of the `count` GPUs
    memory_per_gpu_bytes: int
    weight_bytes: int
    gpu: GpuKind = field(repr=False, compare=False)

    @property
    def total_memory_bytes(self) -> int:
        """Memory of all GPUs of the placement together."""
        return self.memory_per_gpu_bytes * self.count

    def node_affinity(self, scheme: str = "nvidia") -> dict[str, object]:
        """A required node affinity on the accelerator label (any listed variant of the kind)."""
        values = list(self.gpu.label_values(scheme))
        if not values:
            raise GpuPlacementError(f"GPU kind {self.kind} has no {LABEL_SCHEMES[scheme]} label value")
        return {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": LABEL_SCHEMES[scheme], "operator": "In", "values": values}
                            ]
                        }
                    ]
                }
            }
        }


def gpu_kind(name: str) -> GpuKind:
    """The table entry named `name` (case-insensitive), or ValueError listing the names."""
    for kind in GPU_KINDS:
        if kind.name.lower() == name.lower():
            return kind
    raise ValueError(f"GPU kind: unknown {name!r} (known: {', '.join(k.name for k in GPU_KINDS)})")


def weight_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of the weights in `dtype`; a quantized checkpoint (quantization_config) counts as int8."""
    if config.extra.get("quantization_config"):
        dtype = "int8"
    try:
        return config.memory_bytes(dtype)
    except Exception as exc:
        raise ValueError(f"dtype: {dtype!r} is not supported ({exc})") from None


def choose_gpu(
    config: ModelConfig,
    dtype: str = "bfloat16",
    kinds: Sequence[GpuKind] = GPU_KINDS,
    context_tokens: int = 0,
) -> GpuChoice:
    """The placement for serving `config` in `dtype`: the fewest GPUs, then the cheapest kind (see module doc).

    `context_tokens` adds that many tokens of KV cache beyond the headroom. Raises GpuPlacementError when even
    `MAX_GPUS` of the largest allowed kind do not fit.
    """
    weights = weight_bytes(config, dtype)
    sharded = int(weights * HEADROOM) + context_tokens * config.kv_cache_bytes_per_token(dtype)
    usable = [k for k in kinds if k.bf16 or dtype != "bfloat16"]
    if not usable:
        raise GpuPlacementError(f"no allowed GPU kind supports {dtype} (bfloat16 needs A100 or newer)")
    for count in COUNTS:
        if config.num_attention_heads % count:
            continue  # tensor parallelism splits whole attention heads
        per_gpu = -(-sharded // count) + OVERHEAD_PER_GPU
        for kind in usable:
            if per_gpu <= kind.memory_bytes:
                return GpuChoice(
                    kind=kind.name,
                    count=count,
                    memory_needed_bytes=sharded + count * OVERHEAD_PER_GPU,
                    memory_per_gpu_bytes=kind.memory_bytes,
                    weight_bytes=weights,
                    gpu=kind,
                )
    largest = max(usable, key=lambda k: k.memory_bytes)
    need = sharded + MAX_GPUS * OVERHEAD_PER_GPU
    raise GpuPlacementError(
        f"model needs {need / GIB:.1f} GiB in {dtype} (weights {weights / GIB:.1f} GiB x {HEADROOM} headroom "
        f"+ {OVERHEAD_PER_GPU / GIB:.0f} GiB per GPU), more than {MAX_GPUS} x {largest.name} "
        f"({MAX_GPUS * largest.memory_bytes / GIB:.0f} GiB) hold: use a smaller dtype (int8) or multi-node serving"
    )

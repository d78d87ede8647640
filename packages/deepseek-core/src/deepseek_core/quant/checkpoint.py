"""INT8 checkpoints: a Hugging Face-style directory whose config.json carries a `quantization_config`.

    "quantization_config": {"quant_method": "deepseek-int8", "format_version": 1,
                            "method": "weight_only" | "dynamic_quantization", "bits": 8,
                            "granularity": "per_channel" | "per_tensor", "clip_ratio": 1.0,
                            "modules_not_converted": ["model.embed_tokens", ...]}

Each converted module stores `<name>.weight` (int8 [out, in]) and `<name>.weight_scale` (float32 [out]);
routed experts are stored per expert as in float checkpoints (`...experts.<e>.gate_proj.weight` int8 +
`.weight_scale`). Everything else is stored as in save_model. transformers does not read this format;
deepseek_core.load_model does (it dispatches here when config.json has a quantization_config).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import _plan_shards, generation_config, parse_size
from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import atomic_directory
from ..model.moe import RoutedExperts
from ..model.rope import RotaryEmbedding
from ..model.transformer import Transformer
from ..safetensors_io import read_weight_index
from .convert import EMBEDDING, QUANT_METHOD, QuantizedTransformer, _eligible
from .layers import Int8Embedding, Int8Linear, Int8RoutedExperts, check_method

_FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)(?P<scale>_scale)?$"
)


def _expert_names(prefix: str, kind: str, expert: int, suffix: str) -> list[str]:
    projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{expert}.{p}.{suffix}" for p in projections]


def quantized_state_dict(model: QuantizedTransformer) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: Hugging Face names, experts unstacked, contiguous, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if name.endswith("weight_scale") or name.endswith("proj_scale"):
            tensor = tensor.to(torch.float32)  # scales are float32 on disk whatever the model dtype
        expert = _EXPERT_TENSOR.match(name)
        if expert:
            suffix = "weight_scale" if expert["scale"] else "weight"
            for e in range(tensor.shape[0]):
                parts = tensor[e].chunk(2, dim=0) if expert["kind"] == "gate_up_proj" else (tensor[e],)
                for part_name, part in zip(_expert_names(expert["prefix"], expert["kind"], e, suffix), parts):
                    out[part_name] = part.contiguous().cpu()
        else:
            out[name] = tensor.contiguous().cpu()
    return out


def save_quantized_model(
    model: QuantizedTransformer,
    directory: str | os.PathLike[str],
    max_shard_size: int | str = "2GB",
    tokenizer: Any = None,
) -> Path:
    """Write an INT8 model (from quantize_model or load_quantized_model) as a checkpoint directory, atomically."""
    if not isinstance(model, QuantizedTransformer):
        raise TypeError(
            f"model: expected a quantized model (quantize_model's result), got {type(model).__name__}"
        )
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: cannot save a checkpoint here, the path is a file")
    shards = _plan_shards(quantized_state_dict(model), parse_size(max_shard_size))
    with atomic_directory(target) as tmp:
        config_dict = model.config.to_dict()
        config_dict["torch_dtype"] = str(model.dtype).replace("torch.", "")
        config_dict["quantization_config"] = dict(model.quantization_config)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(model.config), indent=2) + "\n"
        )
        metadata = {"format": "pt", "quant_method": QUANT_METHOD}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=metadata)
                for name, tensor in shard.items():
                    weight_map[name] = fname
                    total += tensor.numel() * tensor.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def check_quantization_config(qc: Any, source: str) -> dict[str, Any]:
    """Validate a quantization_config dict, naming the field at fault."""
    if not isinstance(qc, dict):
        raise CheckpointError(
            f"{source}: field 'quantization_config' must be an object, got {type(qc).__name__}"
        )
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{source}: field 'quantization_config.quant_method' is {qc.get('quant_method')!r}; "
            f"this loader reads {QUANT_METHOD!r} checkpoints only"
        )
    if qc.get("bits") != 8:
        raise CheckpointError(f"{source}: field 'quantization_config.bits' must be 8, got {qc.get('bits')!r}")
    try:
        check_method(qc.get("method"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise CheckpointError(f"{source}: field 'quantization_config.method': {exc}") from None
    skipped = qc.get("modules_not_converted", [])
    if not isinstance(skipped, list) or not all(isinstance(s, str) for s in skipped):
        raise CheckpointError(
            f"{source}: field 'quantization_config.modules_not_converted' must be a list of names"
        )
    return qc


def _skeleton(config: ModelConfig, qc: dict[str, Any], files: dict[str, Any]) -> QuantizedTransformer:
    """The model on the meta device with INT8 modules where the checkpoint has them."""
    with torch.device("meta"):
        model = Transformer(config)
    skipped = set(qc.get("modules_not_converted", []))
    method = qc["method"]
    quantized_embedding = f"{EMBEDDING}.weight_scale" in files
    for name, module in _eligible(model, quantized_embedding).items():
        if name in skipped:
            continue
        new: nn.Module
        if isinstance(module, RoutedExperts):
            hidden = module.gate_up_proj.shape[2]
            new = Int8RoutedExperts(
                module.num_experts, hidden, module.intermediate_size, method, device="meta"
            )
        elif isinstance(module, nn.Embedding):
            new = Int8Embedding(module.num_embeddings, module.embedding_dim, device="meta")
        else:
            assert isinstance(module, nn.Linear)
            new = Int8Linear(
                module.in_features, module.out_features, module.bias is not None, method, device="meta"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.__class__ = QuantizedTransformer
    assert isinstance(model, QuantizedTransformer)
    model.quantization_config = dict(qc)
    return model


def load_quantized_model(
    directory: str | os.PathLike[str], config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> QuantizedTransformer:
    """Load an INT8 checkpoint directory (config.json has a quantization_config) into a QuantizedTransformer.

    Float tensors become `dtype` on `device`; int8 weights stay int8; scales load as float32 (the
    embedding's as `dtype`, since they set its output dtype).
    """
    directory = Path(directory)
    source = str(directory / "config.json")
    qc = check_quantization_config(config.extra.get("quantization_config"), source)
    files = read_weight_index(directory)
    model = _skeleton(config, qc, files)
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...], want: torch.dtype | None) -> torch.Tensor:
        if name not in files:
            raise CheckpointError(f"{directory}: missing tensor '{name}' (expected shape {list(shape)})")
        tensor = files[name].get(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{files[name].path}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if want == torch.int8 and tensor.dtype != torch.int8:
            raise CheckpointError(f"{files[name].path}: tensor '{name}' must be int8, found {tensor.dtype}")
        used.add(name)
        return tensor.to(device=device, dtype=want) if want is not None else tensor.to(device)

    def float_dtype(name: str) -> torch.dtype:
        if name == f"{EMBEDDING}.weight_scale":
            return dtype
        if name.endswith(_FLOAT32_SUFFIXES) or name.endswith("_scale"):
            return torch.float32
        return dtype

    state: dict[str, torch.Tensor] = {}
    tied = config.tie_word_embeddings
    for name, meta in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        want = torch.int8 if meta.dtype == torch.int8 else float_dtype(name)
        expert = _EXPERT_TENSOR.match(name)
        if expert:
            out = torch.empty(meta.shape, dtype=want, device=device)
            suffix = "weight_scale" if expert["scale"] else "weight"
            for e in range(meta.shape[0]):
                names = _expert_names(expert["prefix"], expert["kind"], e, suffix)
                rows = meta.shape[1] // len(names)
                for i, part_name in enumerate(names):
                    out[e, i * rows : (i + 1) * rows].copy_(read(part_name, (rows, *meta.shape[2:]), want))
            state[name] = out
        else:
            state[name] = read(name, tuple(meta.shape), want)
    if tied:
        state["lm_head.weight"] = state[f"{EMBEDDING}.weight"]
    unexpected = sorted(set(files) - used)
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensors not used by the model (first: '{unexpected[0]}'); "
            "is 'quantization_config.modules_not_converted' consistent with the weights?"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config).to(device)
    return model.eval()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers, each storage counted once (tied weights once)."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        # Views of one memory-mapped file share a storage, so the key is the tensor's own extent.
        key = (
            tensor.data_ptr() if tensor.device.type != "meta" else id(tensor),
            tensor.numel(),
            tensor.dtype,
        )
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def checkpoint_tensor_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of all tensors stored in a checkpoint directory's safetensors files (headers excluded)."""
    files = read_weight_index(Path(directory))
    return sum(f.entries[name].end - f.entries[name].start for name, f in files.items())

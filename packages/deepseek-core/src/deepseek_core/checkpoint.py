"""Hugging Face-format checkpoints: load_model / save_model.

A checkpoint directory holds config.json, generation_config.json and model.safetensors (or sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json), with Hugging Face tensor names. Routed
experts are stored per expert on disk (as transformers saves them) and stacked in memory for grouped matmuls.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_directory
from .hub import resolve_model_dir
from .model.rope import RotaryEmbedding
from .model.transformer import Transformer
from .safetensors_io import read_weight_index

log = logging.getLogger(__name__)

_EXPERT_STACK = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_EXPERT_FILE = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
# Router weights stay float32 whatever the model dtype, as in the reference implementations.
_FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
# Files a checkpoint save owns; anything else already in the target directory is carried over.
_CHECKPOINT_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)$"
)


def parse_size(size: int | str) -> int:
    """'2GB', '500MB', '100KB' or an int number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. '2GB', '500MB' or bytes)")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").upper()])


def _resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: unknown {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def load_model(
    path_or_id: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    config: ModelConfig | None = None,
) -> Transformer:
    """Load a Hugging Face-format checkpoint directory (or a model id) into a Transformer.

    Tensors are memory-mapped, converted to `dtype` (default float32) and placed straight on `device`
    (default CPU); a CPU load in the stored dtype keeps the weights in the file's page cache (no copy).
    Quantized checkpoints (a `quantization_config` in config.json) load through deepseek_core.quant.
    """
    directory = resolve_model_dir(str(path_or_id))
    config_path = directory / "config.json"
    if config is None:
        if not config_path.is_file():
            raise CheckpointError(
                f"{config_path}: missing config.json (is {directory} a checkpoint directory?)"
            )
        config = ModelConfig.from_json_file(config_path)
    target_dtype = _resolve_dtype(dtype, config)
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    if config.extra.get("quantization_config"):
        try:
            from .quant import load_quantized_model  # type: ignore[import-not-found]
        except ImportError:
            raise CheckpointError(
                f"{config_path}: field 'quantization_config' is set, and this deepseek-core cannot load "
                "quantized checkpoints"
            ) from None
        return load_quantized_model(directory, config, target_dtype, target_device)  # type: ignore[no-any-return]
    files = read_weight_index(directory)
    with torch.device("meta"):
        model = Transformer(config)
    state = _collect_state(model, files, directory, target_dtype, target_device)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config).to(target_device)
    return model.eval()


def _collect_state(
    model: Transformer, files: dict[str, Any], directory: Path, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read every tensor the model needs from `files`, checking names and shapes."""
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in files:
            raise CheckpointError(f"{directory}: missing tensor '{name}' (expected shape {list(shape)})")
        tensor = files[name].get(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{files[name].path}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        used.add(name)
        return tensor

    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        want = torch.float32 if name.endswith(_FLOAT32_SUFFIXES) else dtype
        return tensor.to(device=device, dtype=want) if tensor.is_floating_point() else tensor.to(device)

    tied = model.config.tie_word_embeddings
    for name, meta in expected.items():
        if tied and name == "lm_head.weight":
            continue
        stacked = _EXPERT_STACK.match(name)
        if stacked:
            prefix, kind = stacked["prefix"], stacked["kind"]
            num_experts = meta.shape[0]
            out = torch.empty(meta.shape, dtype=dtype, device=device)
            for e in range(num_experts):
                if kind == "gate_up_proj":
                    half = meta.shape[1] // 2
                    shape = (half, meta.shape[2])
                    out[e, :half].copy_(read(f"{prefix}.{e}.gate_proj.weight", shape))
                    out[e, half:].copy_(read(f"{prefix}.{e}.up_proj.weight", shape))
                else:
                    out[e].copy_(read(f"{prefix}.{e}.down_proj.weight", tuple(meta.shape[1:])))
            state[name] = out
        else:
            state[name] = place(name, read(name, tuple(meta.shape)))
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        used.add("lm_head.weight")
    unexpected = sorted(set(files) - used)
    if unexpected:
        # DeepSeek-V3 ships multi-token-prediction layers that inference does not use.
        log.warning("%s: ignoring %d unused tensors (first: %s)", directory, len(unexpected), unexpected[0])
    return state


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, experts unstacked, contiguous, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and not name.endswith(_FLOAT32_SUFFIXES):
            tensor = tensor.to(dtype)
        stacked = _EXPERT_STACK.match(name)
        if stacked:
            prefix = stacked["prefix"]
            for e in range(tensor.shape[0]):
                if stacked["kind"] == "gate_up_proj":
                    gate, up = tensor[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous().cpu()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous().cpu()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous().cpu()
        else:
            out[name] = tensor.contiguous().cpu()
    return out


def generation_config(config: ModelConfig) -> dict[str, Any]:
    """generation_config.json contents for `config`."""
    out: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key)
        if value is not None:
            out[key] = value
    return out


def save_model(
    model: Transformer,
    directory: str | os.PathLike[str],
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a Hugging Face-format directory that transformers' from_pretrained loads.

    Everything is written into a temporary directory beside the target and renamed into place, so a crash
    never leaves a half-written checkpoint; files of other kinds already in the target are kept.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: cannot save a checkpoint here, the path is a file")
    limit = parse_size(max_shard_size)
    save_dtype = _resolve_dtype(dtype, model.config) if dtype is not None else None
    tensors = hf_state_dict(model, save_dtype)
    shards = _plan_shards(tensors, limit)
    config = model.config
    with atomic_directory(target) as tmp:
        config_dict = config.to_dict()
        config_dict["torch_dtype"] = str(save_dtype or model.dtype).replace("torch.", "")
        if extra_config:
            config_dict.update(extra_config)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
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
        if target.is_dir():
            _carry_over_foreign_files(target, tmp)
    return target


def _carry_over_foreign_files(old: Path, new: Path) -> None:
    """Move files that a checkpoint save does not own (logs, other checkpoints) into the new directory."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or _CHECKPOINT_FILES.match(entry.name):
            continue
        os.replace(entry, new / entry.name)


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def checkpoint_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read just the ModelConfig of a checkpoint directory."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: missing config.json")
    return ModelConfig.from_json_file(config_path)

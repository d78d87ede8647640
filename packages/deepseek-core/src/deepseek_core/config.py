"""ModelConfig: the schema of a DeepSeek-family model, read from and written to Hugging Face config.json.

Three model types share one dataclass:
  llama        dense DeepSeek-LLM / DeepSeek-Coder (grouped-query attention, SwiGLU)
  deepseek_v2  Multi-head Latent Attention + DeepSeekMoE with softmax routing
  deepseek_v3  MLA + DeepSeekMoE with sigmoid routing, correction bias and grouped top-k
Presets (named shapes) live in presets.py, apart from the schema.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("llama", "deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "linear", "yarn")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8": 1}


@dataclass
class ModelConfig:
    """Shape and hyper-parameters of a model; field names follow Hugging Face's config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Multi-head Latent Attention (deepseek_v2 / deepseek_v3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # DeepSeekMoE
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str | None = None
    topk_method: str | None = None
    n_group: int | None = None
    topk_group: int | None = None
    # Keys we do not model but keep, so a round trip through config.json loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived shape
    @property
    def is_mla(self) -> bool:
        """True when attention is Multi-head Latent Attention."""
        return self.model_type in ("deepseek_v2", "deepseek_v3") and bool(self.kv_lora_rank)

    @property
    def is_moe(self) -> bool:
        """True when some layers use DeepSeekMoE."""
        return bool(self.n_routed_experts)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (GQA); equals num_attention_heads without GQA."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head dimension of dense attention."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """MLA query/key head dimension: the no-position part plus the rotary part."""
        return (self.qk_nope_head_dim or 0) + (self.qk_rope_head_dim or 0)

    @property
    def rope_dim(self) -> int:
        """Number of dimensions that rotary embeddings rotate per head."""
        return (self.qk_rope_head_dim or 0) if self.is_mla else self.attn_head_dim

    @property
    def uses_interleaved_rope(self) -> bool:
        """DeepSeek MLA checkpoints store rotary pairs interleaved; Llama's are split in halves."""
        if self.rope_interleave is not None:
            return self.rope_interleave
        return self.model_type != "llama"

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as a list (config.json allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses DeepSeekMoE instead of a dense MLP."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(self.moe_layer_freq, 1) == 0
        )

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "ModelConfig") -> None:
        """Check types and cross-field consistency; raise ConfigError naming the field."""
        hints = typing.get_type_hints(ModelConfig)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ConfigError(
                    f"{source}: field '{f.name}' must be {_type_name(hints[f.name])}, "
                    f"got {type(value).__name__} ({value!r})"
                )

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: field '{name}' {why}")

        need(
            self.model_type in MODEL_TYPES,
            "model_type",
            f"must be one of {MODEL_TYPES}, got {self.model_type!r}",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            need(getattr(self, name) > 0, name, "must be positive")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        need(
            self.num_attention_heads % self.kv_heads == 0,
            "num_key_value_heads",
            f"({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})",
        )
        if self.model_type == "llama" and self.head_dim is None:
            need(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})",
            )
        if self.model_type != "llama":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) is not None, name, f"is required for model_type {self.model_type!r}")
        need(
            self.rope_dim % 2 == 0,
            "qk_rope_head_dim" if self.is_mla else "head_dim",
            "must be even for rotary",
        )
        if self.rope_scaling is not None:
            rope_type = self.rope_type
            need(
                rope_type in ROPE_TYPES,
                "rope_scaling",
                f"type must be one of {ROPE_TYPES}, got {rope_type!r}",
            )
            if rope_type != "default":
                need(
                    isinstance(self.rope_scaling.get("factor"), (int, float)),
                    "rope_scaling",
                    "needs a numeric 'factor'",
                )
        if self.is_moe:
            for name in ("num_experts_per_tok", "moe_intermediate_size"):
                need(getattr(self, name) is not None, name, "is required when n_routed_experts is set")
            assert self.n_routed_experts is not None and self.num_experts_per_tok is not None
            need(
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok",
                f"must be in [1, n_routed_experts={self.n_routed_experts}]",
            )
            need(
                self.scoring_func in (None, "softmax", "sigmoid"),
                "scoring_func",
                "must be 'softmax' or 'sigmoid'",
            )
            if self.n_group and self.n_group > 1:
                need(
                    self.n_routed_experts % self.n_group == 0,
                    "n_group",
                    f"({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})",
                )
                need(
                    self.topk_group is not None and 0 < self.topk_group <= self.n_group,
                    "topk_group",
                    f"must be in [1, n_group={self.n_group}]",
                )

    @property
    def rope_type(self) -> str:
        """'default', 'linear' or 'yarn'."""
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def routing(self) -> str:
        """'softmax' (DeepSeek-V2) or 'sigmoid' (DeepSeek-V3) expert scoring."""
        if self.scoring_func:
            return self.scoring_func
        return "sigmoid" if self.model_type == "deepseek_v3" else "softmax"

    # ------------------------------------------------------------------ size estimates
    def param_count(self) -> int:
        """Number of parameters, computed from the shape alone (nothing is allocated)."""
        h, n_layers = self.hidden_size, self.num_hidden_layers
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        per_layer_norms = 2 * h
        total = embed + head + h  # final norm
        for layer in range(n_layers):
            total += per_layer_norms + self._attention_params()
            if self.is_moe_layer(layer):
                assert self.n_routed_experts is not None and self.moe_intermediate_size is not None
                expert = 3 * h * self.moe_intermediate_size
                total += self.n_routed_experts * expert + (self.n_shared_experts or 0) * expert
                total += self.n_routed_experts * h  # router (its correction bias is a buffer)
            else:
                total += 3 * h * self.intermediate_size + (
                    3 * self.intermediate_size + h if self.mlp_bias else 0
                )
        return total

    def _attention_params(self) -> int:
        h, heads = self.hidden_size, self.num_attention_heads
        bias = self.attention_bias
        if not self.is_mla:
            d = self.attn_head_dim
            q, kv = heads * d, self.kv_heads * d
            return h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if bias else 0)
        assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
        assert self.qk_nope_head_dim is not None and self.v_head_dim is not None
        qk = self.qk_head_dim
        if self.q_lora_rank:
            q_params = h * self.q_lora_rank + (self.q_lora_rank if bias else 0) + self.q_lora_rank
            q_params += self.q_lora_rank * heads * qk
        else:
            q_params = h * heads * qk
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + (
            (self.kv_lora_rank + self.qk_rope_head_dim) if bias else 0
        )
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = heads * self.v_head_dim * h + (h if bias else 0)
        return q_params + kv_a + self.kv_lora_rank + kv_b + o

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Bytes of KV cache one token takes across all layers (MLA caches the compressed latent)."""
        size = _dtype_bytes(dtype)
        if self.is_mla:
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.kv_heads * self.attn_head_dim
        return per_layer * self.num_hidden_layers * size

    def memory_bytes(self, dtype: str = "bfloat16", context_tokens: int = 0) -> int:
        """Estimated memory: weights in `dtype` plus the KV cache for `context_tokens` tokens."""
        return self.param_count() * _dtype_bytes(dtype) + context_tokens * self.kv_cache_bytes_per_token(
            dtype
        )

    def memory_table(self) -> dict[str, int]:
        """Weight bytes for each supported dtype."""
        return {name: self.param_count() * size for name, size in _DTYPE_BYTES.items() if name != "float8"}

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a Hugging Face config dict (old `rope_scaling` or new `rope_parameters` spelling)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "model_type" not in data:
            raise ConfigError(f"{source}: field 'model_type' is missing (expected one of {MODEL_TYPES})")
        if data["model_type"] not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {data['model_type']!r}; supported: {', '.join(MODEL_TYPES)}"
            )
        _normalize_rope(data, source)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        hints = typing.get_type_hints(cls)
        for key, value in known.items():
            # JSON has one number type: accept 1 for a float field, never "1".
            if isinstance(value, int) and not isinstance(value, bool) and _allows(hints[key], float):
                known[key] = float(value)
        try:
            config = cls(**known)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("ModelConfig", source, 1)) from None
        config.extra = extra
        config.validate(source)
        return config

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face config dict that transformers reads for this model type."""
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[self.model_type]]}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "rope_parameters")})
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "rope_theta", "torch_dtype"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("scoring_func", "topk_method", "rope_interleave", "head_dim"):
                continue
            out[f.name] = value
        if self.is_mla:
            out.pop("head_dim", None)  # transformers derives it from qk_rope_head_dim
        if self.model_type == "llama":
            for name in _MLA_MOE_FIELDS:
                out.pop(name, None)
        elif self.model_type == "deepseek_v2" and self.topk_method is None:
            out["topk_method"] = "group_limited_greedy" if (self.n_group or 0) > 1 else "greedy"
        if self.model_type == "deepseek_v3":
            out.setdefault("num_nextn_predict_layers", 0)
            out.setdefault("n_group", 1)
            out.setdefault("topk_group", 1)
            if out.get("n_group") is None:
                out["n_group"] = 1
            if out.get("topk_group") is None:
                out["topk_group"] = 1
        # Both spellings: rope_theta/rope_scaling (transformers 4.x) and rope_parameters (5.x).
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_scaling:
            out["rope_parameters"].update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            out["rope_parameters"]["rope_type"] = self.rope_type
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read one config.json file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str]) -> ModelConfig:
        """Read config.json from a checkpoint directory, a config file, or a model id."""
        path = Path(path_or_id)
        if path.is_file():
            return cls.from_json_file(path)
        from .hub import resolve_model_dir

        directory = resolve_model_dir(str(path_or_id), allow_patterns=["config.json"])
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{config_path}: missing config.json in checkpoint directory {directory}")
        return cls.from_json_file(config_path)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named shape from presets.py (deepseek-tiny ... deepseek-v3), with optional field overrides."""
        from .presets import preset_config

        return preset_config(name, **overrides)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write config.json into `directory` atomically."""
        from .fileio import atomic_write_text

        target = Path(directory) / "config.json"
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        new = dataclasses.replace(self, **changes)
        new.extra = dict(self.extra)
        return new


_MLA_MOE_FIELDS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "moe_layer_freq",
    "first_k_dense_replace",
    "norm_topk_prob",
    "routed_scaling_factor",
    "scoring_func",
    "topk_method",
    "n_group",
    "topk_group",
    "rope_interleave",
)


def _normalize_rope(data: dict[str, Any], source: str) -> None:
    """Fold `rope_parameters` (transformers 5) into `rope_theta` + `rope_scaling` (the older spelling)."""
    params = data.pop("rope_parameters", None)
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(
                f"{source}: field 'rope_parameters' must be an object, got {type(params).__name__}"
            )
        params = dict(params)
        if "rope_theta" in params:
            data["rope_theta"] = params.pop("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and data.get("rope_scaling") is None:
            data["rope_scaling"] = params
    scaling = data.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(
                f"{source}: field 'rope_scaling' must be an object, got {type(scaling).__name__}"
            )
        scaling = dict(scaling)
        if "type" in scaling:  # the oldest spelling of rope_type
            legacy = scaling.pop("type")
            scaling.setdefault("rope_type", legacy)
        data["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling


def _dtype_bytes(dtype: str) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"dtype: unknown {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _allows(hint: Any, kind: type) -> bool:
    args = typing.get_args(hint)
    return hint is kind or kind in args


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))

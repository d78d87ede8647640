"""Model: the few-line face of the framework (re-exported by every edition as `Model`).

    model = Model.from_pretrained("deepseek-base")          # local dir, HF cache, hub id or alias
    print(model.generate("AI发展的关键因素是", max_length=50))
    model = Model.from_config("deepseek-tiny", tokenizer=tok) # random init
    model.save_pretrained("out/")

Generation runs on the core inference engine (deepseek_core.engine.LLM), built on first use and kept;
`reset_engine()` drops it (trainers call it after changing the weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .hub import resolve_model_dir
from .model.transformer import Transformer
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128


class Model:
    """A Transformer (`.module`) with its tokenizer (`.tokenizer`) and config (`.config`)."""

    def __init__(
        self, module: Transformer, tokenizer: Tokenizer | None = None, source: str | None = None
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a Transformer, got {type(module).__name__}")
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self._llm: Any = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> Model:
        """Load a Hugging Face-format checkpoint: a local directory, or a hub id / alias (see hub.MODEL_ALIASES),
        with its tokenizer when the directory has one. Weights go to the GPU when there is one (else the CPU),
        in `dtype` (default float32, which training needs; pass torch.bfloat16 for inference-only use)."""
        directory = resolve_model_dir(os.fspath(path_or_id))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        module = load_model(directory, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_pretrained(directory) if (directory / "tokenizer.json").is_file() else None
        return cls(module, tokenizer, source=os.fspath(path_or_id))

    @classmethod
    def from_config(
        cls,
        config: str | ModelConfig,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> Model:
        """A randomly initialized model from a preset name or a ModelConfig.

        With a tokenizer, a preset's vocab_size and bos/eos ids follow the tokenizer; an explicit ModelConfig
        must already have room for every token id. `overrides` change preset fields (e.g. num_hidden_layers).
        """
        tok = Tokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if isinstance(config, str):
            if tok is not None:
                overrides.setdefault("vocab_size", tok.vocab_size)
                for key in ("bos_token_id", "eos_token_id"):
                    value = getattr(tok, key)
                    if value is not None:
                        overrides.setdefault(key, value)
            cfg = ModelConfig.from_preset(config, **overrides)
        elif isinstance(config, ModelConfig):
            cfg = config.replace(**overrides) if overrides else config
        else:
            raise TypeError(f"config: expected a preset name or a ModelConfig, got {type(config).__name__}")
        if tok is not None and tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"config.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tok.vocab_size})"
            )
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            module = Transformer(cfg)
        if dtype is not None or device is not None:
            module = module.to(device=device, dtype=dtype)
        return cls(module, tok, source=config if isinstance(config, str) else None)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        """The model's ModelConfig."""
        return self.module.config

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the weights."""
        return self.module.dtype

    def num_parameters(self) -> int:
        """Parameter count (tied weights once)."""
        return self.module.num_parameters()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of `input_ids` (no cache)."""
        return self.module(input_ids)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Model:
        """Move/cast the weights in place; returns self."""
        self.module.to(device=device, dtype=dtype)
        self.reset_engine()
        return self

    def __repr__(self) -> str:
        params = self.num_parameters() / 1e6
        return f"Model({self.config.model_type}, {params:.1f}M parameters, source={self.source!r}, device={self.device})"

    # ------------------------------------------------------------------ generation
    def reset_engine(self) -> None:
        """Drop the cached inference engine; the next generate() builds one over the current weights."""
        self._llm = None

    def _engine(self) -> Any:
        if self._llm is None:
            from .engine import LLM

            self.module.eval()
            self._llm = LLM(self.module, tokenizer=self.tokenizer)
        return self._llm

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass token ids, or build it with Model(module, tokenizer)"
            )
        return self.tokenizer

    def _params(
        self, prompt_len: int, max_length: int | None, max_new_tokens: int | None, options: dict[str, Any]
    ) -> Any:
        from .engine import SamplingParams

        context = self.config.max_position_embeddings
        if prompt_len >= context:
            raise ValueError(
                f"prompt: {prompt_len} tokens leave no room in the model's context of {context} tokens"
            )
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
            budget = max_new_tokens
        elif max_length is not None:
            # As in transformers: max_length counts the prompt's tokens and the new ones.
            if max_length <= prompt_len:
                raise ValueError(
                    f"max_length={max_length} leaves no room for new tokens: the prompt already has {prompt_len} tokens "
                    "(max_length counts prompt + new tokens; use max_new_tokens to count only new ones)"
                )
            budget = max_length - prompt_len
        else:
            budget = DEFAULT_MAX_NEW_TOKENS
        return SamplingParams(max_tokens=min(budget, context - prompt_len), **options)

    def _encode(self, prompt: str | Sequence[int], name: str) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return [int(t) for t in prompt]
        raise TypeError(f"{name}: expected a string or a list of token ids, got {type(prompt).__name__}")

    def generate(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = -1,
        repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | list[str] | Iterator[str]:
        """Continue `prompt` and return the generated text (without the prompt).

        A string (or one list of token ids) gives a string; a list of them gives a list of strings, decoded
        together in one batch. `max_length` counts prompt + new tokens as in transformers; `max_new_tokens`
        counts new tokens only and wins when both are given (default: 128 new tokens). temperature 0 is
        greedy. stream=True (single prompt only) returns an iterator of text pieces as they are decoded.
        """
        options = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "stop": stop,
            "seed": seed,
        }
        single = isinstance(prompt, str) or (
            isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
        )
        if single:
            ids = self._encode(prompt, "prompt")  # type: ignore[arg-type]
            params = self._params(len(ids), max_length, max_new_tokens, options)
            if stream:
                return self._engine().stream(ids, params)  # type: ignore[no-any-return]
            return str(self._engine().generate([ids], params)[0].text)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise TypeError("prompt: expected a string, a list of token ids, or a non-empty list of those")
        if stream:
            raise ValueError("stream=True takes one prompt; call generate once per prompt to stream several")
        batch = [self._encode(p, f"prompt[{i}]") for i, p in enumerate(prompt)]  # type: ignore[arg-type]
        params = [self._params(len(ids), max_length, max_new_tokens, options) for ids in batch]
        outputs = self._engine().generate(batch, params)
        return [str(o.text) for o in outputs]

    def chat(
        self,
        messages: list[dict[str, str]] | str,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = -1,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}] or one user string), rendered
        through the tokenizer's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        tokenizer = self._need_tokenizer()
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        options = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        params = self._params(len(ids), None, max_new_tokens, options)
        if stream:
            return self._engine().stream(list(ids), params)  # type: ignore[no-any-return]
        return str(self._engine().generate([list(ids)], params)[0].text).strip()

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        dtype: torch.dtype | str | None = None,
        max_shard_size: int | str = "2GB",
    ) -> Path:
        """Write a Hugging Face-format directory (weights, config, tokenizer) that transformers loads."""
        return save_model(
            self.module, directory, max_shard_size=max_shard_size, dtype=dtype, tokenizer=self.tokenizer
        )

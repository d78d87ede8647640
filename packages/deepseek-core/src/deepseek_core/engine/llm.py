"""LLM: the synchronous engine API (generate a batch of prompts, or stream one)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..model.transformer import Transformer
from .engine import EngineCore, PromptType
from .errors import RequestFailedError
from .outputs import RequestOutput
from .params import SamplingParams


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: unknown {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def build_engine(
    model_or_dir: Transformer | str | os.PathLike[str],
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **engine_kwargs: Any,
) -> EngineCore:
    """An EngineCore for a Transformer instance or a checkpoint directory (or model id).

    From a directory the model loads with deepseek_core.load_model and the tokenizer from its tokenizer.json
    when present. On CUDA the default dtype is bfloat16, on CPU float32.
    """
    from ..tokenizer import Tokenizer

    torch_dtype = _resolve_dtype(dtype)
    if isinstance(model_or_dir, Transformer):
        model = model_or_dir
        if device is not None or torch_dtype is not None:
            model = model.to(device=device, dtype=torch_dtype)
    elif isinstance(model_or_dir, (str, os.PathLike)):
        from ..checkpoint import load_model
        from ..hub import resolve_model_dir

        directory = resolve_model_dir(str(model_or_dir))
        target = torch.device(device) if device is not None else torch.device("cpu")
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        model = load_model(directory, dtype=torch_dtype, device=target)
        if tokenizer is None and (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_pretrained(directory)
    else:
        raise ValueError(
            f"model_or_dir: expected a Transformer or a checkpoint directory, got {type(model_or_dir).__name__}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    return EngineCore(model, tokenizer, **engine_kwargs)


def _is_token_ids(prompt: Any) -> bool:
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )


class LLM:
    """Offline inference: `LLM(model_or_dir).generate(prompts, params)`.

    model_or_dir: a Transformer (tokenizer optional: without one, prompts are token ids and text is empty)
    or a checkpoint directory. The KV-cache pool is sized by `num_kv_blocks` or `kv_cache_bytes` (default:
    enough for max_num_seqs full-length sequences, capped at min(4 GiB, 20 % of RAM) on CPU and 60 % of free
    GPU memory on CUDA; a sequence must fit alone, so the pool also caps max_model_len).
    """

    def __init__(
        self,
        model_or_dir: Transformer | str | os.PathLike[str],
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_model_len: int | None = None,
        cuda_graphs: bool = False,
        cpu_prepack: bool | None = None,
    ) -> None:
        self.engine = build_engine(
            model_or_dir,
            tokenizer,
            dtype,
            device,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_kv_blocks,
            kv_cache_bytes=kv_cache_bytes,
            block_size=block_size,
            max_model_len=max_model_len,
            cuda_graphs=cuda_graphs,
            cpu_prepack=cpu_prepack,
        )

    @property
    def tokenizer(self) -> Any:
        """The Tokenizer, or None."""
        return self.engine.tokenizer

    @property
    def config(self) -> Any:
        """The model's ModelConfig."""
        return self.engine.config

    @property
    def model(self) -> Transformer:
        """The Transformer."""
        return self.engine.model

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach."""
        return self.engine.max_model_len

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order.

        A single prompt may be a string or a list of token ids; otherwise give a list of them. `params` is one
        SamplingParams for all, or one per prompt. Every prompt and params is validated before anything runs:
        the first invalid one raises ValueError naming its index (prompts[i] / params[i]) and the engine is
        left as it was. A request that fails while running (e.g. NaN logits) comes back with finish_reason
        "abort" and `error` set; the others complete as they would alone.
        """
        if isinstance(prompts, str) or _is_token_ids(prompts):
            batch: list[PromptType] = [prompts]  # type: ignore[list-item]
        elif isinstance(prompts, (list, tuple)):
            if not prompts:
                raise ValueError("prompts: empty list")
            batch = list(prompts)
        else:
            raise ValueError(
                f"prompts: must be a string, token ids or a list of them, got {type(prompts).__name__}"
            )
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(batch)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(batch):
                raise ValueError(f"params: {len(per_prompt)} SamplingParams for {len(batch)} prompts")
        shared = params is None or isinstance(params, SamplingParams)
        checked: set[int] = set()
        token_ids: list[list[int]] = []
        for i, (prompt, p) in enumerate(zip(batch, per_prompt)):
            if id(p) not in checked:
                try:
                    self.engine.check_params(p)
                except ValueError as exc:
                    raise ValueError(f"{'params' if shared else f'params[{i}]'}: {exc}") from None
                checked.add(id(p))
            try:
                token_ids.append(self.engine.encode_prompt(prompt))
            except ValueError as exc:
                raise ValueError(f"prompts[{i}]: {exc}") from None
        ids: list[str] = []
        try:
            for prompt_ids, p in zip(token_ids, per_prompt):
                ids.append(self.engine.add_request(prompt_ids, p))
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in finals and self.engine.has_request(rid):
                    self.engine.abort_request(rid)
        return [finals[rid] for rid in ids]

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated (never a split UTF-8 character).

        Raises RequestFailedError (after the text generated so far) if the request fails while running.
        """
        rid = self.engine.add_request(prompt, params)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    done = out.finished
                    if out.error is not None:
                        raise RequestFailedError(rid, out.error)
                    if out.text_delta:
                        yield out.text_delta
        finally:
            if not done and self.engine.has_request(rid):
                self.engine.abort_request(rid)

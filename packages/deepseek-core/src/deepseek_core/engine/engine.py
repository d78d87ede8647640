"""EngineCore: requests in, one step at a time (schedule -> forward -> sample -> stop checks), outputs out.

One bad request never harms another: a request whose logits are NaN/inf, whose row cannot be sampled, or
whose detokenizer / stop-string handling raises is finished alone ("abort", with RequestOutput.error saying
why) and its cache blocks are zeroed before reuse; the rest of the batch runs on unchanged.

The sync LLM drives it directly; AsyncLLM drives it from a background thread. Methods are thread-safe: the
forward pass runs outside the lock, so abort() frees a request's blocks at once even mid-step (the freed
blocks cannot be handed out before the running step ends, because only step() allocates).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Sequence as Seq
from typing import Any

import torch

from ..model.transformer import Transformer
from .cpu_linear import PACKABLE_DTYPES, prepack_available
from .kv_cache import KVCache, bytes_per_token
from .outputs import EngineStats, RequestMetrics, RequestOutput
from .params import SamplingParams
from .runner import ModelRunner
from .sampling import sample_rows
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

PromptType = str | Seq[int]
log = logging.getLogger(__name__)

_CPU_CACHE_MAX_BYTES = 4 << 30
_CPU_CACHE_RAM_FRACTION = 0.2
_AUTO_PREPACK_MAX_BYTES = 4 << 30
_CUDA_CACHE_FRACTION = 0.6  # of the memory free after loading the model


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _CUDA_CACHE_FRACTION)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 8 << 30
    return int(min(_CPU_CACHE_MAX_BYTES, ram * _CPU_CACHE_RAM_FRACTION))


class EngineCore:
    """The scheduler, KV cache, model runner and sampler for one model."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_model_len: int | None = None,
        cuda_graphs: bool = False,
        cpu_prepack: bool | None = None,
        cpu_prepack_in_background: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        device, dtype = model.device, model.dtype
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 1):
            raise ValueError(f"max_model_len: must be a positive integer, got {max_model_len!r}")
        wanted_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")
        if num_kv_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("num_kv_blocks, kv_cache_bytes: give at most one of them")
        per_block = bytes_per_token(self.config, dtype) * block_size
        if num_kv_blocks is None:
            if kv_cache_bytes is not None:
                if kv_cache_bytes < per_block:
                    raise ValueError(
                        f"kv_cache_bytes: {kv_cache_bytes} is less than one block ({per_block} bytes)"
                    )
                num_kv_blocks = kv_cache_bytes // per_block
            else:
                # Enough for max_num_seqs full-length sequences, within a memory budget, at least one sequence.
                budget = _default_cache_bytes(device) // per_block
                full = max_num_seqs * (-(-wanted_len // block_size))
                num_kv_blocks = max(min(full, budget), -(-wanted_len // block_size))
        elif not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be a positive integer, got {num_kv_blocks!r}")
        self.cache = KVCache(self.config, num_kv_blocks, block_size, dtype=dtype, device=device)
        # A sequence must fit in the pool on its own, so the pool caps the context window.
        self.max_model_len = min(wanted_len, self.cache.capacity_tokens)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(model, self.cache)
        eos = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._requests: dict[str, Sequence] = {}
        self._lock = threading.RLock()
        self._arrival = itertools.count()
        self._seed_source = random.Random()
        self._counters = {"prompt": 0, "generation": 0, "finished": 0, "steps": 0, "failed": 0}
        if cuda_graphs:
            if device.type != "cuda":
                raise ValueError(f"cuda_graphs: needs a CUDA device, the model is on {device}")
            if self.config.is_moe:
                log.warning(
                    "cuda_graphs: not used for MoE models (data-dependent routing); decoding runs eagerly"
                )
            else:
                self.enable_static_decode(capture=True)
        if cpu_prepack is None:  # auto: on CPU, when the packed copy (about the model's size) is modest
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            cpu_prepack = (
                device.type == "cpu" and dtype in PACKABLE_DTYPES and weight_bytes <= _AUTO_PREPACK_MAX_BYTES
            )
        if cpu_prepack:
            if device.type != "cpu" or dtype not in PACKABLE_DTYPES:
                raise ValueError(
                    f"cpu_prepack: needs a float32 or bfloat16 model on CPU, got {dtype} on {device}"
                )
            if prepack_available(dtype):
                self.runner.enable_cpu_prepack(background=cpu_prepack_in_background)
            else:
                log.warning(
                    f"cpu_prepack: oneDNN {dtype} linear kernels are not available here; using plain linears"
                )

    def enable_static_decode(self, capture: bool = True) -> None:
        """Run decode-only steps with fixed shapes (captured as CUDA graphs when `capture`).

        Reserves one cache block as scratch for padding rows; call before adding requests.
        """
        if self._requests:
            raise RuntimeError("enable_static_decode: call it before adding requests")
        usable = (self.cache.num_blocks - 1) * self.cache.block_size
        if usable < 1:
            raise ValueError("num_kv_blocks: cuda_graphs needs at least 2 blocks (one is scratch)")
        scratch = self.cache.allocator.allocate(1)[0]
        self.cache.zero_fresh([scratch])
        self.max_model_len = min(self.max_model_len, usable)
        self.scheduler.max_model_len = self.max_model_len
        self.runner.enable_static_decode(scratch, self.scheduler.max_num_seqs, self.max_model_len, capture)

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: PromptType) -> list[int]:
        """Token ids of a prompt (text or ids), validated against the vocabulary and context window."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids or a tokenizer")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool):
                    raise ValueError(f"prompt: token ids must be integers, got {t!r}")
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.is_floating_point():
            ids = prompt.tolist()
        else:
            raise ValueError(f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: is empty (needs at least one token)")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens exceed the context window (max_model_len={self.max_model_len})"
            )
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """Raise ValueError naming the field when `params` cannot run on this engine."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # again: a dataclass field may have been changed since construction
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings need a tokenizer (use stop_token_ids)")
        vocab = self.config.vocab_size
        if params.stop_token_ids and any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids: ids must be < vocab_size ({vocab})")

    def add_request(
        self, prompt: PromptType, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; returns its id. Bad input raises ValueError naming the parameter."""
        params = SamplingParams() if params is None else params
        self.check_params(params)
        ids = self.encode_prompt(prompt)
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        device = self.cache.device
        generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        generator.manual_seed(seed)
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            seq = Sequence(
                request_id=request_id,
                prompt_token_ids=ids,
                params=params,
                arrival=next(self._arrival),
                generator=generator,
                metrics=RequestMetrics(arrival_time=time.monotonic()),
            )
            if self.tokenizer is not None:
                seq.decoder = self.tokenizer.incremental_decoder()
            self._requests[request_id] = seq
            self.scheduler.add(seq)
            self._counters["prompt"] += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput:
        """Finish a request now ("abort") and free its cache blocks; unknown ids raise ValueError."""
        with self._lock:
            seq = self._requests.get(request_id)
            if seq is None:
                raise ValueError(f"request_id: unknown request {request_id!r} (finished or never added)")
            self._finish(seq, "abort")
            return self._output(seq)

    def _fail(self, seq: Sequence, reason: str) -> None:
        """End one request that cannot go on ("abort", with `reason` as its error); the others are untouched."""
        log.warning("request %s aborted: %s", seq.request_id, reason)
        seq.error = reason
        self._counters["failed"] += 1
        if seq.is_finished:  # it failed after a stop condition finished it (its logits were finite)
            seq.finish_reason = "abort"
            return
        self._finish(seq, "abort")

    def running_request_ids(self) -> list[str]:
        """Ids of the requests that hold cache blocks now."""
        with self._lock:
            return [s.request_id for s in self.scheduler.running]

    def has_request(self, request_id: str) -> bool:
        """True while `request_id` waits or runs."""
        with self._lock:
            return request_id in self._requests

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        with self._lock:
            return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        """Requests waiting or running."""
        return len(self._requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that produced tokens or finished."""
        with self._lock:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                return []
            batch = self.runner.prepare(plan.chunks)
        logits = self.runner.execute(batch)
        with self._lock:
            self._counters["steps"] += 1
            to_sample: list[Sequence] = []
            rows: list[int] = []
            row = 0
            for chunk in plan.chunks:
                seq = chunk.seq
                if chunk.samples:
                    row += 1
                if seq.is_finished:  # aborted while the forward pass ran
                    continue
                seq.num_computed = chunk.start + chunk.length
                if chunk.samples:
                    to_sample.append(seq)
                    rows.append(row - 1)
            if not to_sample:
                return []
            if len(rows) != logits.shape[0]:
                logits = logits[torch.tensor(rows, device=logits.device)]
            tokens, logprobs, errors = sample_rows(logits, to_sample)
            now = time.monotonic()
            outputs = []
            for i, (seq, token, logprob) in enumerate(zip(to_sample, tokens, logprobs)):
                if token is None:
                    self._fail(seq, errors[i])
                else:
                    try:
                        self._append(seq, token, logprob, now)
                    except Exception as exc:  # e.g. a tokenizer that cannot decode: this request only
                        log.exception("request %s: output processing failed", seq.request_id)
                        self._fail(
                            seq, f"detokenization or stop-string handling failed: {type(exc).__name__}: {exc}"
                        )
                outputs.append(self._output(seq))
            return outputs

    def _append(self, seq: Sequence, token: int, logprob: Any, now: float) -> None:
        """Add a sampled token, update the text, and finish the sequence if a stop condition holds."""
        params = seq.params
        seq.append_token(token, logprob)
        self._counters["generation"] += 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        if token in self.eos_token_ids and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        if params.stop_token_ids and token in params.stop_token_ids:
            seq.stop_reason = token
            self._finish(seq, "stop")
            return
        if seq.decoder is not None:
            previous = len(seq.text)
            seq.text += seq.decoder.push([token])
            if params.stop_strings and self._check_stop_strings(seq, previous):
                return
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens > self.max_model_len:
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, previous: int) -> bool:
        """Finish at the earliest stop string that ends in the new text; cut the text there."""
        stops = seq.params.stop_strings
        begin = max(0, previous - max(len(s) for s in stops) + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            at = seq.text.find(s, begin)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return False
        at, s = best
        seq.text = seq.text[: at + len(s)] if seq.params.include_stop_str_in_output else seq.text[:at]
        seq.stop_reason = s
        self._finish(seq, "stop")
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.decoder is not None and reason == "length":
            seq.text += seq.decoder.flush()
        seq.finish_reason = reason
        # An aborted or failed request may leave NaN/inf in its blocks (even written after an abort, by a step
        # still running): have them zeroed before anyone else gets them, since masked attention still
        # multiplies the values it skips by 0. Normal finishes saw finite logits, so their blocks are clean.
        self.scheduler.remove(seq, scrub=reason == "abort")
        seq.status = SequenceStatus.FINISHED
        seq.metrics.finished_time = time.monotonic()
        self._requests.pop(seq.request_id, None)
        self._counters["finished"] += 1

    def _output(self, seq: Sequence) -> RequestOutput:
        """This step's delta plus the cumulative state; text that may begin a stop string is held back."""
        if seq.is_finished:
            emit_to = len(seq.text)
        else:
            hold = max((len(s) for s in seq.params.stop_strings), default=1) - 1
            emit_to = max(seq.num_emitted_chars, len(seq.text) - hold)
        text_delta = seq.text[seq.num_emitted_chars : emit_to]
        seq.num_emitted_chars = emit_to
        output_ids = seq.output_token_ids
        token_delta = output_ids[seq.num_emitted_tokens :]
        logprobs_delta = None
        if seq.logprobs is not None:
            logprobs_delta = seq.logprobs[seq.num_emitted_tokens :]
        seq.num_emitted_tokens = len(output_ids)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text[:emit_to],
            token_ids=output_ids,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finished=seq.is_finished,
            text_delta=text_delta,
            token_ids_delta=token_delta,
            logprobs_delta=logprobs_delta,
            stop_reason=seq.stop_reason,
            metrics=seq.metrics,
            error=seq.error,
        )

    # ------------------------------------------------------------------ monitoring
    def stats(self) -> EngineStats:
        """Queue lengths, cache usage and counters."""
        with self._lock:
            return EngineStats(
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                kv_cache_usage=self.cache.usage,
                num_free_blocks=self.cache.num_free_blocks,
                num_blocks=self.cache.num_blocks,
                block_size=self.cache.block_size,
                max_model_len=self.max_model_len,
                num_preemptions=self.scheduler.num_preemptions,
                prompt_tokens_total=self._counters["prompt"],
                generation_tokens_total=self._counters["generation"],
                requests_finished_total=self._counters["finished"],
                steps_total=self._counters["steps"],
                requests_failed_total=self._counters["failed"],
            )

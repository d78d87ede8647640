"""Model execution over the paged cache: one forward pass per step for every scheduled chunk.

All chunks of a step are flattened into one row of tokens ([1, T]) so the linear layers see one big
matrix; only attention needs to know where each sequence starts. `PagedAttention` is the KVCacheView that
the model's attention layers call: it writes this step's keys/values (or MLA latents) into their cache
slots and attends over each sequence's history:
  - single-token chunks (decodes) together, in one batched attention over whole blocks gathered by block
    table (a plain view when a lone sequence's blocks are consecutive);
  - each multi-token chunk (prefill) on its own: causal SDPA over its own keys when it starts at position
    0, otherwise over its gathered history with an offset causal mask.
MLA decodes use the weight-absorbed form: the query's no-position part is multiplied into latent space by
kv_b_proj's key half, attention runs over the cached latents (one shared "head"), and the result goes
through kv_b_proj's value half. MLA prefills expand keys/values from the latent, like the full forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model.transformer import Transformer
from ..quant import kernels
from .cpu_linear import PackedLinears
from .cuda_graphs import StaticDecode, StaticDecodeInputs
from .kv_cache import KVCache
from .scheduler import ScheduledChunk


@dataclass
class _Prefill:
    """A multi-token chunk: tokens [offset, offset + length) of the flat batch, at positions start.."""

    offset: int
    length: int
    start: int
    history_blocks: torch.Tensor | None  # blocks holding positions [0, start + length), when start > 0
    mask: torch.Tensor | None  # [length, n_blocks * block_size] causal mask with offset, when start > 0


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


# Per-sequence decode attention (views, no padding) pays ~5 small ops per sequence and layer; gathering all
# sequences into one padded batch pays a copy of their keys. Past this many key bytes per sequence and layer
# the copy costs more (CPU; on CUDA the batched SDPA always wins).
_LOOP_MIN_BYTES = 128 * 1024


class Workspace:
    """Grow-only scratch buffers for the per-layer gathers (CPU).

    Fresh multi-megabyte tensors cost page faults on every allocation on CPU (the allocator returns them to
    the OS), often more than the copy itself; gathering into reused buffers avoids that.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined), valid until the next get(name)."""
        numel = 1
        for d in shape:
            numel *= d
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


class PagedAttention:
    """KVCacheView over a KVCache for one step's flattened batch (built once, used by every layer).

    Decode attention is head-major throughout: gathered keys are [KVH, B, L, D] with every [L, D] matrix
    contiguous, which is what batched matmuls need to run fast on CPU.
    """

    def __init__(
        self, cache: KVCache, decode_backend: str = "auto", workspace: Workspace | None = None
    ) -> None:
        self.cache = cache
        self.workspace = workspace
        self.use_sdpa_decode = decode_backend == "sdpa" or (
            decode_backend == "auto" and cache.device.type == "cuda"
        )
        # CPU per-sequence decode through the native kernel (quant/csrc/decode_attention.c) where it runs;
        # "matmul" keeps the torch ops.
        self.native_decode = decode_backend == "auto" and cache.device.type == "cpu"
        self.num_decode = 0
        self.slot_mapping = torch.empty(0, dtype=torch.long, device=cache.device)  # [T]: slots of new tokens
        # Decodes read the cache through one contiguous slot range (a view: one sequence whose blocks are
        # consecutive), or gather whole blocks: decode_blocks [B * n_blocks], decode_valid [B, n_blocks * bs]
        # masking what lies past each sequence's length (None when nothing needs masking).
        self.decode_range: tuple[int, int] | None = None
        self.decode_blocks: torch.Tensor | None = None
        self.decode_valid: torch.Tensor | None = None
        self.decode_len = 0  # keys per decode sequence as gathered (n_blocks * bs, or the range length)
        # Or, per sequence (CPU, long contexts): (first slot, None, length) for consecutive blocks read
        # through a view, (0, blocks, length) for a sequence whose blocks must be gathered.
        self.decode_seqs: list[tuple[int, torch.Tensor | None, int]] | None = None
        self.prefills: list[_Prefill] = []

    @classmethod
    def static_decode(
        cls,
        cache: KVCache,
        slot_mapping: torch.Tensor,
        decode_blocks: torch.Tensor,
        decode_valid: torch.Tensor,
        decode_backend: str = "auto",
    ) -> PagedAttention:
        """Decode-only batch from fixed-shape tensors (CUDA graphs): slots [B], blocks [B * nb], valid [B, L]."""
        view = cls(cache, decode_backend)
        view.num_decode = slot_mapping.shape[0]
        view.slot_mapping = slot_mapping
        view.decode_blocks = decode_blocks
        view.decode_valid = decode_valid
        view.decode_len = decode_valid.shape[1]
        return view

    @classmethod
    def for_chunks(
        cls,
        cache: KVCache,
        chunks: list[ScheduledChunk],
        decode_backend: str = "auto",
        workspace: Workspace | None = None,
    ) -> PagedAttention:
        """Metadata for a step's chunks (single-token chunks first, as the scheduler orders them)."""
        view = cls(cache, decode_backend, workspace)
        device = cache.device
        bs = cache.block_size
        decodes = [c for c in chunks if c.length == 1]
        view.num_decode = len(decodes)
        new_slots: list[int] = []
        for c in chunks:
            new_slots.extend(_slots(c.seq.block_table, c.start, c.start + c.length, bs))
        view.slot_mapping = torch.tensor(new_slots, dtype=torch.long, device=device)
        if decodes:
            lengths = [c.start + 1 for c in decodes]
            n_blocks = -(-max(lengths) // bs)
            per_token = cache.bytes_per_token // cache.config.num_hidden_layers
            if not view.use_sdpa_decode and (
                len(decodes) == 1 or sum(lengths) * per_token >= _LOOP_MIN_BYTES * len(decodes)
            ):
                # One attention per sequence over its own keys: a view when its blocks are consecutive.
                view.decode_seqs = []
                for c, length in zip(decodes, lengths):
                    need = -(-length // bs)
                    table = c.seq.block_table
                    if c.seq.num_contiguous_blocks >= need:
                        view.decode_seqs.append((table[0] * bs, None, length))
                    else:
                        seq_blocks = torch.tensor(table[:need], dtype=torch.long, device=device)
                        view.decode_seqs.append((0, seq_blocks, length))
            elif len(decodes) == 1 and decodes[0].seq.num_contiguous_blocks >= n_blocks:
                view.decode_range = (decodes[0].seq.block_table[0] * bs, lengths[0])  # a view, no gather
                view.decode_len = lengths[0]
            else:
                tables = [c.seq.block_table[:n_blocks] for c in decodes]
                # Pad with the sequence's own last block: masked out, but 0 * NaN would still be NaN, and
                # another sequence's block may hold NaN (a failing request) in the same step.
                tables = [t + [t[-1]] * (n_blocks - len(t)) for t in tables]
                view.decode_blocks = torch.tensor(tables, dtype=torch.long, device=device).view(-1)
                view.decode_len = n_blocks * bs
                if any(n != view.decode_len for n in lengths):
                    lens = torch.tensor(lengths, device=device)
                    view.decode_valid = torch.arange(view.decode_len, device=device) < lens.unsqueeze(1)
        offset = view.num_decode
        for c in chunks[view.num_decode :]:
            blocks = mask = None
            if c.start > 0:
                end = c.start + c.length
                n_blocks = -(-end // bs)
                blocks = torch.tensor(c.seq.block_table[:n_blocks], dtype=torch.long, device=device)
                query_pos = torch.arange(c.start, end, device=device).unsqueeze(1)
                mask = torch.arange(n_blocks * bs, device=device).unsqueeze(0) <= query_pos
            view.prefills.append(_Prefill(offset, c.length, c.start, blocks, mask))
            offset += c.length
        return view

    # ------------------------------------------------------------------ gathers
    def _gather(
        self, name: str, cache_tensor: torch.Tensor, blocks: torch.Tensor, head_major: bool
    ) -> torch.Tensor:
        """Whole blocks of `cache_tensor`, in the order of `blocks`.

        Dense [KVH, slots, D] -> [KVH, n * bs, D]; MLA latent [slots, E] -> [n * bs, E].
        """
        bs = self.cache.block_size
        if head_major:
            heads, _, width = cache_tensor.shape
            paged = cache_tensor.view(heads, -1, bs, width)
            shape: tuple[int, ...] = (heads, blocks.numel(), bs, width)
            dim = 1
        else:
            width = cache_tensor.shape[-1]
            paged = cache_tensor.view(-1, bs, width)
            shape = (blocks.numel(), bs, width)
            dim = 0
        if self.workspace is None:
            out = paged.index_select(dim, blocks)
        else:
            out = torch.index_select(
                paged, dim, blocks, out=self.workspace.get(name, shape, cache_tensor.dtype)
            )
        return out.view(heads, -1, width) if head_major else out.view(-1, width)

    def _seq_keys(
        self,
        name: str,
        cache_tensor: torch.Tensor,
        entry: tuple[int, torch.Tensor | None, int],
        head_major: bool,
    ) -> torch.Tensor:
        """One decode sequence's cached entries: dense [KVH, L, D], MLA [L, E]."""
        first, blocks, length = entry
        dim = 1 if head_major else 0
        if blocks is None:
            return cache_tensor.narrow(dim, first, length)
        return self._gather(name, cache_tensor, blocks, head_major).narrow(dim, 0, length)

    def _decode_loop(
        self, q: torch.Tensor, caches: tuple[torch.Tensor, ...], value_width: int | None, scale: float
    ) -> torch.Tensor:
        """Decode attention one sequence at a time (no padding, views where possible): q [H, B, D] -> [H, B, Dv].

        caches: (key, value) dense caches [KVH, slots, D], or (latent,) for MLA, whose keys are the whole
        latent+rope row and whose values are its first `value_width` columns.
        """
        assert self.decode_seqs is not None
        heads = q.shape[0]
        dense = len(caches) == 2
        value_dim = caches[1].shape[-1] if dense else value_width
        assert value_dim is not None

        def keys_values(entry: tuple[int, torch.Tensor | None, int]) -> tuple[torch.Tensor, torch.Tensor]:
            """[KVH, L, D] keys and [KVH, L, Dv] values; MLA: its latent rows as one kv head for all H heads."""
            if dense:
                k = self._seq_keys("key", caches[0], entry, head_major=True)
                return k, self._seq_keys("value", caches[1], entry, head_major=True)
            rows = self._seq_keys("latent", caches[0], entry, head_major=False).unsqueeze(0)
            return rows, rows[..., :value_dim]

        if self.native_decode and kernels.decode_attention_takes(caches[0].dtype, q.shape[-1], value_dim):
            query_dtype = q.dtype
            if q.dtype != caches[0].dtype or q.stride(-1) != 1:  # the kernel reads one dtype, rows contiguous
                q = q.to(caches[0].dtype).contiguous()
            out = torch.empty(heads, len(self.decode_seqs), value_dim, dtype=q.dtype, device=q.device)
            for i, entry in enumerate(self.decode_seqs):
                kernels.decode_attention(q[:, i], *keys_values(entry), scale, out[:, i])
            return out.to(query_dtype)
        outs = []
        for i, entry in enumerate(self.decode_seqs):
            k, v = keys_values(entry)
            query = q[:, i].reshape(k.shape[0], heads // k.shape[0], q.shape[-1])  # [KVH, G, D]
            scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
            outs.append(torch.matmul(scores.softmax(dim=-1), v.float()).reshape(heads, -1))
        return torch.stack(outs, dim=1).to(q.dtype)

    def _decode_keys(self, name: str, cache_tensor: torch.Tensor, head_major: bool) -> torch.Tensor:
        """Dense: [KVH, B, L, D]; MLA: [B, L, E] (L = decode_len)."""
        if self.decode_range is not None:
            first, length = self.decode_range
            rows = cache_tensor.narrow(1 if head_major else 0, first, length)
            return rows.unsqueeze(1) if head_major else rows.unsqueeze(0)
        assert self.decode_blocks is not None
        rows = self._gather(name, cache_tensor, self.decode_blocks, head_major)
        if head_major:
            return rows.view(rows.shape[0], self.num_decode, self.decode_len, rows.shape[-1])
        return rows.view(self.num_decode, self.decode_len, rows.shape[-1])

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One query token per sequence, head-major: q [H, B, D], k [KVH, B, L, D], v [KVH, B, L, Dv] -> [H, B, Dv].

        On CUDA this is SDPA. On CPU, batched matmuls in float32 (CPU bf16 matmuls on such skinny shapes are
        slower than upcasting): each KV head serves its group of query heads without repeating K/V, faster
        than the CPU SDPA kernels for single-token queries.
        """
        heads, batch, _ = q.shape
        kv_heads = k.shape[0]
        if self.use_sdpa_decode:
            mask = None if self.decode_valid is None else self.decode_valid.view(batch, 1, 1, -1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(2),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=kv_heads != heads,
            )  # [B, H, 1, Dv]
            return out.squeeze(2).transpose(0, 1)
        grouped = q.reshape(kv_heads, heads // kv_heads, batch, q.shape[-1]).transpose(1, 2)  # [KVH, B, G, D]
        scores = torch.matmul(grouped.float(), k.float().transpose(-1, -2)) * scale  # [KVH, B, G, L]
        if self.decode_valid is not None:
            scores = scores.masked_fill(~self.decode_valid.view(1, batch, 1, -1), float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v.float())  # [KVH, B, G, Dv]
        return out.transpose(1, 2).reshape(heads, batch, v.shape[-1]).to(q.dtype)

    @staticmethod
    def _join(parts: list[torch.Tensor]) -> torch.Tensor:
        """[heads, n_i, d] parts in flat-batch order -> [1, heads, T, d]."""
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.unsqueeze(0)

    # ------------------------------------------------------------------ dense (GQA) attention
    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query [1, H, T, D], key/value [1, KVH, T, D] -> [1, H, T, D]."""
        key_cache, value_cache = self.cache.key[layer_idx], self.cache.value[layer_idx]
        key_cache.index_copy_(1, self.slot_mapping, key[0].to(key_cache.dtype))
        value_cache.index_copy_(1, self.slot_mapping, value[0].to(value_cache.dtype))
        gqa = key.shape[1] != query.shape[1]
        parts = []
        if self.num_decode:
            q = query[0, :, : self.num_decode]  # [H, B, D]
            if self.decode_seqs is not None:
                parts.append(self._decode_loop(q, (key_cache, value_cache), None, scale))
            else:
                k = self._decode_keys("key", key_cache, head_major=True)  # [KVH, B, L, D]
                v = self._decode_keys("value", value_cache, head_major=True)
                parts.append(self._decode_attention(q, k, v, scale))
        for p in self.prefills:
            q = query[:, :, p.offset : p.offset + p.length]
            if p.history_blocks is None:
                k = key[:, :, p.offset : p.offset + p.length]
                v = value[:, :, p.offset : p.offset + p.length]
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                k = self._gather("key", key_cache, p.history_blocks, head_major=True).unsqueeze(0)
                v = self._gather("value", value_cache, p.history_blocks, head_major=True).unsqueeze(0)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, scale=scale, enable_gqa=gqa)
            parts.append(out[0])
        return self._join(parts)

    # ------------------------------------------------------------------ MLA
    def attend_latent(
        self,
        layer_idx: int,
        attn: Any,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_latent: torch.Tensor,
        k_pe: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q_nope [1, H, T, nope], q_pe [1, H, T, rope], kv_latent [1, T, r], k_pe [1, 1, T, rope] -> [1, H, T, v]."""
        latent_cache = self.cache.latent[layer_idx]
        rank = attn.kv_lora_rank
        entry = torch.cat((kv_latent[0], k_pe[0, 0]), dim=-1)  # [T, r + rope]
        latent_cache.index_copy_(0, self.slot_mapping, entry.to(latent_cache.dtype))
        parts = []
        if self.num_decode:
            heads, nope = attn.num_heads, attn.qk_nope_head_dim
            weight = attn.kv_b_proj.weight.view(heads, nope + attn.v_head_dim, rank)
            w_key, w_value = weight[:, :nope], weight[:, nope:]  # [H, nope, r], [H, v, r]
            b = self.num_decode
            q_latent = torch.bmm(q_nope[0, :, :b], w_key)  # [H, B, r]: absorbed into latent space
            q = torch.cat((q_latent, q_pe[0, :, :b]), dim=-1)  # [H, B, r + rope]
            if self.decode_seqs is not None:
                out = self._decode_loop(q, (latent_cache,), rank, scale)  # [H, B, r]
            else:
                rows = self._decode_keys("latent", latent_cache, head_major=False)[None]  # [1, B, L, E]
                out = self._decode_attention(q, rows, rows[..., :rank], scale)  # [H, B, r]
            parts.append(torch.bmm(out, w_value.transpose(1, 2)))  # [H, B, v]
        query = torch.cat((q_nope, q_pe), dim=-1) if self.prefills else None
        for p in self.prefills:
            assert query is not None
            q = query[:, :, p.offset : p.offset + p.length]
            if p.history_blocks is None:
                key, value = attn.expand_kv(
                    kv_latent[:, p.offset : p.offset + p.length], k_pe[:, :, p.offset : p.offset + p.length]
                )
                out = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale)
            else:
                rows = self._gather("latent", latent_cache, p.history_blocks, head_major=False).unsqueeze(0)
                key, value = attn.expand_kv(rows[..., :rank], rows[..., rank:].unsqueeze(1))
                out = F.scaled_dot_product_attention(q, key, value, attn_mask=p.mask, scale=scale)
            parts.append(out[0])
        return self._join(parts)


@dataclass
class PreparedBatch:
    """Inputs of one forward pass, built from a step's chunks."""

    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    attention: PagedAttention
    sample_index: torch.Tensor  # flat positions whose logits are needed


class ModelRunner:
    """Runs the model for a step's chunks and returns the logits of the sequences that sample."""

    def __init__(self, model: Transformer, cache: KVCache, decode_backend: str = "auto") -> None:
        if decode_backend not in ("auto", "sdpa", "matmul"):
            raise ValueError(f"decode_backend: must be 'auto', 'sdpa' or 'matmul', got {decode_backend!r}")
        self.model = model
        self.cache = cache
        self.device = cache.device
        # Decode attention: "sdpa" (CUDA default) or "matmul" (grouped torch matmuls); "auto" on CPU is the
        # grouped matmuls for batches of short contexts and the native kernel for per-sequence decodes.
        self.decode_backend = decode_backend
        self.static: StaticDecode | None = None  # fixed-shape decode steps (CUDA graphs), when enabled
        self.workspace = Workspace(self.device) if self.device.type == "cpu" else None
        self.packed: PackedLinears | None = None  # packed linears and routed experts (CPU), when enabled

    def enable_cpu_prepack(self, background: bool = False) -> int:
        """Route the model's float32/bfloat16 linears (and MoE routed experts) to packed weights during engine
        passes (packed in a daemon thread when `background`); returns the number of linears."""
        self.packed = PackedLinears(self.model, background=background)
        return self.packed.num_packed

    def enable_static_decode(
        self, scratch_block: int, max_batch: int, max_model_len: int, capture: bool
    ) -> None:
        """Run decode-only steps through StaticDecode (CUDA graphs when `capture`)."""
        self.static = StaticDecode(
            self.model, self.cache, scratch_block, max_batch, max_model_len, self.decode_backend, capture
        )

    def prepare(self, chunks: list[ScheduledChunk]) -> PreparedBatch | StaticDecodeInputs:
        """Flatten chunks into one row of tokens plus attention metadata (reads sequence state)."""
        if self.static is not None and self.static.fits(chunks):
            return self.static.prepare(chunks)
        ids: list[int] = []
        positions: list[int] = []
        sample_index: list[int] = []
        for c in chunks:
            ids.extend(c.seq.token_ids[c.start : c.start + c.length])
            positions.extend(range(c.start, c.start + c.length))
            if c.samples:
                sample_index.append(len(ids) - 1)
        device = self.device
        return PreparedBatch(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            positions=torch.tensor([positions], dtype=torch.long, device=device),
            attention=PagedAttention.for_chunks(self.cache, chunks, self.decode_backend, self.workspace),
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
        )

    @torch.inference_mode()
    def execute(self, batch: PreparedBatch | StaticDecodeInputs) -> torch.Tensor:
        """Forward pass; logits [num_sampling_chunks, vocab] (in chunk order)."""
        with self.packed if self.packed is not None else contextlib.nullcontext():
            if isinstance(batch, StaticDecodeInputs):
                assert self.static is not None
                return self.static.run(batch)
            hidden = self.model.hidden_states(batch.input_ids, batch.positions, cache=batch.attention)
            if batch.sample_index.numel() == 0:
                return hidden.new_empty(0, self.model.config.vocab_size)
            return self.model.lm_head(hidden[0].index_select(0, batch.sample_index))

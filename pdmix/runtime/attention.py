"""Attention over the paged KV cache, for the rows of one step (prefill rows first, then decode rows).

Every layer first writes the step's new k/v into the cache at the slot mapping, then reads each
sequence's keys back through its block table: a prefill chunk attends causally to its own tokens
plus the context cached by earlier chunks; a decode row attends to its whole cached sequence.
Each sequence is attended on its own (no padding), so a sequence's output does not depend on what
else is in the batch.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmix.runtime.kv_cache import KVCache


@dataclass
class SeqRows:
    start: int                 # first row of the sequence in the step
    length: int                # its new tokens in this step (1 for a decode row)
    context: int               # its tokens cached by earlier steps
    block_table: torch.Tensor  # int64 [blocks]


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: flat cache slot of every row
    prefill: list[SeqRows]
    decode: list[SeqRows]

    @property
    def n_prefill(self) -> int:
        return sum(c.length for c in self.prefill)


def cached_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, s: SeqRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence's first context + length keys and values, as [1, KV, L, D]."""
    total = s.context + s.length
    k = k_cache[s.block_table].flatten(0, 1)[:total]
    v = v_cache[s.block_table].flatten(0, 1)[:total]
    return k.transpose(0, 1)[None], v.transpose(0, 1)[None]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, c: SeqRows) -> torch.Tensor:
    """q [n, H, D] of one chunk -> [n, H, D]."""
    k, v = cached_kv(k_cache, v_cache, c)
    mask = None
    if c.context:  # a later chunk: row i sees the cached context and the new rows up to itself
        cols = torch.arange(k.shape[2], device=q.device)
        mask = cols[None, :] <= c.context + torch.arange(c.length, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=mask is None,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqs: list[SeqRows]) -> torch.Tensor:
    """q [B, H, D], one row per sequence -> [B, H, D], each over its cached tokens."""
    return torch.cat([F.scaled_dot_product_attention(q[i][None, :, None], *cached_kv(k_cache, v_cache, s),
                                                     enable_gqa=True)[0, :, 0][None]
                      for i, s in enumerate(seqs)])


class PagedAttention:
    """The `attn(layer, q, k, v)` callable that DecoderLayer runs, bound to one step."""

    def __init__(self, cache: KVCache, meta: StepMetadata):
        self.cache, self.meta = cache, meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.meta.slot_mapping, k, v)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        out = torch.empty_like(q)
        for c in self.meta.prefill:
            out[c.start:c.start + c.length] = prefill_attention(q[c.start:c.start + c.length], k_cache, v_cache, c)
        n = self.meta.n_prefill
        if self.meta.decode:
            out[n:] = decode_attention(q[n:], k_cache, v_cache, self.meta.decode)
        return out

"""Attention over the paged KV cache for all rows of one step: per layer, one call for each prefill
chunk and one for all decode rows (prefill rows first, then decode rows).

`StepMetadata` is built once per step from the sequences' block tables and reused by every layer:
flat cache slots of each row; for each prefill chunk the cache slots of its context and the mask of
what each query sees; for the decode rows their block tables, padded to the longest, and a mask.
Every layer writes the step's new k/v at the rows' slots, then reads keys and values through those
slots. Each row attends only to its own sequence, so its output does not depend on the batch
(attention's own part of that: float GEMMs elsewhere can round differently at another batch size).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmix.kernels import cpu_attention
from pdmix.runtime import decode_block
from pdmix.runtime.kv_cache import KVCache, Slots, blocks_needed, token_slots


@dataclass
class SeqRows:
    start: int                # first row of the sequence in the step
    length: int               # its new tokens in this step (1 for a decode row)
    context: int              # its tokens cached by earlier steps
    block_table: list[int]


@dataclass
class PrefillChunk:
    """One prompt chunk, its attention computed alone (so the same in any batch). A whole prompt (no
    cached context, the common case) attends causally over the step's own k/v (`kv_slots` None)."""
    start: int                    # first row of the chunk in the step
    length: int
    kv_slots: Slots | None        # [1, L]: cache slots of context + chunk
    mask: torch.Tensor | None     # bool [1, 1, length, L]: causal over context + chunk


@dataclass
class DecodeGroup:
    block_tables: torch.Tensor    # int64 [B, nb]: each sequence's cache blocks (padded with block 0)
    mask: torch.Tensor            # additive fp32 [B, nb, 1, 1, block]: -inf past a sequence's last token
    lengths: torch.Tensor         # int64 [B]: each sequence's cached tokens, this step's included
    first_block: int | None = None  # one sequence on consecutive blocks from here: read in place, no gather


@dataclass
class StepMetadata:
    slot_mapping: Slots           # [T]: cache slot of every row
    n_prefill: int                # rows [0, n_prefill) are prompt rows
    prefill: list[PrefillChunk]
    decode: DecodeGroup | None


def padded(rows: list[list[int]], device) -> torch.Tensor:
    """[n, longest] int64, each row padded with its first value."""
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (longest - len(r)) for r in rows], dtype=torch.long, device=device)


def prefill_chunk(c: SeqRows, block_size: int, device) -> PrefillChunk:
    if c.context == 0:
        return PrefillChunk(c.start, c.length, None, None)
    slots = torch.tensor([token_slots(c.block_table, block_size, 0, c.context + c.length)], device=device)
    q_pos = torch.arange(c.length, device=device) + c.context
    mask = torch.arange(slots.shape[1], device=device)[None, :] <= q_pos[:, None]  # [length, L] causal
    return PrefillChunk(c.start, c.length, Slots.of(slots, block_size), mask[None, None])


def decode_group(seqs: list[SeqRows], block_size: int, device) -> DecodeGroup | None:
    if not seqs:
        return None
    n_blocks = [blocks_needed(s.context + 1, block_size) for s in seqs]
    tables = padded([s.block_table[:n] for s, n in zip(seqs, n_blocks)], device)
    pos = torch.arange(tables.shape[1] * block_size, device=device)
    lengths = torch.tensor([s.context + 1 for s in seqs], device=device)
    mask = torch.zeros((len(seqs), pos.shape[0]), dtype=torch.float32, device=device)
    mask.masked_fill_(pos[None, :] >= lengths[:, None], float("-inf"))
    table = seqs[0].block_table[:n_blocks[0]]
    consecutive = len(seqs) == 1 and table == list(range(table[0], table[0] + len(table)))
    return DecodeGroup(tables, mask.view(len(seqs), -1, 1, 1, block_size), lengths,
                       table[0] if consecutive else None)


def build_metadata(slot_mapping: torch.Tensor, prefill: list[SeqRows], decode: list[SeqRows], block_size: int,
                   device) -> StepMetadata:
    return StepMetadata(Slots.of(slot_mapping, block_size), sum(c.length for c in prefill),
                        [prefill_chunk(c, block_size, device) for c in prefill], decode_group(decode, block_size, device))


def prefill_attention(q, k, v, cache: KVCache, layer: int, chunks: list[PrefillChunk]) -> torch.Tensor:
    """q/k/v [n_prefill, heads, D] -> [n_prefill, H, D], one SDPA call per chunk: padding chunks into
    one masked call would change a chunk's result with the others' lengths (SDPA tiles by length)."""
    parts = []
    for c in chunks:
        qc = q[c.start:c.start + c.length].transpose(0, 1)[None]      # [1, H, Q, D]
        if c.kv_slots is None:  # a whole prompt: causal attention over its own rows
            kc, vc = (t[c.start:c.start + c.length].transpose(0, 1)[None] for t in (k, v))
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
        else:  # [1, KV, L, D], head_dim contiguous as SDPA's fused kernel wants
            kc, vc = (t.to(q.dtype, memory_format=torch.contiguous_format) for t in cache.tokens(layer, c.kv_slots))
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, enable_gqa=True)
        parts.append(o[0].transpose(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, g: DecodeGroup,
                     new: tuple | None = None) -> torch.Tensor:
    """q [B, H, D], one row per sequence -> [B, H, D], reading each sequence's keys and values through
    its block table in one batched computation. new: (k, v [B, KV, D], their Slots), the rows to write
    into the cache first (a decode-only step: in C, one call does both).

    Written out rather than CPU SDPA (several times slower for one query row), in fp32 as SDPA
    accumulates. Everything is computed block by block, with one GEMM shape whatever the batch: scores,
    and each block's softmax numerator (its values weighted) and denominator. The blocks' sums are then
    added in block order by a sequential cumsum. The batch is padded to its longest sequence, and that
    padding is masked to -inf, so it adds exact zeros after a sequence's own blocks: its output is bit
    for bit the same alone or beside any others. (One sum over the padded length would not be: its
    reduction tree, and a GEMM's blocking of its K dimension, depend on the length.)"""
    b, h, d = q.shape
    if cpu_attention.usable(q, cache.k[layer]):  # on CPUs the same formula in C, one call per layer (each
        # sequence alone, in a fixed order: batch-invariant too; kernels/cpu_attention.py)
        return cpu_attention.decode(q, cache.k[layer], cache.v[layer], g.block_tables, g.lengths, d ** -0.5,
                                    None if new is None else (new[0], new[1], new[2].flat))
    if new is not None:
        cache.write(layer, new[2], new[0], new[1])
    if g.first_block is None:
        k, v = cache.blocks(layer, g.block_tables)           # [B, nb, KV, D, block], [B, nb, KV, block, D]
    else:
        k, v = cache.block_range(layer, g.first_block, g.block_tables.shape[1])
    kv = k.shape[2]
    scores = torch.matmul(q.float().view(b, 1, kv, h // kv, d), k.float()).mul_(d ** -0.5)  # [B, nb, KV, G, block]
    # exp of scores far below the max underflows to fp32 subnormals, which x86 computes with ~100x
    # slower microcode in the matmul that follows; e^-80 is already below any sum's resolution, so
    # the clamp changes no output bit, and the -inf mask (added after it) still gives exact zeros
    top = (scores + g.mask).amax((1, 4), keepdim=True)
    e = scores.sub_(top).clamp_(min=-80).add_(g.mask).exp_()
    num = torch.matmul(e, v.float()).cumsum(1)[:, -1]      # [B, KV, G, D]
    den = e.sum(-1).cumsum(1)[:, -1, ..., None]            # [B, KV, G, 1]
    return num.div_(den).view(b, h, d).to(q.dtype)


class PagedAttention:
    """The `attn(layer, q, k, v)` callable that DecoderLayer runs, bound to one step."""

    def __init__(self, cache: KVCache, meta: StepMetadata):
        self.cache, self.meta = cache, meta
        self.step = None  # run_decode_layer's inputs, made at its first call: False where it does not apply

    def _decode_step(self, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
        """The C calls' step inputs, made once per step; False for a step they do not take (prompt rows)."""
        if self.step is None:
            self.step = decode_block.step_inputs(self.meta, self.cache, cos, sin, head_dim) or False
        return self.step

    def run_decode_layer(self, block, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split):
        """A layer's output by its C calls (block: its runtime/decode_block.py form), or None for a step
        they do not take (prompt rows)."""
        step = self._decode_step(cos, sin, block.head_dim)
        return block(x, step, self.cache.k[layer], self.cache.v[layer], split) if step else None

    def run_decode_stack(self, stack, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split):
        """The decoder stack's output by one C call (stack: a runtime/decode_block.DecodeStack), or None
        for a step it does not take."""
        step = self._decode_step(cos, sin, stack.head_dim)
        return stack(x, step, self.cache, split) if step else None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        if not m.prefill:  # decode rows only: their write goes with their attention
            return decode_attention(q, self.cache, layer, m.decode, (k, v, m.slot_mapping))
        self.cache.write(layer, m.slot_mapping, k, v)
        n = m.n_prefill
        parts = []
        if m.prefill:
            parts.append(prefill_attention(q[:n], k[:n], v[:n], self.cache, layer, m.prefill))
        if m.decode is not None:
            parts.append(decode_attention(q[n:], self.cache, layer, m.decode))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

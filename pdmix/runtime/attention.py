"""Attention over the paged KV cache for all rows of one step: one call per layer for the prefill
chunks and one for the decode rows (prefill rows first, then decode rows).

`StepMetadata` is built once per step from the sequences' block tables and reused by every layer:
flat cache slots of each row, and for each group (prefill chunks, decode rows) the cache slots its
keys are read from, padded to the group's longest sequence, with the mask of what each query sees.
Every layer writes the step's new k/v at the rows' slots, then reads keys and values through those
slots. Each row attends only to its own sequence, so its output does not depend on the batch.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmix.runtime.kv_cache import KVCache, Slots, blocks_needed, token_slots


@dataclass
class SeqRows:
    start: int                # first row of the sequence in the step
    length: int               # its new tokens in this step (1 for a decode row)
    context: int              # its tokens cached by earlier steps
    block_table: list[int]


@dataclass
class PrefillGroup:
    """Prompt chunks. With a single chunk and no cached context (a whole prompt, the common case)
    attention runs on the step's own k/v (`kv_slots` is None)."""
    rows: torch.Tensor            # int64 [P, Q]: step row of each chunk's i-th query (padded)
    valid: torch.Tensor | None    # bool [P, Q]: real queries (None: no padding)
    kv_slots: Slots | None        # [P, L]: cache slots of context + chunk (padded)
    mask: torch.Tensor | None     # bool [P, 1, Q, L]: causal over context + chunk


@dataclass
class DecodeGroup:
    block_tables: torch.Tensor    # int64 [B, nb]: each sequence's cache blocks (padded with block 0)
    mask: torch.Tensor            # additive fp32 [B, 1, 1, nb * block]: -inf past a sequence's last token
    first_block: int | None = None  # one sequence on consecutive blocks from here: read in place, no gather


@dataclass
class StepMetadata:
    slot_mapping: Slots           # [T]: cache slot of every row
    n_prefill: int                # rows [0, n_prefill) are prompt rows
    prefill: PrefillGroup | None
    decode: DecodeGroup | None


def padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, longest] int64 (padded with the row's first value) and a bool validity mask (None if no padding)."""
    longest = max(len(r) for r in rows)
    if all(len(r) == longest for r in rows):
        return torch.tensor(rows, dtype=torch.long, device=device), None
    out = torch.tensor([r + [r[0]] * (longest - len(r)) for r in rows], dtype=torch.long, device=device)
    valid = torch.arange(longest, device=device)[None, :] < torch.tensor([len(r) for r in rows], device=device)[:, None]
    return out, valid


def prefill_group(chunks: list[SeqRows], block_size: int, device) -> PrefillGroup | None:
    if not chunks:
        return None
    rows, valid = padded([list(range(c.start, c.start + c.length)) for c in chunks], device)
    if len(chunks) == 1 and chunks[0].context == 0:
        return PrefillGroup(rows, None, None, None)
    kv_slots, kv_valid = padded([token_slots(c.block_table, block_size, 0, c.context + c.length) for c in chunks], device)
    q_pos = torch.arange(rows.shape[1], device=device)[None, :] + torch.tensor([c.context for c in chunks], device=device)[:, None]
    mask = torch.arange(kv_slots.shape[1], device=device)[None, None, :] <= q_pos[:, :, None]  # [P, Q, L] causal
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return PrefillGroup(rows, valid, Slots.of(kv_slots, block_size), mask[:, None])


def decode_group(seqs: list[SeqRows], block_size: int, device) -> DecodeGroup | None:
    if not seqs:
        return None
    n_blocks = [blocks_needed(s.context + 1, block_size) for s in seqs]
    tables, _ = padded([s.block_table[:n] for s, n in zip(seqs, n_blocks)], device)
    pos = torch.arange(tables.shape[1] * block_size, device=device)
    lengths = torch.tensor([s.context + 1 for s in seqs], device=device)
    mask = torch.zeros((len(seqs), pos.shape[0]), dtype=torch.float32, device=device)
    mask.masked_fill_(pos[None, :] >= lengths[:, None], float("-inf"))
    table = seqs[0].block_table[:n_blocks[0]]
    consecutive = len(seqs) == 1 and table == list(range(table[0], table[0] + len(table)))
    return DecodeGroup(tables, mask[:, None, None, :], table[0] if consecutive else None)


def build_metadata(slot_mapping: torch.Tensor, prefill: list[SeqRows], decode: list[SeqRows], block_size: int,
                   device) -> StepMetadata:
    return StepMetadata(Slots.of(slot_mapping, block_size), sum(c.length for c in prefill), prefill_group(prefill, block_size, device),
                        decode_group(decode, block_size, device))


def prefill_attention(q, k, v, cache: KVCache, layer: int, g: PrefillGroup) -> torch.Tensor:
    """q/k/v [n_prefill, heads, D] -> [n_prefill, H, D]."""
    if g.kv_slots is None:  # one whole prompt: causal attention over its own rows
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True, enable_gqa=True)
        return o[0].transpose(0, 1)
    qp = q[g.rows].transpose(1, 2)                                    # [P, H, Q, D]
    # [P, KV, L, D], head_dim contiguous as SDPA's fused kernel wants
    kp, vp = (t.to(q.dtype, memory_format=torch.contiguous_format) for t in cache.tokens(layer, g.kv_slots))
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=g.mask, enable_gqa=True).transpose(1, 2)  # [P, Q, H, D]
    return o.reshape(-1, *o.shape[2:]) if g.valid is None else o[g.valid]


def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, g: DecodeGroup) -> torch.Tensor:
    """q [B, H, D], one row per sequence -> [B, H, D], reading each sequence's keys and values through
    its block table in one batched computation.

    Written out rather than CPU SDPA (several times slower for one query row), in fp32 as SDPA
    accumulates. Scores come block by block (one GEMM shape whatever the batch); padding past a
    sequence's end is masked to -inf, so it adds exact zeros after the sequence's own terms in the
    value GEMM: a sequence's output is the same alone or in a batch (tested bit for bit)."""
    b, h, d = q.shape
    if g.first_block is None:
        k, v = cache.blocks(layer, g.block_tables)                         # [B, nb, KV, D, block], [B, L, KV, D]
    else:
        k, v = cache.block_range(layer, g.first_block, g.block_tables.shape[1])
    kv = k.shape[2]
    scores = torch.matmul(q.float().view(b, 1, kv, h // kv, d), k.float())  # [B, nb, KV, G, block]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(b, kv, h // kv, -1).mul_(d ** -0.5)  # [B, KV, G, L]
    # exp of scores far below the max underflows to fp32 subnormals, which x86 computes with ~100x
    # slower microcode in the matmul that follows; e^-80 is already below any sum's resolution, so
    # the clamp changes no output bit, and the -inf mask (added after it) still gives exact zeros
    top = (scores + g.mask).amax(-1, keepdim=True)
    e = scores.sub_(top).clamp_(min=-80).add_(g.mask).exp_()
    o = torch.matmul(e, v.float().transpose(1, 2)).div_(e.sum(-1, keepdim=True))  # [B, KV, G, D]
    return o.view(b, h, d).to(q.dtype)


class PagedAttention:
    """The `attn(layer, q, k, v)` callable that DecoderLayer runs, bound to one step."""

    def __init__(self, cache: KVCache, meta: StepMetadata):
        self.cache, self.meta = cache, meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        self.cache.write(layer, m.slot_mapping, k, v)
        n = m.n_prefill
        parts = []
        if m.prefill is not None:
            parts.append(prefill_attention(q[:n], k[:n], v[:n], self.cache, layer, m.prefill))
        if m.decode is not None:
            parts.append(decode_attention(q[n:], self.cache, layer, m.decode))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

"""Decode attention over the paged KV cache, and the cache write, in C (csrc/attention.c) for CPUs:
one call per layer where torch needs about fifteen small ops (gathers, two batched GEMMs, masking,
softmax pieces). Each sequence is computed alone in a fixed order, so its output does not depend on
the batch. Where the library is missing, the tensors are on another device, or the model dtype is
neither bf16 nor fp32, `usable` is False and pdmix/runtime/attention.py runs its torch form.
"""

import torch

from pdmix.kernels.clib import library

IO_DTYPES = (torch.bfloat16, torch.float32)  # of q, k, v and the output, and of the cache


def usable(x: torch.Tensor, cache_k: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in IO_DTYPES and cache_k.dtype in IO_DTYPES
            and library()[0] is not None)


def decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
           lengths: torch.Tensor, scale: float, new: tuple | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: each row attends to the first lengths[b] tokens of its blocks
    (block_tables int64 [B, nb]); cache_k [blocks, KV, D, block], cache_v [blocks, KV, block, D], both
    fp32 or both bf16 (read as fp32). new: (k, v [B, KV, D] in q's dtype, slots int64 [B]), the step's
    rows, written into the cache first in the same call (as kv_write writes them)."""
    q = q.contiguous()
    b, h, d = q.shape
    _, kv, _, block = cache_k.shape
    out = torch.empty_like(q)
    written = (None, None, 0, 0, None)
    if new is not None:
        (k, k_row), (v, v_row) = rows(new[0].to(q.dtype)), rows(new[1].to(q.dtype))
        written = (k.data_ptr(), v.data_ptr(), k_row, v_row, new[2].data_ptr())
    if b and library()[0].pdmix_decode_attention(
            q.data_ptr(), q.dtype == torch.bfloat16, b, h, kv, d, cache_k.data_ptr(), cache_v.data_ptr(),
            cache_k.dtype == torch.bfloat16, block,
            block_tables.data_ptr(), block_tables.shape[1], lengths.data_ptr(), scale, out.data_ptr(),
            torch.get_num_threads(), *written):
        raise MemoryError("decode attention: no memory for its scratch rows")
    return out


def rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t [T, KV, D] with each row's [KV, D] contiguous, and its row stride (a view of a fused q/k/v
    output keeps its stride, no copy)."""
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        t = t.contiguous()
    return t, t.stride(0)


def kv_write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache_k: torch.Tensor,
             cache_v: torch.Tensor) -> None:
    """Store k, v [T, KV, D] (one dtype, bf16 or fp32) at cache slots [T] int64."""
    (k, k_row), (v, v_row) = rows(k), rows(v.to(k.dtype))
    t, kv, d = k.shape
    library()[0].pdmix_kv_write(k.data_ptr(), v.data_ptr(), k.dtype == torch.bfloat16, k_row, v_row, t, kv, d,
                                slots.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(),
                                cache_k.dtype == torch.bfloat16, cache_k.shape[-1])

"""The paged KV cache: fixed-size blocks handed out by an allocator; no per-sequence buffers."""

import torch

from pdmix.errors import PdmixError


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise PdmixError(f"KV cache: {n} blocks wanted, {len(self.free_blocks)} free")
        return [self.free_blocks.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))


def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU, where attention computes in fp32: the model's bf16/fp16 k/v are exact in it and
    each step then reads the cache with no conversion (a per-layer copy that cost more than the math).
    The model dtype elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else model_dtype


class KVCache:
    """Per layer, keys stored transposed as [kv_heads, head_dim, slots] and values as [slots, kv_heads,
    head_dim], slot = block * block_size + offset. Keys transposed so that gathering a sequence's
    blocks yields the [head_dim, tokens] matrix that decode attention multiplies by, contiguous in the
    token dimension: the same GEMM alone or in a batch (a strided operand broke batch invariance)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        slots = num_blocks * block_size
        # zeros, not empty: decode attention reads whole blocks and masks the unwritten tail, which must
        # hold finite values (0 * NaN would leak into the output)
        self.k = [torch.zeros((kv_heads, head_dim, slots), dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros((slots, kv_heads, head_dim), dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the k/v rows [T, kv_heads, head_dim] of a step at their slots."""
        self.k[layer].index_copy_(2, slot_mapping, k.permute(1, 2, 0).to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slot_mapping, v.to(self.v[layer].dtype))

    def blocks(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks of each sequence, block_tables [B, nb] -> keys [B, KV, D, nb * block] (a strided
        view, contiguous along tokens) and values [B, nb * block, KV, D]."""
        kv, d, _ = self.k[layer].shape
        k = self.k[layer].view(kv, d, -1, self.block_size)[:, :, block_tables]   # [KV, D, B, nb, block]
        v = self.v[layer].view(-1, self.block_size, kv, d)[block_tables]          # [B, nb, block, KV, D]
        b = block_tables.shape[0]
        return k.view(kv, d, b, -1).permute(2, 0, 1, 3), v.view(b, -1, kv, d)

    def block_range(self, layer: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As blocks() for one sequence on blocks first .. first + n - 1: views, no copy."""
        start, stop = first * self.block_size, (first + n) * self.block_size
        return self.k[layer][None, :, :, start:stop], self.v[layer][None, start:stop]

    def tokens(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at slots [P, L], both as [P, KV, L, D]."""
        return self.k[layer][:, :, slots].permute(2, 0, 3, 1), self.v[layer][slots].transpose(1, 2)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def token_slots(block_table: list[int], block_size: int, start: int, stop: int) -> list[int]:
    """Cache slots of a sequence's tokens [start, stop), through its block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]

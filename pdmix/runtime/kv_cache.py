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


class KVCache:
    """Per layer, k and v shaped [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # zeros, not empty: decode attention reads whole blocks and masks the unwritten tail, which must
        # hold finite values (0 * NaN would leak into the output)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store the k/v rows [T, kv_heads, head_dim] of a step at their flat slots (block * block_size + offset);
        returns the layer's cache as flat [slots, kv_heads, head_dim] views."""
        k_flat, v_flat = self.k[layer].view(-1, *k.shape[1:]), self.v[layer].view(-1, *v.shape[1:])
        k_flat.index_copy_(0, slot_mapping, k)
        v_flat.index_copy_(0, slot_mapping, v)
        return k_flat, v_flat


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)

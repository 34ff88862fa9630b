"""The paged KV cache: fixed-size blocks handed out by an allocator; no per-sequence buffers."""

from dataclasses import dataclass

import torch

from pdmix.errors import PdmixError
from pdmix.kernels import arena, cpu_attention


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
    """On CPU, bf16 for bf16 models where pdmix's C attention reads the cache (kernels/cpu_attention.py:
    each value widened to fp32 as it is read, the math in fp32): the model's k/v are bf16 already, so
    the outputs are the fp32 cache's bit for bit, with half the bytes to store and to read per decode
    step. Otherwise fp32 on CPU, where the torch form computes in fp32 and would convert a bf16 cache
    with a per-layer copy that cost more than the math. The model dtype elsewhere."""
    if torch.device(device).type != "cpu":
        return model_dtype
    return torch.bfloat16 if model_dtype == torch.bfloat16 and cpu_attention.library()[0] is not None else torch.float32


class KVCache:
    """Per layer, keys stored block by block as [num_blocks, kv_heads, head_dim, block_size] (each
    block's keys transposed) and values as [num_blocks, kv_heads, block_size, head_dim]; slot = block *
    block_size + offset. Gathering a batch's blocks gives keys [B, n_blocks, kv_heads, head_dim, block_size]
    and values [B, n_blocks, kv_heads, block_size, head_dim]: the batch, block and head dimensions
    collapse into one GEMM batch with no re-layout (a [kv_heads, head_dim, slots] layout needed a 17 MB
    transposing copy per layer at batch 16), and each block's GEMMs have the same shape alone or in a
    batch, so a sequence's scores and per-block value sums do not depend on the batch."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        k_shape, v_shape = (num_blocks, kv_heads, head_dim, block_size), (num_blocks, kv_heads, block_size, head_dim)
        # zeros, not empty: decode attention reads whole blocks and masks the unwritten tail, which must
        # hold finite values (0 * NaN would leak into the output). On CPU in one huge-page block, as the weights.
        if torch.device(device).type == "cpu":
            with arena.opened(arena.bytes_for([(dtype, k_shape), (dtype, v_shape)] * num_layers)):
                self.k = [arena.empty(k_shape, dtype).zero_() for _ in range(num_layers)]
                self.v = [arena.empty(v_shape, dtype).zero_() for _ in range(num_layers)]
        else:
            self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def write(self, layer: int, slots: "Slots", k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the k/v rows [T, kv_heads, head_dim] of a step at their slots [T]."""
        if cpu_attention.usable(k, self.k[layer]):
            cpu_attention.kv_write(k, v, slots.flat, self.k[layer], self.v[layer])
            return
        self.k[layer][slots.block, :, :, slots.offset] = k.to(self.k[layer].dtype)
        self.v[layer][slots.block, :, slots.offset] = v.to(self.v[layer].dtype)

    def blocks(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks of each sequence, block_tables [B, nb] -> keys [B, nb, KV, D, block] and values
        [B, nb, KV, block, D]."""
        return self.k[layer][block_tables], self.v[layer][block_tables]

    def block_range(self, layer: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As blocks() for one sequence on blocks first .. first + n - 1: views, no copy."""
        return self.k[layer][None, first:first + n], self.v[layer][None, first:first + n]

    def tokens(self, layer: int, slots: "Slots") -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at slots [P, L], both as [P, KV, L, D]."""
        return (self.k[layer][slots.block, :, :, slots.offset].transpose(1, 2),
                self.v[layer][slots.block, :, slots.offset].transpose(1, 2))


@dataclass(frozen=True)
class Slots:
    """Cache slots (any shape) with their blocks and offsets, computed once per step rather than per
    layer."""
    flat: torch.Tensor
    block: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def of(cls, flat: torch.Tensor, block_size: int) -> "Slots":
        return cls(flat, torch.div(flat, block_size, rounding_mode="floor"), flat % block_size)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def token_slots(block_table: list[int], block_size: int, start: int, stop: int) -> list[int]:
    """Cache slots of a sequence's tokens [start, stop), through its block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]

"""The runtime keeps memory a step frees for the next step, rather than page-faulting it back in."""

import resource

import pytest
import torch

from pdmix.kernels import arena
from pdmix.runtime.memory import keep_freed_memory


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_freed_step_sized_block_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("needs glibc malloc")
    size = 17 << 20  # the gathered keys of one layer: Qwen3-0.6B, batch 16, 256 tokens, fp32
    for _ in range(2):
        torch.empty(size, dtype=torch.uint8).fill_(1)
    before = minor_faults()
    for _ in range(10):
        torch.empty(size, dtype=torch.uint8).fill_(1)
    assert minor_faults() - before < 1000  # one block is 4352 pages: re-faulting it even once shows


def test_the_arena_hands_out_aligned_slices_in_order_and_steps_aside_when_full():
    assert arena.bytes_for([(torch.bfloat16, [3, 5]), (torch.int32, [7])]) >= 64 + 7 * 4
    with arena.opened(64 + 7 * 4) as a:  # x's 30 bytes, y from the next line on
        x = arena.empty((3, 5), torch.bfloat16)
        y = arena.place(torch.arange(7, dtype=torch.int32))
        assert x.shape == (3, 5) and x.dtype == torch.bfloat16
        assert torch.equal(y, torch.arange(7, dtype=torch.int32))
        assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() == a.buffer.data_ptr()
        assert x.data_ptr() % arena.HUGE_PAGE == 0  # the first slice opens the arena's first huge page
        assert y.data_ptr() % arena.ALIGN == 0 and y.data_ptr() >= x.data_ptr() + 30
        full = torch.ones(1, dtype=torch.uint8)
        assert arena.place(full) is full  # no room left: the tensor itself
        assert arena.empty((2,), torch.float32).untyped_storage().data_ptr() != a.buffer.data_ptr()
    alone = torch.ones(3)
    assert arena.place(alone) is alone  # none open


def test_an_arena_the_system_refuses_hands_out_nothing():
    ones = torch.ones(3)
    with arena.opened(1 << 62) as a:  # 4 EiB of address space: refused, so tensors go where torch puts them
        assert a.buffer is None
        assert arena.place(ones) is ones
        assert arena.empty((2,), torch.int8).shape == (2,)

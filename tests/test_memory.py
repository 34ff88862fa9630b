"""The runtime keeps memory a step frees for the next step, rather than page-faulting it back in."""

import resource

import pytest
import torch

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

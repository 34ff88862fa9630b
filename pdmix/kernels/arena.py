"""One block of memory for the runtime's long-lived CPU tensors (weights, the KV cache): each tensor
64-byte aligned, the block backed by 2 MiB pages where the kernel allows it.

A decode step streams every weight once, so how the weights lie in memory sets its speed:
- safetensors hands out tensors at any byte offset (SmolLM2's lm_head started 16 bytes into a cache
  line), so every 64-byte load of the C GEMMs straddled two lines: its GEMV ran at 2.2 ms aligned and
  3.4 ms as loaded;
- with 4 KiB pages, streaming 170 MB a step walks 43,000 of them; one block madvised for huge pages
  (MADV_HUGEPAGE: Linux's transparent huge pages in their default `madvise` mode) walks 85.
On SmolLM2 one-thread decode that was 16.2 -> 15.0 ms a step for alignment and -> 13.3 ms with huge
pages (docs/performance.md §7e). llama.cpp holds its weights in one buffer for the same reasons.

The loader opens an arena sized by the checkpoint (`opened`); the vLLM plugin, which prepares its
layers one by one, puts its packed weights in `Chunks`. While one is open, `empty` and `place` hand out
slices of it, in order. Outside one, or once it is full, they fall back to torch.empty and
to the tensor itself, so nothing depends on it being open. Pages no tensor reached are never touched,
so an arena sized by an upper bound costs address space, not memory.
"""

import contextlib
import ctypes
import ctypes.util
import math
import sys

import torch

ALIGN = 64          # bytes: a cache line, and a multiple of every dtype's size
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back [address, address + nbytes) with huge pages (address 2 MiB aligned)."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class Arena:
    """A bump allocator over one uint8 tensor, its usable part starting on a 2 MiB boundary."""

    def __init__(self, nbytes: int):
        try:
            self.buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is faulted in yet
        except RuntimeError:  # more address space than the system grants at once: every tensor goes elsewhere
            self.buffer, self.used, self.end, self.huge_pages = None, 0, 0, False
            return
        self.used = -self.buffer.data_ptr() % HUGE_PAGE
        self.end = self.used + nbytes
        self.huge_pages = advise_huge_pages(self.buffer.data_ptr() + self.used, nbytes)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialized [shape] tensor in the arena, or None when it does not fit."""
        start = self.used + -self.used % ALIGN
        stop = start + math.prod(shape) * dtype.itemsize
        if stop > self.end:
            return None
        self.used = stop
        return self.buffer[start:stop].view(dtype).view(shape)


class Chunks:
    """Arenas of `chunk` bytes (or one tensor's size, if larger) opened one after another as each fills:
    for a loader that cannot size one arena up front (vLLM's, which prepares its layers one by one). The
    unused tail of a chunk is never touched."""

    def __init__(self, chunk: int = 64 << 20):
        self.chunk, self.current = chunk, None

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = None if self.current is None else self.current.empty(shape, dtype)
        if t is None:
            self.current = Arena(max(self.chunk, math.prod(shape) * dtype.itemsize))
            t = self.current.empty(shape, dtype)
        return t


_open: list = []  # Arena or Chunks


@contextlib.contextmanager
def using(arena: "Arena | Chunks"):
    """Tensors from empty() and place() go into this arena until the block ends."""
    _open.append(arena)
    try:
        yield arena
    finally:
        _open.pop()


def opened(nbytes: int):
    """using() a new arena of nbytes."""
    return using(Arena(nbytes))


def bytes_for(tensors: list[tuple[torch.dtype, list[int]]]) -> int:
    """An arena size that holds these tensors (dtype, shape), each aligned."""
    return sum(math.prod(shape) * dtype.itemsize + ALIGN for dtype, shape in tensors)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on the CPU, in the open arena if there is one and it has room."""
    t = _open[-1].empty(shape, dtype) if _open else None
    return torch.empty(shape, dtype=dtype) if t is None else t


def place(t: torch.Tensor) -> torch.Tensor:
    """t copied into the open arena (a CPU tensor, contiguous); t itself when none is open, it is full, or
    t lives on another device."""
    if not _open or t.device.type != "cpu":
        return t
    slot = _open[-1].empty(t.shape, t.dtype)
    return t if slot is None else slot.copy_(t)


def place_parameters(module: torch.nn.Module) -> None:
    """Every parameter of module (and its children) moved into the open arena."""
    for p in module.parameters():
        p.data = place(p.data)

"""Quantization and epilogues as single compiled kernels, for the CPU backends.

They are chains of elementwise ops; from COMPILE_MIN_ELEMENTS elements on each runs as one
torch.compile'd kernel (bit-identical to eager, 3-8x faster at prefill sizes; below that the
compiled call's overhead outweighs the fusion). PDMIX_COMPILE=0 turns this off; a compiler failure
falls back to eager once, with a warning.
"""

import functools
import os
import sys

import torch

COMPILE_MIN_ELEMENTS = 1 << 15
_compile = {"enabled": os.environ.get("PDMIX_COMPILE", "1") != "0"}


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def fused(fn, *args):
    """fn(*args), as one compiled kernel when the tensor is large enough to gain from it."""
    if _compile["enabled"] and args[0].numel() >= COMPILE_MIN_ELEMENTS:
        try:
            return _compiled(fn)(*args)
        except Exception as e:  # no C++ compiler, an unsupported platform: stay correct, just slower
            _compile["enabled"] = False
            print(f"pdmix: warning: torch.compile unavailable ({e.__class__.__name__}); quantization and epilogues run eager",
                  file=sys.stderr)
    return fn(*args)

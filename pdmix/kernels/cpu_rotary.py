"""Rotary position embedding on CPU in C (csrc/rotary.c), in place: one call where
pdmix/models/layers.py's apply_rotary runs seven torch ops (a SmolLM2 decode step's 30 took 0.55 of
its 12 ms). The same bits as apply_rotary: every product and sum rounded as torch's ops round them.
"""

import torch

from pdmix.kernels.clib import library


def usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x [T, heads, D] with each row's heads contiguous (a view of a fused q/k/v output is), cos and sin
    [T, D] of its dtype, bf16 or fp32, on the CPU; and the C library built."""
    if torch.compiler.is_compiling():  # a graph keeps apply_rotary's ops (an in-place op would need declaring)
        return False
    return (x.is_cpu and x.dtype == cos.dtype and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 3
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] % 2 == 0 and library()[0] is not None)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(x, cos, sin), written into x (see usable); returns x."""
    t, heads, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if t:
        library()[0].pdmix_rotary(x.data_ptr(), x.dtype == torch.bfloat16, t, heads, d, x.stride(0), cos.data_ptr(),
                                  sin.data_ptr(), torch.get_num_threads())
    return x

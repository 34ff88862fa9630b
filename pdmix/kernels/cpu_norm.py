"""The runtime's RMSNorm on CPU in C (csrc/norm.c): one call per norm instead of about ten torch ops
(a decode step's norms took 2.2 of its 18 ms that way on SmolLM2). Every step rounds as torch's ops
do; the sum of squares is in the C file's own fixed order, so a row's result depends on neither the
CPU's ISA, nor the other rows, nor the thread count. The quantization pipeline keeps torch's ops, as
msModelSlim's calibration forward computes them.
"""

import torch

from pdmix.kernels.clib import library


def available() -> bool:
    return library()[0] is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """For these tensors, once available() (asked at load: a compiled graph cannot ask it)."""
    return x.is_cpu and weight.is_cpu and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., k] (bf16 or fp32, as weight [k]; see usable) with an fp32 bias [k] or None."""
    k = x.shape[-1]
    # the runtime's rows come flat and contiguous, with a contiguous weight and an fp32 bias: a decode
    # step's 60 calls on SmolLM2 then skip the reshapes and conversions (12 -> 7 us a call)
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    y = torch.empty_like(x2)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if x2.shape[0]:
        library()[0].pdmix_rms_norm(x2.data_ptr(), x.dtype == torch.bfloat16, x2.shape[0], k, weight.data_ptr(),
                                    None if bias is None else bias.data_ptr(), eps, y.data_ptr(),
                                    torch.get_num_threads())
    return y if x2 is x else y.reshape(x.shape)


@torch.library.custom_op("pdmix::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """rms_norm as one opaque op of a compiled graph."""
    return rms_norm(x, weight, bias, eps)


@rms_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)

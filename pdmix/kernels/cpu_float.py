"""The float linear of bf16 models on CPU in C (csrc/bf16gemm.c): each output summed in fp32 in one
order fixed by k alone, so a row's result does not depend on the other rows of the step (torch's
bf16 GEMM changes kernels with the row count on CPUs with AVX-512 BF16), and the weight streamed
once per decode step near the read bandwidth (torch: about a third of it). Used by the runtime's
float layers and the float lm_head; the quantization pipeline keeps torch's F.linear, as
msModelSlim's calibration forward computes it.
"""

import torch

from pdmix.kernels.clib import library


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.is_contiguous() and library()[0] is not None)


def isa() -> str | None:
    lib = library()[0]
    return None if lib is None else {3: "avx512_bf16", 2: "avx2", 1: "plain"}[lib.pdmix_bf16gemm_isa()]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 x [..., k], weight [n, k] (contiguous: see usable) and bias [n]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    n = weight.shape[0]
    y = torch.empty((x2.shape[0], n), dtype=torch.bfloat16)
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    if x2.shape[0]:
        library()[0].pdmix_bf16_linear(x2.data_ptr(), x2.shape[0], weight.data_ptr(), n, k,
                                       None if bias is None else bias.data_ptr(), y.data_ptr(),
                                       torch.get_num_threads())
    return y.reshape(*lead, n)

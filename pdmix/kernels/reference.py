"""SPEC §5 in plain torch: the two activation-quantization paths of a W8A8_MIX linear.

Weights are given as `weight_t`, the [k, n] transpose view of the stored [n, k] int8 weight
(column-major, the layout int8 GEMMs want). Accumulation is exact int32. A linear is
quantize -> int8_matmul -> epilogue; the pieces are separate so that tensor parallelism can
all-reduce between them.
"""

import torch

TINY = torch.finfo(torch.float32).tiny


def int8_matmul(x_q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """[m,k] int8 @ [k,n] int8 -> [m,n] int32, exact."""
    m = x_q.shape[0]
    if m == 0:
        return torch.zeros((0, weight_t.shape[1]), dtype=torch.int32, device=x_q.device)
    if x_q.is_cuda and m <= 16:  # cuBLASLt's int8 GEMM in torch._int_mm needs more than 16 rows
        return torch._int_mm(torch.nn.functional.pad(x_q, (0, 0, 0, 17 - m)), weight_t)[:m]
    return torch._int_mm(x_q, weight_t)


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """Per-tensor asymmetric: clamp(round(x / input_scale + input_offset), -128, 127) as int8."""
    q = torch.round(x.to(torch.float32) / input_scale.to(torch.float32) + input_offset.to(torch.float32))
    return q.clamp(-128, 127).to(torch.int8)


def quantize_dynamic(x: torch.Tensor, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: (x_q int8 [m,k], s_t fp32 [m,1]) with s_t = max_k|x_t| / 127.

    reduce_max: under tensor parallelism, the all-reduce that makes the row max global.
    """
    x32 = x.to(torch.float32)
    s = x32.abs().amax(dim=-1, keepdim=True) / 127
    if reduce_max is not None:
        s = reduce_max(s)
    s = s.clamp(min=TINY)
    return torch.round(x32 / s).clamp(-127, 127).to(torch.int8), s


def epilogue_dynamic(acc, s, weight_scale_row, bias_float, out_dtype):
    """acc * s_t * weight_scale^T + bias_float (fp32 math, one rounding to out_dtype)."""
    y = acc.to(torch.float32) * s * weight_scale_row
    if bias_float is not None:
        y = y + bias_float
    return y.to(out_dtype)


def epilogue_static(acc, deq_scale, quant_bias, out_dtype):
    """deq_scale * (acc + quant_bias)."""
    return (deq_scale * (acc + quant_bias).to(torch.float32)).to(out_dtype)


def linear_static(x, weight_t, input_scale, input_offset, deq_scale, quant_bias, out_dtype):
    """Decode path: y = deq_scale * (x_q @ W^T + quant_bias)."""
    acc = int8_matmul(quantize_static(x, input_scale, input_offset), weight_t)
    return epilogue_static(acc, deq_scale, quant_bias, out_dtype)


def linear_dynamic(x, weight_t, weight_scale_row, bias_float, out_dtype):
    """Prefill path: y = (x_q @ W^T) * s_t * weight_scale^T + bias_float.

    weight_scale_row: fp32 [n]; bias_float: fp32 [n] recovered from quant_bias (SPEC §5) or None.
    """
    x_q, s = quantize_dynamic(x)
    return epilogue_dynamic(int8_matmul(x_q, weight_t), s, weight_scale_row, bias_float, out_dtype)


def weight_row_sums(weight: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """sum_k(weight) per output row, exact, as fp32 [n]. In row chunks: a whole-tensor sum with an
    int dtype would first materialize a widened copy of the weight."""
    return torch.cat([c.to(torch.int32).sum(dim=1) for c in weight.split(rows_per_chunk)]).to(torch.float32)


def recover_bias(deq_scale: torch.Tensor, quant_bias: torch.Tensor, input_offset: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """bias_float = deq_scale * (quant_bias + input_offset * sum_k(weight)), fp32 [n]."""
    wsum = weight_row_sums(weight)
    return deq_scale.to(torch.float32) * (quant_bias.to(torch.float32) + input_offset.to(torch.float32) * wsum)

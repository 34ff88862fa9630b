"""SPEC §5 in plain torch: the oracle of the tests, and the backend for what no faster one runs
(row-parallel layers under tensor parallelism, whose exact int32 accumulators are all-reduced).

Weights are used as `weight_t`, the [k, n] transpose view of the stored [n, k] int8 weight
(column-major, the layout int8 GEMMs want). Accumulation is exact int32. A linear is
quantize -> int8_matmul -> epilogue; the pieces are separate so that tensor parallelism can
all-reduce between them.
"""

import torch

from pdmix.schemes.w8a8_mix import TINY, W8A8Params


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


def dynamic_scale(x: torch.Tensor, reduce_max=None) -> torch.Tensor:
    """Per-token symmetric scale s_t = max_k|x_t| / 127, fp32 [m, 1].

    reduce_max: under tensor parallelism, the all-reduce that makes the row max global."""
    s = x.to(torch.float32).abs().amax(dim=-1, keepdim=True) / 127
    if reduce_max is not None:
        s = reduce_max(s)
    return s.clamp(min=TINY)


def quantize_dynamic(x: torch.Tensor, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: (x_q int8 [m,k], s_t fp32 [m,1])."""
    s = dynamic_scale(x, reduce_max)
    return torch.round(x.to(torch.float32) / s).clamp(-127, 127).to(torch.int8), s


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


def layer_unsupported(device: torch.device, row_parallel: bool, device_type: str) -> str | None:
    """What keeps a layer from a backend that runs on one device type: another device, or a
    row-parallel shard (its exact int32 accumulators are all-reduced in the reference kernel)."""
    if device.type != device_type:
        return f"runs on {device_type.upper()} only"
    if row_parallel:
        return "a row-parallel shard all-reduces its int32 accumulators in the reference kernel"
    return None


class ReferenceKernel:
    """Both paths of a W8A8_MIX linear in one GEMM per step: rows [0, n_dynamic) dynamic, the rest static.

    reduce/reduce_max: a row-parallel shard's all-reduces (sum of int32 accumulators, max of the
    per-token absmax), so N ranks compute bit for bit what one process computes."""

    name = "reference"

    @staticmethod
    def unsupported(device: torch.device, row_parallel: bool) -> str | None:
        return None

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype, reduce=None, reduce_max=None):
        self.params, self.out_dtype = p, out_dtype
        self.weight_t = p.weight.t()
        self.reduce, self.reduce_max = reduce, reduce_max

    def matmul(self, x_q: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x_q, self.weight_t)

    def accumulate(self, x: torch.Tensor, n_dynamic: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact int32 accumulators [m, n] of both row sets, the dynamic rows' scales)."""
        p = self.params
        q_dyn, s = quantize_dynamic(x[:n_dynamic], self.reduce_max)
        q_sta = quantize_static(x[n_dynamic:], p.input_scale, p.input_offset)
        q = q_dyn if n_dynamic == x.shape[0] else q_sta if n_dynamic == 0 else torch.cat([q_dyn, q_sta])
        acc = self.matmul(q)
        return (acc if self.reduce is None else self.reduce(acc)), s

    def apply(self, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        """x [m, k] -> [m, n] in out_dtype."""
        p = self.params
        acc, s = self.accumulate(x, n_dynamic)
        y_dyn = epilogue_dynamic(acc[:n_dynamic], s, p.weight_scale, p.bias_float, self.out_dtype)
        y_sta = epilogue_static(acc[n_dynamic:], p.deq_scale, p.quant_bias, self.out_dtype)
        return y_dyn if n_dynamic == x.shape[0] else y_sta if n_dynamic == 0 else torch.cat([y_dyn, y_sta])

"""W8A8_MIX on x86 CPUs with oneDNN's prepacked int8 GEMM, through PyTorch's own ops
(`torch.ops.onednn.qlinear_prepack` / `qlinear_pointwise`, the kernel behind PyTorch's x86
Inductor quantization).

The weight is prepacked once into oneDNN's blocked layout. oneDNN takes a uint8 activation with a
per-tensor zero point, which both SPEC §5 paths map onto exactly:
- static (decode) rows: x_u8 = x_q + 128 with zero point input_offset + 128; the GEMM's weight
  scale is deq_scale / input_scale, so its scale product is the bf16-rounded deq_scale of the
  file, and the bias is the recovered bias_float = deq_scale * (quant_bias + input_offset * sum_k W),
  i.e. y = deq_scale * (acc + quant_bias) with oneDNN's fp32 epilogue, one rounding to bf16;
- dynamic (prefill) rows: x_u8 = round(x / s_t) + 128 with zero point 128 and x scale 1, weight
  scale weight_scale, fp32 out; the per-token s_t and bias_float follow in one fused torch op
  (oneDNN takes one activation scale per call).
The int32 accumulation is exact (VNNI), so outputs differ from the reference only by fp32
rounding order in the epilogue.
"""

import torch

from pdmix.kernels.reference import dynamic_scale
from pdmix.schemes import w8a8_mix
from pdmix.schemes.w8a8_mix import W8A8Params

U8_SHIFT = 128  # int8 value + 128 = uint8 value


def available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


def _gemm(x_u8, x_scale: float, x_zp: int, packed, w_scale, w_zp, bias, out_dtype):
    return torch.ops.onednn.qlinear_pointwise(x_u8, x_scale, x_zp, packed, w_scale, w_zp, bias, 1.0, 0, out_dtype,
                                              "none", [], "")


class OneDNNKernel:
    name = "onednn"

    @staticmethod
    def unsupported(device: torch.device, row_parallel: bool) -> str | None:
        if device.type != "cpu":
            return "runs on CPU only"
        if row_parallel:
            return "a row-parallel shard all-reduces exact int32 accumulators, which the fused epilogue hides"
        if not available():
            return "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
        return None

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype, reduce=None, reduce_max=None):
        assert reduce is None and reduce_max is None
        self.out_dtype = out_dtype
        self.packed = torch.ops.onednn.qlinear_prepack(p.weight, None)
        self.w_zp = torch.zeros(p.out_features, dtype=torch.int64)
        self.weight_scale = p.weight_scale.contiguous()
        self.bias_float = p.bias_float.contiguous()
        self.input_scale = p.input_scale.clone()
        self.static_zp = int(p.input_offset) + U8_SHIFT
        self.static_x_scale = float(p.input_scale)
        self.static_w_scale = w8a8_mix.static_weight_scale(p)

    def static(self, x: torch.Tensor) -> torch.Tensor:
        q = (x.to(torch.float32) / self.input_scale).add_(self.static_zp).round_().clamp_(0, 255).to(torch.uint8)
        return _gemm(q, self.static_x_scale, self.static_zp, self.packed, self.static_w_scale, self.w_zp,
                     self.bias_float, self.out_dtype)

    def dynamic(self, x: torch.Tensor) -> torch.Tensor:
        s = dynamic_scale(x)
        q = (x.to(torch.float32) / s).round_().clamp_(-127, 127).add_(U8_SHIFT).to(torch.uint8)
        y = _gemm(q, 1.0, U8_SHIFT, self.packed, self.weight_scale, self.w_zp, None, torch.float32)
        return torch.addcmul(self.bias_float, y, s).to(self.out_dtype)

    def apply(self, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.w_zp.shape[0]), dtype=self.out_dtype)
        if n_dynamic == 0:
            return self.static(x)
        if n_dynamic == x.shape[0]:
            return self.dynamic(x)
        return torch.cat([self.dynamic(x[:n_dynamic]), self.static(x[n_dynamic:])])

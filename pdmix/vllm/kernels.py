"""One int8 weight per quantized linear, both W8A8_MIX paths on it (SPEC §5), one class per platform.

Each kernel computes rows of a layer into a caller's output rows (`out`, a contiguous row block
of the layer's output, so a mixed step writes each path's rows in place):
- `static(x, out)`: x_q = clamp(round(x / input_scale + input_offset), -128, 127);
  out = deq_scale * (x_q @ W^T + quant_bias);
- `dynamic(x, out)`: s_t = max|x_t| / 127, x_q = round(x / s_t);
  out = (x_q @ W^T) * s_t * weight_scale + bias_float.
Activations are quantized by vLLM's own ops (`_C.static_scaled_int8_quant` with the zero point,
`_C.dynamic_scaled_int8_quant`), written straight into an int8 buffer; they multiply by 1 / scale
where SPEC §5 divides, which can move an element lying within a hair of a .5 tie to the
neighbouring code (tests/vllm_plugin bounds that).
"""

import torch

from pdmix.schemes.w8a8_mix import W8A8Params


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, input_azp: torch.Tensor) -> torch.Tensor:
    q = _int8_rows(x)
    torch.ops._C.static_scaled_int8_quant(q, x, input_scale, input_azp)
    return q


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = _int8_rows(x)
    s = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    torch.ops._C.dynamic_scaled_int8_quant(q, x, s, None)
    return q, s


class _Kernel:
    """What both platforms hold: the weight once, and each path's per-channel fp32 vectors."""

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype):
        self.out_dtype = out_dtype
        self.out_features = p.out_features
        self.input_scale = p.input_scale.reshape(1).to(torch.float32).contiguous()
        self.input_azp = p.input_offset.reshape(1).to(torch.int32).contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this kernel keeps (for memory accounting and the one-weight test)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class CPUKernel(_Kernel):
    """x86/Arm CPUs, through ATen's int8-weight GEMM (`aten._weight_int8pack_mm`: fp32 activation,
    int8 weight [n, k] as stored, fp32 column scales given per call). The int8 codes are passed as
    fp32: products are exact and sums stay exact while every partial sum is below 2^24 in magnitude
    (always for k <= 1032; in practice for any k, as accumulators of real activations are far
    smaller), so the GEMM returns acc * column_scale with one fp32 rounding, and each path's
    epilogue is one fused elementwise op writing the model dtype.

    oneDNN's int8 GEMM (vLLM's `onednn_scaled_mm`, PyTorch's `qlinear_pointwise`) is not used: on
    CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) it multiplies pairs with vpmaddubsw,
    whose int16 sums saturate, and accumulators come back wrong by up to 10^4 (measured on this
    project's AVX2 machine with SPEC-range codes)."""

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype):
        super().__init__(p, out_dtype)
        self.weight = p.weight.contiguous()  # the one int8 copy, [n, k]
        self.deq_scale = p.deq_scale.to(torch.float32).contiguous()
        self.static_bias = (p.deq_scale * p.quant_bias.to(torch.float32)).contiguous()  # exact inputs, one rounding
        self.weight_scale = p.weight_scale.to(torch.float32).contiguous()
        self.bias_float = p.bias_float.to(torch.float32).contiguous()

    def _gemm(self, q: torch.Tensor, column_scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(q.to(torch.float32), self.weight, column_scale)

    def static(self, x: torch.Tensor, out: torch.Tensor) -> None:
        acc = self._gemm(quantize_static(x, self.input_scale, self.input_azp), self.deq_scale)
        torch.add(acc, self.static_bias, out=out)  # deq*acc + deq*quant_bias, rounded once to the model dtype

    def dynamic(self, x: torch.Tensor, out: torch.Tensor) -> None:
        q, s = quantize_dynamic(x)
        torch.addcmul(self.bias_float, self._gemm(q, self.weight_scale), s, out=out)


class CUDAKernel(_Kernel):
    """NVIDIA GPUs, through vLLM's CUTLASS int8 GEMMs on one weight (a [k, n] column-major view of
    the stored [n, k] int8 tensor), scales given per call:
    - static: `cutlass_scaled_mm_azp` with scale_a = 1, scale_b = deq_scale and azp_adj = -quant_bias,
      which computes scale_a * scale_b * (acc - azp_adj) = deq_scale * (acc + quant_bias) in the
      kernel's fp32 epilogue, no bias tensor needed;
    - dynamic: `cutlass_scaled_mm` with scale_a = s_t, scale_b = weight_scale and bias_float as its
      bias, which CUTLASS takes in the model dtype only: the bias is rounded to bf16/fp16 there
      (m4's large biases then cost some quality on this path; not measured, no GPU here).
    CUTLASS needs k and n to be multiples of 16."""

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype):
        super().__init__(p, out_dtype)
        n, k = p.weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"pdmix: CUTLASS int8 GEMM needs both weight dims divisible by 16, got [{n}, {k}]")
        self.weight = p.weight.contiguous()  # the one int8 copy; CUTLASS reads weight.t()
        self.one = torch.ones(1, dtype=torch.float32, device=p.weight.device)
        self.deq_scale = p.deq_scale.to(torch.float32).reshape(-1, 1).contiguous()
        self.azp_adj = (-p.quant_bias.to(torch.int32)).reshape(1, -1).contiguous()
        self.weight_scale = p.weight_scale.to(torch.float32).reshape(-1, 1).contiguous()
        self.bias = p.bias_float.to(out_dtype).contiguous()

    def static(self, x: torch.Tensor, out: torch.Tensor) -> None:
        q = quantize_static(x, self.input_scale, self.input_azp)
        torch.ops._C.cutlass_scaled_mm_azp(out, q, self.weight.t(), self.one, self.deq_scale, self.azp_adj, None, None)

    def dynamic(self, x: torch.Tensor, out: torch.Tensor) -> None:
        q, s = quantize_dynamic(x)
        torch.ops._C.cutlass_scaled_mm(out, q, self.weight.t(), s, self.weight_scale, self.bias)


def make(p: W8A8Params, out_dtype: torch.dtype, platform) -> _Kernel:
    """The kernel of vLLM's current platform."""
    if platform.is_cpu():
        return CPUKernel(p, out_dtype)
    if platform.is_cuda():
        return CUDAKernel(p, out_dtype)  # the tensors are where vLLM loaded them
    raise ValueError(f"pdmix: W8A8_MIX in vLLM runs on CPUs and NVIDIA GPUs, not on {platform.device_type!r}")

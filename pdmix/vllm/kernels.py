"""One int8 weight per quantized linear, both W8A8_MIX paths on it (SPEC §5), one class per platform
(two on x86 CPUs: pdmix's own C linear where oneDNN's int8 GEMM cannot be exact in one pass).

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

import functools

import torch

from pdmix import kernels as pdmix_kernels
from pdmix.kernels import arena, onednn, s8gemm
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


@functools.cache
def _zeros(n: int) -> torch.Tensor:
    """oneDNN's per-channel weight zero points (all zero), one shared tensor per width."""
    return torch.zeros(n, dtype=torch.int64)


class CPUKernel(_Kernel):
    """x86 CPUs, through PyTorch's oneDNN int8 GEMM (`onednn.qlinear_pointwise`, the one behind its
    x86 Inductor quantization) on one prepacked weight, with column scales and bias given per
    call and fp32 output: result = column_scale * acc + bias, then one elementwise op applies the
    rest of the path's epilogue and writes the model dtype.

    oneDNN takes uint8 activations. On CPUs with VNNI or AMX the int8 codes go in as x_q + 128 with
    zero point 128 and the accumulators are exact. Without them (AVX2, AVX-512 before Cascade
    Lake) oneDNN multiplies with vpmaddubsw, whose int16 pair sums saturate once activations
    reach 129 (x_q + 128 does; measured wrong by up to 10^4 on this project's AVX2 machine, and
    vLLM's own `onednn_scaled_mm` does the same). There each row goes in twice, as
    min(x_q, 0) + 128 and max(x_q, 0), both within [0, 128] where no pair sum can saturate, in one
    GEMM call with twice the rows (the weight is still read once) and zero point 64 for both:
    (min(x_q, 0) + 128 - 64) + (max(x_q, 0) - 64) = x_q, so the two results add up to the
    accumulators exactly (oneDNN applies the zero point as 64 * sum_k W in int32); each half takes
    half the bias."""

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype):
        super().__init__(p, out_dtype)
        if not onednn.available():
            raise ValueError("pdmix: this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)")
        self.packed = torch.ops.onednn.qlinear_prepack(p.weight, None)  # the one int8 copy, oneDNN's layout
        self.split = not (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
        self.zero_points = _zeros(p.out_features)
        self.deq_scale = p.deq_scale.to(torch.float32).contiguous()
        # static: deq_scale * acc + deq_scale * quant_bias (split: half of the bias on each half)
        self.static_bias = (p.deq_scale.double() * p.quant_bias.double() / (2 if self.split else 1)).float()
        self.weight_scale = p.weight_scale.to(torch.float32).contiguous()
        self.bias_float = p.bias_float.to(torch.float32).contiguous()

    def _gemm(self, q: torch.Tensor, column_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """column_scale * (q @ W^T) + bias as fp32 [m, n] (split: the two halves, [2m, n], still to add)."""
        m = q.shape[0]
        if self.split:
            u = torch.empty((2 * m, q.shape[1]), dtype=torch.uint8)
            halves = u.view(torch.int8)
            torch.clamp(q, max=0, out=halves[:m])
            u[:m].bitwise_xor_(128)  # min(x_q, 0) + 128, in [0, 128]
            torch.clamp(q, min=0, out=halves[m:])
            zero_point = 64
        else:
            u, zero_point = q.view(torch.uint8).bitwise_xor_(128), 128  # x_q + 128
        return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero_point, self.packed, column_scale, self.zero_points,
                                                  bias, 1.0, 0, torch.float32, "none", [], "")

    def _sum(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return out.copy_(y)
        m = y.shape[0] // 2
        return torch.add(y[:m], y[m:], out=out)

    def static(self, x: torch.Tensor, out: torch.Tensor) -> None:
        y = self._gemm(quantize_static(x, self.input_scale, self.input_azp), self.deq_scale, self.static_bias)
        self._sum(y, out)  # deq_scale * (acc + quant_bias), rounded once to the model dtype

    def dynamic(self, x: torch.Tensor, out: torch.Tensor) -> None:
        q, s = quantize_dynamic(x)
        y = self._gemm(q, self.weight_scale, None)
        acc = self._sum(y, y[:x.shape[0]]) if self.split else y  # weight_scale * acc
        torch.addcmul(self.bias_float, acc, s, out=out)


_WEIGHTS = arena.Chunks()  # this process's CPUInt8Kernel weights


class CPUInt8Kernel(_Kernel):
    """x86 CPUs (wherever the engine's cpu_int8 backend comes first: AVX2 or AVX-512 VNNI), through
    pdmix's own C linear (`pdmix/kernels/s8gemm.py`, the engine's cpu_int8 backend): quantization, an exact int8
    GEMM on the one int8 weight (s8gemm.Int8Weight: VNNI-packed where that runs faster) and the epilogue in one call
    per path, writing the model dtype straight into the output rows. The arithmetic is SPEC §5's as
    written (division by the scales, no reciprocal), bit for bit pdmix's reference backend."""

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype, in_place: bool = False):
        super().__init__(p, out_dtype)
        with arena.using(_WEIGHTS):  # the packed weights side by side on huge pages, as the engine's (kernels/arena.py)
            weight = s8gemm.Int8Weight(p.weight, in_place=in_place)
        self.linear = s8gemm.W8A8Linear(weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias,
                                        p.weight_scale, p.bias_float, out_dtype)
        self.weight = self.linear.weight.data  # the one int8 copy
        self.deq_scale, self.quant_bias, self.weight_scale, self.bias_float = self.linear.vectors

    @staticmethod
    def chosen(out_dtype: torch.dtype) -> bool:
        return (pdmix_kernels.priority("cpu")[0] == "cpu_int8" and s8gemm.library()[0] is not None
                and out_dtype in s8gemm.LINEAR_DTYPES)

    def static(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.linear(x, 0, out=out)

    def dynamic(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.linear(x, x.shape[0], out=out)


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


def make(p: W8A8Params, out_dtype: torch.dtype, platform, in_place: bool = False) -> _Kernel:
    """The kernel of vLLM's current platform. in_place: p.weight lies in memory the caller gives up to the
    kernel (a view of vLLM's stacked experts), where pdmix's C linear packs it rather than beside it."""
    if platform.is_cpu():
        return CPUInt8Kernel(p, out_dtype, in_place) if CPUInt8Kernel.chosen(out_dtype) else CPUKernel(p, out_dtype)
    if platform.is_cuda():
        return CUDAKernel(p, out_dtype)  # the tensors are where vLLM loaded them
    raise ValueError(f"pdmix: W8A8_MIX in vLLM runs on CPUs and NVIDIA GPUs, not on {platform.device_type!r}")

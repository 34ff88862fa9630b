"""W8A8_MIX on x86 CPUs with oneDNN's prepacked int8 GEMM, through PyTorch's own ops
(`torch.ops.onednn.qlinear_prepack` / `qlinear_pointwise`, the kernel behind PyTorch's x86
Inductor quantization).

The weight is prepacked once into oneDNN's blocked layout. oneDNN takes a uint8 activation with a
per-tensor zero point: an int8 x_q is passed as x_q + 128 with zero point 128, and with unit scales
the GEMM returns the exact int32 accumulator x_q @ W^T as fp32 (exact below 2^24; static rows get
quant_bias added inside the GEMM, also exactly). The SPEC §5 epilogues then run in torch, in the
reference's order of operations, so outputs are bit for bit the reference's: an int8 model
re-quantizes every layer's output, and a 1-ulp difference would flip int8 codes downstream.

On x86 CPUs without VNNI, oneDNN sums pairs of u8*s8 products in a saturating int16 (vpmaddubsw),
wrong for codes near the ends of the range; there (found by a check at first use) each code is split
into two halves below 128 that run as the rows of one call, and the accumulators stay exact.

Quantization and the epilogues of large steps run as compiled kernels (`fusion.fused`).

Inside a compiled decoder stack (`compile=True`), `apply_masked` is the layer's graph form: the GEMM is
an opaque op (`pdmix::onednn_gemm`; Inductor cannot take the prepacked weight as a graph input) and
quantization and epilogues are plain torch that Inductor fuses with the ops around them.
"""

import functools
import itertools
import weakref

import torch

from pdmix.kernels import reference
from pdmix.kernels.fusion import fused
from pdmix.schemes import w8a8_mix
from pdmix.schemes.w8a8_mix import W8A8Params

U8_SHIFT = 128  # int8 value + 128 = uint8 value


def available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


def qlinear(x_u8: torch.Tensor, zero_point: int, packed, ones: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """(x_u8 - zero_point) @ W^T (+ bias) from oneDNN's int8 GEMM with unit scales, as fp32."""
    return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, zero_point, packed, ones, zeros, bias,
                                              1.0, 0, torch.float32, "none", [], "")


def split_accumulators(x_u8: torch.Tensor, packed, ones: torch.Tensor, zeros: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    """(x_u8 - 128) @ W^T where oneDNN's u8 products must stay below 128: x_u8 = a + b with
    a = max(x_u8, 128) - 128 (= max(x_q, 0)) and b = min(x_u8, 128) (= min(x_q, 0) + 128), both in
    [0, 128], run as the rows of one call, then a @ W^T + b @ W^T - 128 * sum_k(W) (`shift`)."""
    m = x_u8.shape[0]
    acc = qlinear(torch.cat([x_u8.clamp(min=U8_SHIFT) - U8_SHIFT, x_u8.clamp(max=U8_SHIFT)]), 0, packed, ones, zeros,
                  None)
    return acc[:m] + acc[m:] - shift


@functools.cache
def needs_split() -> bool | None:
    """How oneDNN's u8s8 GEMM gives exact accumulators on this CPU: False with x_q + 128 as they are,
    True only through split_accumulators, None not at all. On x86 CPUs without VNNI (AVX2, older
    AVX-512) oneDNN multiplies with vpmaddubsw, whose int16 sums of two u8*s8 products saturate for
    codes near the ends of the range (255 * 127 * 2 > 32767). Checked once, on those codes."""
    if not available():
        return None
    k, cpu = 64, torch.device("cpu")  # explicit dtypes and device: callers (vLLM) may have changed the defaults
    w = torch.full((4, k), 127, dtype=torch.int8, device=cpu)
    w[1::2] = -127
    x = torch.full((3, k), 255, dtype=torch.uint8, device=cpu)
    x[1], x[2, ::2] = 0, 1
    want = ((x.int() - U8_SHIFT) @ w.int().T).float()
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    ones, zeros = torch.ones(4, dtype=torch.float32, device=cpu), torch.zeros(4, dtype=torch.int64, device=cpu)
    if torch.equal(qlinear(x, U8_SHIFT, packed, ones, zeros, None), want):
        return False
    shift = U8_SHIFT * w.int().sum(1).float()
    return True if torch.equal(split_accumulators(x, packed, ones, zeros, shift), want) else None


def quantize_static_u8(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """SPEC §5's static quantization as uint8: clamp(round(x / input_scale + input_offset), -128, 127) + 128
    (the shift after rounding, so the codes are exactly the reference's)."""
    q = torch.round(x.to(torch.float32) / input_scale + input_offset).clamp(-128, 127)
    return q.add(U8_SHIFT).to(torch.uint8)


def quantize_dynamic_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §5's per-token quantization as uint8: (x_q + 128, s_t [m, 1])."""
    s = reference.dynamic_scale(x)
    return torch.round(x.to(torch.float32) / s).clamp(-127, 127).add(U8_SHIFT).to(torch.uint8), s


def epilogue_static(acc_plus_bias: torch.Tensor, deq_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """deq_scale * (acc + quant_bias), as the reference (the sum comes exact from the GEMM)."""
    return (deq_scale * acc_plus_bias).to(out_dtype)


_by_handle: "weakref.WeakValueDictionary[int, OneDNNKernel]" = weakref.WeakValueDictionary()
_handles = itertools.count()


@torch.library.custom_op("pdmix::onednn_gemm", mutates_args=())
def onednn_gemm(x_u8: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The exact accumulators (x_u8 - 128) @ W^T as fp32 of the kernel registered under `handle`
    (a tensor, not an int: an int would be baked into the graph and change Inductor's cache key)."""
    return _by_handle[int(handle)].gemm(x_u8, None)


@onednn_gemm.register_fake
def _(x_u8, handle, out_features):
    return x_u8.new_empty((x_u8.shape[0], out_features), dtype=torch.float32)


class OneDNNKernel:
    name = "onednn"

    @staticmethod
    def unsupported(device: torch.device, row_parallel: bool) -> str | None:
        if why := reference.layer_unsupported(device, row_parallel, "cpu"):
            return why
        if not available():
            return "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
        if needs_split() is None:
            return "oneDNN's int8 GEMM is not exact on this CPU"
        return None

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype, reduce=None, reduce_max=None):
        assert reduce is None and reduce_max is None
        self.out_dtype = out_dtype
        self.packed = torch.ops.onednn.qlinear_prepack(p.weight, None)
        self.ones = torch.ones(p.out_features, dtype=torch.float32)
        self.zeros = torch.zeros(p.out_features, dtype=torch.int64)
        self.input_scale, self.input_offset = p.input_scale.clone(), p.input_offset.clone()
        self.quant_bias = p.quant_bias.to(torch.float32)  # exact: |quant_bias| < 2^24
        self.shift = U8_SHIFT * w8a8_mix.weight_row_sums(p.weight) if needs_split() else None
        self.deq_scale, self.weight_scale, self.bias_float = p.deq_scale, p.weight_scale, p.bias_float
        self.handle = torch.tensor(next(_handles))
        _by_handle[int(self.handle)] = self

    def gemm(self, x_u8: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(x_u8 - 128) @ W^T (+ bias), exact integers as fp32."""
        if self.shift is None:
            return qlinear(x_u8, U8_SHIFT, self.packed, self.ones, self.zeros, bias)
        acc = split_accumulators(x_u8, self.packed, self.ones, self.zeros, self.shift)
        return acc if bias is None else acc + bias

    def static(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.gemm(fused(quantize_static_u8, x, self.input_scale, self.input_offset), self.quant_bias)
        return fused(epilogue_static, acc, self.deq_scale, self.out_dtype)

    def dynamic(self, x: torch.Tensor) -> torch.Tensor:
        q, s = fused(quantize_dynamic_u8, x)
        acc = self.gemm(q, None)
        return fused(reference.epilogue_dynamic, acc, s, self.weight_scale, self.bias_float, self.out_dtype)

    def accumulate(self, x: torch.Tensor, n_dynamic: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 accumulators [m, n] of both row sets, the dynamic rows' scales), as the reference's."""
        q, s = quantize_dynamic_u8(x[:n_dynamic])
        q = torch.cat([q, quantize_static_u8(x[n_dynamic:], self.input_scale, self.input_offset)])
        return self.gemm(q, None).to(torch.int32), s

    def apply_masked(self, x: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        """apply() with the rows' paths as a bool [m, 1] tensor (True: dynamic), for a compiled graph,
        which would bake a Python row count in. Every row is quantized both ways and one GEMM runs;
        quant_bias is added in the epilogue (exact in fp32, as in the GEMM). Same bits as apply()."""
        q_dyn, s = quantize_dynamic_u8(x)
        q = torch.where(dynamic, q_dyn, quantize_static_u8(x, self.input_scale, self.input_offset))
        acc = torch.ops.pdmix.onednn_gemm(q, self.handle, self.ones.shape[0])
        y_dyn = reference.epilogue_dynamic(acc, s, self.weight_scale, self.bias_float, self.out_dtype)
        return torch.where(dynamic, y_dyn, epilogue_static(acc + self.quant_bias, self.deq_scale, self.out_dtype))

    def apply(self, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.ones.shape[0]), dtype=self.out_dtype)
        if n_dynamic == 0:
            return self.static(x)
        if n_dynamic == x.shape[0]:
            return self.dynamic(x)
        return torch.cat([self.dynamic(x[:n_dynamic]), self.static(x[n_dynamic:])])

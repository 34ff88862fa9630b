"""pdmix's exact int8 GEMMs in C (csrc/s8gemm.c, built and loaded by clib.py): int8 x [m, k] @ int8
w [n, k]^T -> int32 [m, n] (the cpu_int8 backend), the same in 32-wide scaled blocks -> fp32 (the int8
lm_head), and a whole W8A8_MIX linear in one call (W8A8Linear). A linear's weight is held as an
Int8Weight: row-major, or VNNI-packed where that is faster.

Inside a compiled graph the GEMM and the linear are the opaque ops `pdmix::s8gemm` and
`pdmix::w8a8_linear`: they take their tensors as arguments, so nothing needs registering.
"""

import ctypes
import functools
import os

import torch

from pdmix.kernels import arena
from pdmix.kernels.clib import isa, library  # noqa: F401  (what callers ask of this module)


def packs(n: int, k: int) -> bool:
    """Whether an [n, k] weight is VNNI-packed here: CPUs with AVX-512 VNNI (the packed GEMM's only path),
    whole 16-column blocks and 4-byte chunks; PDMIX_S8GEMM_PACK=0 keeps weights row-major (A/B runs)."""
    return (isa() == "avx512_vnni" and n > 0 and n % 16 == 0 and k > 0 and k % 4 == 0
            and os.environ.get("PDMIX_S8GEMM_PACK", "1") != "0")


class Int8Weight:
    """A linear's int8 weight [n, k] as the GEMM reads it. Where `packs(n, k)`, VNNI-packed (csrc/s8gemm.c,
    pdmix_s8pack: the codes as w + 128 in blocks of 16 columns, 4 codes of each per 64-byte chunk, one
    vpdpbusd per chunk and row of x with no reduction across lanes; 1.3-2x the row-major GEMM here,
    docs/performance.md); elsewhere row-major, the checkpoint's codes as they are. `data` keeps the
    shape [n, k] and the element count either way: the one int8 copy.

    in_place: pack into the weight's own storage (the caller's tensor then holds the packed form), so that
    a weight inside a larger tensor (vLLM's stacked experts) keeps its place; else a new tensor, in the
    open arena when the loader has one (kernels/arena.py), the row-major codes copied there too."""

    def __init__(self, weight: torch.Tensor, pack: bool | None = None, in_place: bool = False):
        assert weight.dtype == torch.int8 and weight.dim() == 2, (weight.dtype, weight.shape)
        assert not in_place or weight.is_contiguous(), "in place: a contiguous weight (else it is a copy)"
        w = weight.contiguous()
        n, k = w.shape
        self.packed = packs(n, k) if pack is None else pack
        assert not self.packed or packs(n, k), (n, k)
        if self.packed:
            src, self.data = (w.clone(), w) if in_place else (w, arena.empty(w.shape, w.dtype))
            library()[0].pdmix_s8pack(src.data_ptr(), n, k, self.data.data_ptr())
        else:
            self.data = w if in_place else arena.place(w)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def _gemm(x_q: torch.Tensor, weight: torch.Tensor, packed: bool) -> torch.Tensor:
    x_q = x_q.contiguous()
    m, (n, k) = x_q.shape[0], weight.shape
    out = torch.empty((m, n), dtype=torch.int32)
    if m and library()[0].pdmix_s8gemm(x_q.data_ptr(), m, weight.data_ptr(), packed, n, k, out.data_ptr(),
                                       torch.get_num_threads()):
        raise MemoryError(f"s8gemm: no memory for a {m} x {k} int16 buffer")
    return out


def gemm(x_q: torch.Tensor, weight: "torch.Tensor | Int8Weight") -> torch.Tensor:
    """x_q int8 [m, k] @ weight int8 [n, k]^T as exact int32 [m, n], on torch's thread count; weight
    row-major or an Int8Weight."""
    if isinstance(weight, Int8Weight):
        return _gemm(x_q, weight.data, weight.packed)
    return _gemm(x_q, weight.contiguous(), False)


def q8_0_gemm(x_q: torch.Tensor, x_scales: torch.Tensor, weight: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """fp32 [m, n] from 32-wide blocks (llama.cpp's Q8_0 x Q8_0): x_q int8 [m, k] with fp32 scales
    [m, k / 32], weight int8 [n, k] with fp32 scales [n, k / 32]; each block's dot product exact in
    int32, the scaled sum in a fixed fp32 order (a row's result does not depend on the other rows)."""
    x_q, x_scales = x_q.contiguous(), x_scales.to(torch.float32).contiguous()
    m, (n, k) = x_q.shape[0], weight.shape
    out = torch.empty((m, n), dtype=torch.float32)
    if m and library()[0].pdmix_q8_0_gemm(x_q.data_ptr(), x_scales.data_ptr(), m, weight.data_ptr(),
                                          w_scales.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"q8_0_gemm: no memory for a {m} x {k} int16 buffer")
    return out


LINEAR_DTYPES = (torch.bfloat16, torch.float32)  # what w8a8_linear reads and writes


class LinearStruct(ctypes.Structure):
    """csrc/s8gemm.c's struct w8a8_linear: a W8A8_MIX linear's pointers and numbers, field for field,
    passed by pointer (a call then converts 9 arguments, not 18: 3 -> 1.3 us)."""
    _fields_ = [("w", ctypes.c_void_p), ("packed", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("input_scale", ctypes.c_float), ("input_offset", ctypes.c_float), ("deq_scale", ctypes.c_void_p),
                ("quant_bias", ctypes.c_void_p), ("weight_scale", ctypes.c_void_p), ("bias_float", ctypes.c_void_p),
                ("scales_bf16", ctypes.c_int64)]

    @classmethod
    def of(cls, weight: torch.Tensor, packed: bool, input_scale: float, input_offset: float, deq_scale, quant_bias,
           weight_scale, bias_float) -> "LinearStruct":
        """From the tensors as the C code reads them (contiguous; fp32 vectors, int32 quant_bias), or with
        a bf16 weight_scale and no deq_scale (W8A8Linear's compact scales)."""
        compact = weight_scale.dtype == torch.bfloat16
        assert (deq_scale is None) == compact
        return cls(weight.data_ptr(), packed, weight.shape[0], weight.shape[1], input_scale, input_offset,
                   None if compact else deq_scale.data_ptr(), quant_bias.data_ptr(), weight_scale.data_ptr(),
                   None if bias_float is None else bias_float.data_ptr(), compact)


def compact_scales(input_scale: torch.Tensor, deq_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor | None:
    """weight_scale as bf16 where that form loses nothing: every weight_scale is a bf16 value and every
    deq_scale is bf16(input_scale * weight_scale) as SPEC section 4 computes it (fp32 product, rounded to
    nearest even), so the C epilogue can recompute deq_scale instead of holding it. Else None."""
    ws16 = weight_scale.to(torch.bfloat16)
    derived = (input_scale.to(torch.float32) * ws16.float()).to(torch.bfloat16).float()
    same = lambda a, b: torch.equal(a.view(torch.int32), b.view(torch.int32))  # noqa: E731  bits, -0 and NaN included
    if not (same(ws16.float(), weight_scale) and same(derived, deq_scale) and bool(derived.isfinite().all())):
        return None
    return ws16


@functools.cache
def _zeros(n: int) -> torch.Tensor:
    """An all-zero fp32 bias of width n, one shared by every linear of that width."""
    return torch.zeros(n, dtype=torch.float32)  # not the default dtype: vLLM sets bf16


def _linear(x: torch.Tensor, n_dynamic: int, dynamic: torch.Tensor | None, linear: LinearStruct,
            out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """One pdmix_w8a8_linear_run call on the linear described by `linear`."""
    assert x.dtype in LINEAR_DTYPES, x.dtype
    x, m, n = x.contiguous(), x.shape[0], linear.n
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype)
    else:
        assert out.is_contiguous() and out.dtype == out_dtype and out.shape == (m, n)
    if dynamic is not None and not (dynamic.dtype in (torch.bool, torch.uint8) and dynamic.is_contiguous()):
        dynamic = dynamic.to(torch.uint8).contiguous()  # bool is one byte of 0 or 1: read as it is
    if m and library()[0].pdmix_w8a8_linear_run(
            ctypes.byref(linear), x.data_ptr(), x.dtype == torch.bfloat16, m,
            None if dynamic is None else dynamic.data_ptr(), n_dynamic, out.data_ptr(), out_dtype == torch.bfloat16,
            torch.get_num_threads()):
        raise MemoryError(f"w8a8_linear: no memory for {m} x {x.shape[1]} activations")
    return out


class W8A8Linear:
    """A whole W8A8_MIX linear in one C call (`pdmix_w8a8_linear_run`): each row quantized on its path,
    one exact GEMM, each row's epilogue, the output in bf16 or fp32, bit for bit what
    pdmix/kernels/reference.py computes. Holds its tensors (the weight as an Int8Weight, input_scale,
    input_offset, deq_scale, quant_bias, weight_scale, bias_float or None), so a call passes only
    the activations. weight: an Int8Weight, or an int8 [n, k] tensor to make one of (a new tensor)."""

    def __init__(self, weight, input_scale, input_offset, deq_scale, quant_bias, weight_scale, bias_float,
                 out_dtype: torch.dtype):
        assert out_dtype in LINEAR_DTYPES, out_dtype
        f32 = lambda t: t.to(torch.float32).reshape(-1).contiguous()  # noqa: E731
        self.weight = weight if isinstance(weight, Int8Weight) else Int8Weight(weight)
        self.input_scale, self.input_offset = (t.to(torch.float32).reshape(()) for t in (input_scale, input_offset))
        deq_scale, weight_scale = f32(deq_scale), f32(weight_scale)
        ws16 = compact_scales(self.input_scale, deq_scale, weight_scale)
        if bias_float is not None:
            bias_float = f32(bias_float)
            if not bias_float.view(torch.int32).any():  # all +0.0: the shared zeros, the same additions
                bias_float = _zeros(bias_float.numel())
        quant_bias = quant_bias.to(torch.int32).reshape(-1).contiguous()
        self.vectors = ((deq_scale, quant_bias, weight_scale, bias_float) if ws16 is None
                        else (None, quant_bias, ws16, bias_float))
        self.out_dtype, (self.n, self.k) = out_dtype, self.weight.shape
        self._struct = LinearStruct.of(self.weight.data, self.weight.packed, float(input_scale), float(input_offset),
                                       *self.vectors)

    def __call__(self, x: torch.Tensor, n_dynamic: int = 0, dynamic: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """x [m, k] (bf16 or fp32) -> [m, n]: rows [0, n_dynamic) dynamic, or the rows where the bool
        `dynamic` [m] is set; into `out` (contiguous, the output dtype) when given."""
        return _linear(x, n_dynamic, dynamic, self._struct, self.out_dtype, out)

    def graph_tensors(self) -> tuple:
        """What `pdmix::w8a8_linear` takes after x and the row mask."""
        return (self.weight.data, self.weight.packed, self.input_scale, self.input_offset, *self.vectors)


@torch.library.custom_op("pdmix::w8a8_linear", mutates_args=())
def w8a8_linear_op(x: torch.Tensor, dynamic: torch.Tensor, weight: torch.Tensor, packed: bool,
                   input_scale: torch.Tensor, input_offset: torch.Tensor, deq_scale: torch.Tensor | None,
                   quant_bias: torch.Tensor, weight_scale: torch.Tensor, bias_float: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8Linear as one opaque op of a compiled graph (dynamic: bool, True for a per-token row), on
    W8A8Linear's own tensors (`graph_tensors()`: contiguous, fp32 and int32, as the C code reads them)."""
    linear = LinearStruct.of(weight, packed, input_scale.item(), input_offset.item(), deq_scale, quant_bias,
                             weight_scale, bias_float)
    return _linear(x, 0, dynamic, linear, out_dtype)


@w8a8_linear_op.register_fake
def _(x, dynamic, weight, packed, input_scale, input_offset, deq_scale, quant_bias, weight_scale, bias_float,
      out_dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("pdmix::s8gemm", mutates_args=())
def s8gemm_op(x_q: torch.Tensor, weight: torch.Tensor, packed: bool) -> torch.Tensor:
    """gemm() on an Int8Weight's (data, packed)."""
    return _gemm(x_q, weight, packed)


@s8gemm_op.register_fake
def _(x_q, weight, packed):
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=torch.int32)

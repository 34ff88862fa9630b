"""W8A8_MIX on CPUs with pdmix's own exact int8 GEMM (`s8gemm`, C, with AVX2 and AVX-512 VNNI paths):
the first backend on x86 CPUs (kernels.priority).

It keeps one int8 copy of each weight, streamed once per step: VNNI-packed where the CPU has AVX-512
VNNI (s8gemm.Int8Weight: the packed codes replace the checkpoint's, no second copy), row-major
elsewhere (AVX2: about 4x oneDNN's split form, onednn.py); docs/performance.md has the figures.
Quantization and epilogues are the reference's functions, fused for large steps, so outputs are bit
for bit the reference's.
"""

import torch

from pdmix.kernels import reference, s8gemm
from pdmix.kernels.fusion import fused
from pdmix.schemes.w8a8_mix import W8A8Params


class CpuInt8Kernel(reference.ReferenceKernel):
    name = "cpu_int8"

    @staticmethod
    def unsupported(device: torch.device, row_parallel: bool) -> str | None:
        return reference.layer_unsupported(device, row_parallel, "cpu") or s8gemm.library()[1]

    def __init__(self, p: W8A8Params, out_dtype: torch.dtype, reduce=None, reduce_max=None):
        assert reduce is None and reduce_max is None
        self.weight = s8gemm.Int8Weight(p.weight)  # the one int8 copy, in the GEMM's layout
        # the reference's fields; its weight is this kernel's (maybe packed) codes, read only through self.weight
        self.params = W8A8Params(**dict(vars(p), weight=self.weight.data))
        self.out_dtype, self.reduce, self.reduce_max = out_dtype, None, None
        p = self.params
        self.linear = (s8gemm.W8A8Linear(self.weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias,
                                         p.weight_scale, p.bias_float, out_dtype)
                       if out_dtype in s8gemm.LINEAR_DTYPES else None)

    def whole_in_c(self, x: torch.Tensor) -> bool:
        """bf16 and fp32 models run the whole linear as one C call; others (fp16) the pieces below."""
        return self.linear is not None and x.dtype in s8gemm.LINEAR_DTYPES

    def matmul(self, x_q: torch.Tensor) -> torch.Tensor:
        return s8gemm.gemm(x_q, self.weight)

    def apply(self, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        """One GEMM over both row sets (a mixed step streams the weight once); for bf16 and fp32
        models the whole linear is one C call."""
        if self.whole_in_c(x):
            return self.linear(x, n_dynamic)
        p, m = self.params, x.shape[0]
        if m == 0:
            return x.new_empty((0, p.out_features), dtype=self.out_dtype)
        q, s = [], None
        if n_dynamic:
            q_dyn, s = fused(reference.quantize_dynamic, x[:n_dynamic])
            q.append(q_dyn)
        if n_dynamic < m:
            q.append(fused(reference.quantize_static, x[n_dynamic:], p.input_scale, p.input_offset))
        acc = self.matmul(q[0] if len(q) == 1 else torch.cat(q))
        y = []
        if n_dynamic:
            y.append(fused(reference.epilogue_dynamic, acc[:n_dynamic], s, p.weight_scale, p.bias_float, self.out_dtype))
        if n_dynamic < m:
            y.append(fused(reference.epilogue_static, acc[n_dynamic:], p.deq_scale, p.quant_bias, self.out_dtype))
        return y[0] if len(y) == 1 else torch.cat(y)

    def apply_masked(self, x: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        """apply() with the rows' paths as a bool [m, 1] tensor (True: dynamic), the form inside a
        compiled graph: every row quantized both ways, one GEMM; the same bits as apply()."""
        p = self.params
        if self.whole_in_c(x):
            return torch.ops.pdmix.w8a8_linear(x, dynamic, *self.linear.graph_tensors(), self.out_dtype)
        q_dyn, s = reference.quantize_dynamic(x)
        q = torch.where(dynamic, q_dyn, reference.quantize_static(x, p.input_scale, p.input_offset))
        acc = torch.ops.pdmix.s8gemm(q, self.weight.data, self.weight.packed)
        y_dyn = reference.epilogue_dynamic(acc, s, p.weight_scale, p.bias_float, self.out_dtype)
        return torch.where(dynamic, y_dyn, reference.epilogue_static(acc, p.deq_scale, p.quant_bias, self.out_dtype))

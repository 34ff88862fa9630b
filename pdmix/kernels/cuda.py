"""W8A8_MIX on NVIDIA GPUs: cuBLASLt's int8 GEMM (`torch._int_mm`) on the column-major view of the
weight (the reference kernel's `weight_t`), with each path's quantization and epilogue fused by
torch.compile into one kernel apiece.

Untested on hardware in CI (no GPU there): its tests run where CUDA exists and skip elsewhere.
"""

import functools

import torch

from pdmix.kernels import reference


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


class CudaKernel(reference.ReferenceKernel):
    name = "cuda"

    @staticmethod
    def unsupported(device: torch.device, row_parallel: bool) -> str | None:
        return reference.layer_unsupported(device, row_parallel, "cuda")

    def apply(self, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        p = self.params
        parts = []
        if n_dynamic:
            q, s = _compiled(reference.quantize_dynamic)(x[:n_dynamic])
            acc = reference.int8_matmul(q, self.weight_t)
            parts.append(_compiled(reference.epilogue_dynamic)(acc, s, p.weight_scale, p.bias_float, self.out_dtype))
        if n_dynamic < x.shape[0]:
            q = _compiled(reference.quantize_static)(x[n_dynamic:], p.input_scale, p.input_offset)
            acc = reference.int8_matmul(q, self.weight_t)
            parts.append(_compiled(reference.epilogue_static)(acc, p.deq_scale, p.quant_bias, self.out_dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

"""Linear layers: float, and W8A8_MIX with both activation paths of SPEC §5.

A forward gets the rows of several sequences at once. `RowSplit` says which rows are prompt tokens
(the first `n_prefill`, quantized dynamically per token) and which are decode tokens (the rest,
quantized statically per tensor); `mode` forces one path for comparison.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmix import kernels
from pdmix.errors import PdmixError
from pdmix.quant.arithmetic import decode_deq_scale

MODES = ("pdmix", "dynamic", "static")


@dataclass
class RowSplit:
    n_prefill: int          # rows [0, n_prefill) are prompt tokens; the rest decode tokens
    mode: str = "pdmix"

    def dynamic_rows(self, total: int) -> int:
        return {"pdmix": self.n_prefill, "dynamic": total, "static": 0}[self.mode]


class FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        self.reduce = None  # set by tensor parallelism on row-parallel layers

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        if self.reduce is None:
            return F.linear(x, self.weight, self.bias)
        # Row-parallel: sum fp32 partials, then round once, as a single process would.
        y = self.reduce(F.linear(x.float(), self.weight.float()))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class W8A8MixLinear(nn.Module):
    """A W8A8_MIX linear, prepared at load time from the checkpoint's seven tensors.

    Row-parallel shards (tensor parallelism) all-reduce the exact int32 accumulator and the
    per-token absmax, so a sharded model computes bit for bit what one process computes.
    """

    def __init__(self, t: dict[str, torch.Tensor], out_dtype: torch.dtype, name: str = "",
                 bias_float: torch.Tensor | None = None):
        super().__init__()
        w = t["weight"]
        if w.dtype != torch.int8 or w.dim() != 2:
            raise PdmixError(f"{name}.weight: expected a 2-D int8 tensor, got {w.dtype} {list(w.shape)}")
        self.out_dtype = out_dtype
        self.name = name
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("input_scale", t["input_scale"].to(torch.float32).reshape(()))
        self.register_buffer("input_offset", t["input_offset"].to(torch.float32).reshape(()))
        self.register_buffer("deq_scale", decode_deq_scale(t["deq_scale"]).reshape(-1))
        self.register_buffer("quant_bias", t["quant_bias"].to(torch.int32).reshape(-1))
        self.register_buffer("weight_scale", t["weight_scale"].to(torch.float32).reshape(-1))
        if bias_float is None:
            bias_float = kernels.reference.recover_bias(self.deq_scale, self.quant_bias, self.input_offset, w)
        self.register_buffer("bias_float", bias_float)
        self.reduce = None      # row-parallel: all-reduce sum of int32 accumulators
        self.reduce_max = None  # row-parallel: all-reduce max of per-token absmax

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def kernels(self):
        """The int8 kernels for the device the weights are on."""
        return kernels.get_backend(self.weight.device)

    @property
    def weight_t(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        k = self.kernels
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_dyn = x.shape[0] if split is None else split.dynamic_rows(x.shape[0])
        q_dyn, s = k.quantize_dynamic(x[:n_dyn], self.reduce_max)
        q_sta = k.quantize_static(x[n_dyn:], self.input_scale, self.input_offset)
        # One GEMM for both row sets of a mixed batch.
        q = q_dyn if n_dyn == x.shape[0] else q_sta if n_dyn == 0 else torch.cat([q_dyn, q_sta])
        acc = k.int8_matmul(q, self.weight_t)
        if self.reduce is not None:
            acc = self.reduce(acc)
        y_dyn = k.epilogue_dynamic(acc[:n_dyn], s, self.weight_scale, self.bias_float, self.out_dtype)
        y_sta = k.epilogue_static(acc[n_dyn:], self.deq_scale, self.quant_bias, self.out_dtype)
        y = y_dyn if n_dyn == x.shape[0] else y_sta if n_dyn == 0 else torch.cat([y_dyn, y_sta])
        return y.reshape(*shape[:-1], y.shape[-1])


def fuse_linears(mods: list[nn.Module], name: str) -> nn.Module | None:
    """One linear computing several that read the same input (q/k/v, gate/up), outputs concatenated;
    None when they are of different kinds (one rolled back to float, say).

    W8A8_MIX members must share input_scale/input_offset (SPEC §7): the fused layer quantizes its
    input once, so a checkpoint where they differ is refused rather than computed wrongly.
    """
    if all(type(m) is FloatLinear for m in mods):
        if any(m.reduce is not None for m in mods):
            return None
        biases = [m.bias if m.bias is not None else torch.zeros_like(m.weight[:, 0]) for m in mods]
        has_bias = any(m.bias is not None for m in mods)
        return FloatLinear(torch.cat([m.weight for m in mods]), torch.cat(biases) if has_bias else None)
    if not all(type(m) is W8A8MixLinear for m in mods) or any(m.reduce is not None for m in mods):
        return None
    first = mods[0]
    for m in mods[1:]:
        if not (torch.equal(m.input_scale, first.input_scale) and torch.equal(m.input_offset, first.input_offset)):
            raise PdmixError(f"{m.name}: input_scale/input_offset differ from {first.name}'s; they read the same "
                             f"input and must share them (SPEC §7)")
    t = {"weight": torch.cat([m.weight for m in mods]), "input_scale": first.input_scale,
         "input_offset": first.input_offset, "deq_scale": torch.cat([m.deq_scale for m in mods]),
         "quant_bias": torch.cat([m.quant_bias for m in mods]), "weight_scale": torch.cat([m.weight_scale for m in mods])}
    return W8A8MixLinear(t, first.out_dtype, name, torch.cat([m.bias_float for m in mods]))

"""Linear layers: float, and W8A8_MIX with both activation paths of SPEC §5.

A forward gets the rows of several sequences at once. `RowSplit` says which rows are prompt tokens
(the first `n_prefill`, quantized dynamically per token) and which are decode tokens (the rest,
quantized statically per tensor); `mode` forces one path for comparison. Inside a compiled graph the
split is a bool [T, 1] tensor instead (True: dynamic row), since a graph would bake a Python row count in.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmix import kernels
from pdmix.kernels import cpu_float
from pdmix.schemes import w8a8_dynamic, w8a8_mix
from pdmix.schemes.w8a8_mix import W8A8Params

MODES = ("pdmix", "dynamic", "static")


@dataclass
class RowSplit:
    n_prefill: int          # rows [0, n_prefill) are prompt tokens; the rest decode tokens
    mode: str = "pdmix"

    def dynamic_rows(self, total: int) -> int:
        return self.n_prefill if self.mode == "pdmix" else total if self.mode == "dynamic" else 0

    def dynamic_mask(self, total: int, device) -> torch.Tensor:
        """bool [total, 1]: which rows take the dynamic path (the split's form inside a compiled graph)."""
        return (torch.arange(total, device=device) < self.dynamic_rows(total))[:, None]


def dynamic_rows(split: RowSplit | None, total: int) -> int:
    """How many of `total` rows take the dynamic path: all of them when there is no split (prefill)."""
    return total if split is None else split.dynamic_rows(total)


@torch.library.custom_op("pdmix::linear", mutates_args=())
def eager_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The float linear as an opaque op in a compiled graph: Inductor would otherwise lower a small-M
    GEMM to its own loops, whose different summation order changes output bits (and then greedy tokens)."""
    return float_gemm(x, weight, bias)


FP32_ROWS = 16  # rows per fp32 GEMM call on CPU (float_gemm)


def float_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, such that a row's output on CPU does not depend on how many rows share the GEMM, which
    torch's GEMMs do not promise: bf16 in C (kernels/cpu_float.py); fp32 (`--dtype float32`) as torch's
    GEMMs of always FP32_ROWS rows (zero-padded), whose kernel choice then no longer follows the row count."""
    if cpu_float.usable(x, weight):
        return cpu_float.linear(x, weight, bias)
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    pad = -x2.shape[0] % FP32_ROWS
    rows = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])]) if pad else x2
    y = torch.cat([F.linear(c, weight, bias) for c in rows.split(FP32_ROWS)])[:x2.shape[0]]
    return y.reshape(*x.shape[:-1], weight.shape[0])


@eager_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        # Under tensor parallelism every rank runs the whole float layer, as one process does: a
        # row-parallel one all-gathers its sharded input first (`gather`), a column-parallel one keeps
        # its rank's output columns (`columns`). A sharded GEMM sums in another order (per-rank partial
        # products; another blocking for fewer columns), and a float layer's output bits, then the
        # next int8 codes, would depend on the number of ranks. Only rolled-back layers are float in
        # a W8A8_MIX model, so the extra work is small.
        self.gather = None
        self.columns: slice | None = None
        # False: torch's own GEMM, as the quantization pipeline's float forward (msModelSlim's) computes
        self.batch_invariant = True

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.columns is None else self.columns.stop - self.columns.start

    @property
    def row_parallel(self) -> bool:
        return self.gather is not None

    def forward(self, x: torch.Tensor, split: RowSplit | torch.Tensor | None = None) -> torch.Tensor:
        if self.gather is not None:
            x = self.gather(x)
        if torch.compiler.is_compiling():
            y = torch.ops.pdmix.linear(x, self.weight, self.bias)
        elif self.batch_invariant:
            y = float_gemm(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self.columns is None else y[..., self.columns].contiguous()


class W8A8MixLinear(nn.Module):
    """A W8A8_MIX linear: the checkpoint's seven tensors in runtime form (`W8A8Params`), computed by a
    kernel backend chosen for its device when it is prepared (at load, or at its first forward).

    Row-parallel shards (tensor parallelism) all-reduce the exact int32 accumulator and the
    per-token absmax, so a sharded model computes bit for bit what one process computes.
    """

    def __init__(self, params: W8A8Params, out_dtype: torch.dtype, name: str = "", backend: str | None = None):
        super().__init__()
        self.params: W8A8Params | None = params
        self.out_dtype, self.name, self.backend = out_dtype, name, backend
        self.out_features = self.params.out_features
        self.reduce = None      # row-parallel: all-reduce sum of int32 accumulators
        self.reduce_max = None  # row-parallel: all-reduce max of per-token absmax
        self.kernel = None

    @property
    def row_parallel(self) -> bool:
        return self.reduce is not None

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], out_dtype: torch.dtype, name: str = "",
                     bias_float: torch.Tensor | None = None, backend: str | None = None) -> "W8A8MixLinear":
        """From a layer's stored tensors (names without the layer prefix)."""
        return cls(w8a8_mix.params_from_tensors(t, name, bias_float), out_dtype, name, backend)

    def _apply(self, fn, recurse=True):
        # .to(device) before prepare() moves the parameters; a prepared kernel stays where it was built
        if self.params is not None:
            self.params = W8A8Params(**{k: fn(v) for k, v in vars(self.params).items()})
        return super()._apply(fn, recurse)

    def prepare(self, backend: str | None = None) -> None:
        """Build the kernel (prepacking and the like) and let go of the parameters it does not keep."""
        self.kernel = kernels.build(self.params, self.out_dtype, backend or self.backend, self.reduce, self.reduce_max)
        self.params = None

    def forward(self, x: torch.Tensor, split: RowSplit | torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is None:
            self.prepare()
        shape = x.shape
        if len(shape) != 2:  # the runtime's rows come flat already: a decode step's ~200 calls skip this
            x = x.reshape(-1, shape[-1])
        if isinstance(split, torch.Tensor):
            y = self.kernel.apply_masked(x, split)
        else:
            y = self.kernel.apply(x, dynamic_rows(split, x.shape[0]))
        return y if len(shape) == 2 else y.reshape(*shape[:-1], y.shape[-1])


class W8A8DynamicLinear(W8A8MixLinear):
    """A W8A8_DYNAMIC linear (MoE models' experts and MLPs): every row on the dynamic path, whatever
    the split says, through the same kernel backends."""

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], out_dtype: torch.dtype, name: str = "",
                     bias_float: torch.Tensor | None = None, backend: str | None = None) -> "W8A8DynamicLinear":
        return cls(w8a8_dynamic.params_from_tensors(t, name, bias_float), out_dtype, name, backend)

    def forward(self, x: torch.Tensor, split: RowSplit | torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, None)


def fuse_linears(mods: list[nn.Module], name: str) -> nn.Module | None:
    """One linear computing several that read the same input (q/k/v, gate/up), outputs concatenated;
    None when they are of different kinds (one rolled back to float, say), row-parallel shards, or
    float layers that keep a rank's columns of the whole output."""
    if any(m.row_parallel or getattr(m, "columns", None) is not None for m in mods):
        return None
    if all(type(m) is FloatLinear for m in mods):
        biases = [m.bias if m.bias is not None else torch.zeros_like(m.weight[:, 0]) for m in mods]
        has_bias = any(m.bias is not None for m in mods)
        fused = FloatLinear(torch.cat([m.weight for m in mods]), torch.cat(biases) if has_bias else None)
        fused.batch_invariant = mods[0].batch_invariant
        return fused
    kind = type(mods[0])
    if kind not in (W8A8MixLinear, W8A8DynamicLinear) or not all(type(m) is kind and m.kernel is None for m in mods):
        return None
    params = w8a8_mix.concat([m.params for m in mods], [m.name for m in mods])
    return kind(params, mods[0].out_dtype, name, mods[0].backend)


def prepare_kernels(model: nn.Module, backend: str | None = None) -> None:
    """Prepare every W8A8_MIX linear of a model (once its weights are on their device)."""
    for m in model.modules():
        if isinstance(m, W8A8MixLinear) and m.kernel is None:
            m.prepare(backend)

"""The W8A8_MIX linear method: one vLLM linear (fused q/k/v or gate/up, or a single one), its
quantized members computed on one int8 weight with both SPEC §5 paths (kernels.py: PyTorch's
oneDNN int8 GEMM on CPU, vLLM's CUTLASS kernels on NVIDIA GPUs), its float members (a fused group split by
rollback, SPEC §7) as a float GEMM. The same method runs W8A8_DYNAMIC linears (a MoE model's dense
MLP, docs/moe.md): three stored tensors each, every row on the dynamic path.

The split between the paths reads the rows from the forward context (routing.py) and writes each
path's rows straight into the layer's output. Under vLLM's torch.compile tracing it runs as the
opaque custom op `torch.ops.vllm.pdmix_w8a8_mix_linear`; eager calls it directly.
"""

import itertools

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import (LinearMethodBase, RowParallelLinear,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter, PerTensorScaleParameter
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from pdmix.errors import PdmixError
from pdmix.schemes import w8a8_dynamic, w8a8_mix
from pdmix.vllm import kernels, routing

_LAYERS: dict[str, "W8A8MixLinearMethod"] = {}  # op key -> method, in this process
_keys = itertools.count()


@register_weight_loader_v2_supported_method
class W8A8MixLinearMethod(LinearMethodBase):
    def __init__(self, prefix: str, members: list[str], quantized: list[bool], dynamic: bool = False):
        self.prefix, self.members, self.quantized = prefix, members, quantized
        self.dynamic = dynamic  # W8A8_DYNAMIC members: no static tensors, every row dynamic
        self.key = f"{prefix}#{next(_keys)}"

    @property
    def scheme(self):
        return w8a8_dynamic if self.dynamic else w8a8_mix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs["weight_loader"]
        n, k, parts = sum(output_partition_sizes), input_size_per_partition, len(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        self.out_dtype = params_dtype

        def channel(dtype, *shape):
            return ChannelQuantScaleParameter(data=torch.empty(n, *shape, dtype=dtype), output_dim=0, weight_loader=loader)

        def per_tensor():
            return PerTensorScaleParameter(data=torch.zeros(parts, dtype=torch.float32), weight_loader=loader)

        layer.register_parameter("weight", ModelWeightParameter(
            data=torch.zeros(n, k, dtype=torch.int8), input_dim=1, output_dim=0, weight_loader=loader))
        layer.register_parameter("weight_scale", channel(torch.float32, 1))
        layer.register_parameter("weight_offset", channel(torch.float32, 1))
        if not self.dynamic:
            layer.register_parameter("deq_scale", channel(torch.float32))
            layer.register_parameter("quant_bias", channel(torch.int32))
            layer.register_parameter("input_scale", per_tensor())
            layer.register_parameter("input_offset", per_tensor())
        if not all(self.quantized):
            layer.register_parameter("weight_float", ModelWeightParameter(
                data=torch.zeros(n, k, dtype=params_dtype), input_dim=1, output_dim=0, weight_loader=loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        bounds = [0, *itertools.accumulate(layer.logical_widths)]
        rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        row_rank = layer.tp_rank if isinstance(layer, RowParallelLinear) else 0
        params, names = [], []
        for i, (name, q) in enumerate(zip(self.members, self.quantized)):
            if not q:
                continue
            r = rows[i]
            if layer.weight_offset[r].any():
                raise ValueError(f"pdmix: {name}.weight_offset is not zero; {self.scheme.NAME} weights are symmetric")
            t = {"weight": layer.weight.data[r], "weight_scale": layer.weight_scale.data[r]}
            if self.dynamic:  # a source bias stays a FLOAT tensor, added in the dynamic epilogue (rank 0 only)
                bias = getattr(layer, "bias", None)
                bias = None if bias is None or row_rank else bias.data[r]
                params.append(w8a8_dynamic.params_from_tensors(t, name, bias))
            else:
                t.update({"input_scale": layer.input_scale.data[i:i + 1], "input_offset": layer.input_offset.data[i:i + 1],
                          "deq_scale": layer.deq_scale.data[r],
                          "quant_bias": w8a8_mix.row_quant_bias(layer.quant_bias.data[r], row_rank)})
                params.append(w8a8_mix.params_from_tensors(t, name))
            names.append(name)
        try:
            p = w8a8_mix.concat(params, names) if len(params) > 1 else params[0]
        except PdmixError as e:
            raise ValueError(f"pdmix: {e}") from None
        for name in self.scheme.TENSORS:
            delattr(layer, name)  # the kernel holds what it needs; `p` holds the only int8 weight now
        self.kernel = kernels.make(p, self.out_dtype, current_platform)
        self.out_features = p.out_features
        self.float_cols = None
        if not all(self.quantized):
            fl = [rows[i] for i, q in enumerate(self.quantized) if not q]
            self.float_cols = torch.cat([torch.arange(r.start, r.stop) for r in fl])
            self.float_weight = layer.weight_float.data[self.float_cols].contiguous()
            del layer.weight_float
            order = [i for i, q in enumerate(self.quantized) if q] + [i for i, q in enumerate(self.quantized) if not q]
            cols = torch.cat([torch.arange(rows[i].start, rows[i].stop) for i in order])
            self.output_order = torch.argsort(cols)  # [quantized outputs, float outputs] -> member order
        _LAYERS[self.key] = self

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized members' outputs, each row on its path, written in place."""
        out = torch.empty((x.shape[0], self.out_features), dtype=self.out_dtype, device=x.device)
        if self.dynamic:
            self.kernel.dynamic(x, out)
            return out
        for prefill, rows in routing.parts(x.shape[0]):
            path = self.kernel.dynamic if prefill else self.kernel.static
            if isinstance(rows, slice):
                if rows.stop > rows.start:
                    path(x[rows], out[rows])
            else:  # rows of both kinds interleaved: gather, compute, scatter
                part = out.new_empty((rows.shape[0], self.out_features))
                path(x[rows], part)
                out[rows] = part
        return out

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # A quantized member's bias is in its kernel: quant_bias (SPEC §3) or, W8A8_DYNAMIC, bias_float.
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        # the custom op only where a graph is traced (it is opaque to the compiler); eager skips the dispatcher
        y = torch.ops.vllm.pdmix_w8a8_mix_linear(x, self.key) if torch.compiler.is_compiling() else self.forward_quantized(x)
        if self.float_cols is not None:
            yf = F.linear(x, self.float_weight, None if bias is None else bias[self.float_cols])
            y = torch.cat([y, yf], dim=1)[:, self.output_order]
        return y.reshape(*shape[:-1], y.shape[-1])


def _op(x: torch.Tensor, key: str) -> torch.Tensor:
    return _LAYERS[key].forward_quantized(x)


def _op_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], _LAYERS[key].out_features)


direct_register_custom_op("pdmix_w8a8_mix_linear", _op, fake_impl=_op_fake)

"""The W8A8_MIX linear method: one vLLM linear (fused q/k/v or gate/up, or a single one), its
quantized members computed on vLLM's int8 kernels, its float members (a fused group split by
rollback, SPEC §7) as a float GEMM.

Each quantized layer gets two kernels from vLLM's factory `init_int8_linear_kernel` (oneDNN on
CPU, CUTLASS on CUDA), each with its own prepacked weight:
- static (decode rows): asymmetric per-tensor activation, scale input_scale, zero point
  input_offset, weight scale deq_scale / input_scale, bias bias_float -> deq_scale * (acc + quant_bias);
- dynamic (prefill rows): symmetric per-token activation, weight scale weight_scale, bias bias_float.
The split between them happens inside the custom op `torch.ops.vllm.pdmix_w8a8_mix_linear`, which
reads the rows from the forward context (routing.py); as an opaque op it also survives
vLLM's torch.compile tracing.
"""

import itertools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.linear import (LinearMethodBase, RowParallelLinear,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter, PerTensorScaleParameter
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from pdmix.errors import PdmixError
from pdmix.schemes import w8a8_mix
from pdmix.vllm import routing

_LAYERS: dict[str, "W8A8MixLinearMethod"] = {}  # op key -> method, in this process
_keys = itertools.count()


def epilogue_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write. vLLM's kernels add the bias in their output dtype; m4's shifts
    make biases large next to the outputs they cancel against, and a bf16 bias then costs up to
    half a bf16 step of the bias per output (0.06 on SmolLM2's gate/up, 2-3% perplexity). On CPU the
    oneDNN kernel also writes fp32, so the GEMM runs with an fp32 bias and output and the result is
    rounded once, as SPEC §5 computes it. CUTLASS writes bf16/fp16 only."""
    return torch.float32 if current_platform.is_cpu() else out_dtype


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _kernel(params: w8a8_mix.W8A8Params, static: bool, out_dtype: torch.dtype, name: str):
    """One of vLLM's int8 linear kernels with the parameters of one path, on a module of its own
    (each kernel prepacks its weight and bakes its scales in). The CPU kernel takes its output
    dtype from torch's default dtype and the activation's dtype."""
    kernel = init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=static,
                                     input_symmetric=not static, module_name=name)
    m = torch.nn.Module()
    m.logical_widths = [params.out_features]
    param = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    m.weight = param(params.weight)
    if static:
        m.weight_scale = param(w8a8_mix.static_weight_scale(params).reshape(-1, 1))
        m.input_scale = param(params.input_scale.reshape(1))
        m.input_zero_point = param(params.input_offset.to(torch.int32).reshape(1))
    else:
        m.weight_scale = param(params.weight_scale.reshape(-1, 1).contiguous())
        m.register_parameter("input_scale", None)
        m.register_parameter("input_zero_point", None)
    m.register_parameter("azp_adj", None)
    m.bias = param(params.bias_float.to(out_dtype))  # the output dtype, as the kernels take it
    with _default_dtype(out_dtype):
        kernel.process_weights_after_loading(m)
    return kernel, m


@register_weight_loader_v2_supported_method
class W8A8MixLinearMethod(LinearMethodBase):
    def __init__(self, prefix: str, members: list[str], quantized: list[bool]):
        self.prefix, self.members, self.quantized = prefix, members, quantized
        self.key = f"{prefix}#{next(_keys)}"

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
                raise ValueError(f"pdmix: {name}.weight_offset is not zero; W8A8_MIX weights are symmetric (SPEC §3)")
            t = {"weight": layer.weight.data[r], "weight_scale": layer.weight_scale.data[r],
                 "input_scale": layer.input_scale.data[i:i + 1], "input_offset": layer.input_offset.data[i:i + 1],
                 "deq_scale": layer.deq_scale.data[r],
                 "quant_bias": w8a8_mix.row_quant_bias(layer.quant_bias.data[r], row_rank)}
            params.append(w8a8_mix.params_from_tensors(t, name))
            names.append(name)
        try:
            p = w8a8_mix.concat(params, names) if len(params) > 1 else params[0]
        except PdmixError as e:
            raise ValueError(f"pdmix: {e}") from None
        self.kernel_dtype = epilogue_dtype(self.out_dtype)
        self.static_kernel, self.static_layer = _kernel(p, True, self.kernel_dtype, self.prefix)
        self.dynamic_kernel, self.dynamic_layer = _kernel(p, False, self.kernel_dtype, self.prefix)
        self.out_features = p.out_features
        for name in ("weight", "weight_scale", "weight_offset", "deq_scale", "quant_bias", "input_scale", "input_offset"):
            delattr(layer, name)  # the kernels hold their own copies
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

    def static(self, x: torch.Tensor) -> torch.Tensor:
        y = self.static_kernel.apply_weights(self.static_layer, x.to(self.kernel_dtype), self.static_layer.bias)
        return y.to(self.out_dtype)

    def dynamic(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dynamic_kernel.apply_weights(self.dynamic_layer, x.to(self.kernel_dtype), self.dynamic_layer.bias)
        return y.to(self.out_dtype)

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized members' outputs, each row on its path."""
        mode = routing.mode()
        if mode != "pdmix":
            return self.dynamic(x) if mode == "dynamic" else self.static(x)
        prefill = routing.prefill_rows(x.shape[0])
        if prefill is None or bool(prefill.all()):
            return self.dynamic(x)
        if not bool(prefill.any()):
            return self.static(x)
        out = x.new_empty(x.shape[0], self.out_features)
        out[prefill] = self.dynamic(x[prefill])
        out[~prefill] = self.static(x[~prefill])
        return out

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # A stored float bias of a quantized member is not used: quant_bias carries it (SPEC §3).
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = torch.ops.vllm.pdmix_w8a8_mix_linear(x, self.key)
        if self.float_cols is not None:
            yf = F.linear(x, self.float_weight, None if bias is None else bias[self.float_cols])
            y = torch.cat([y, yf], dim=1)[:, self.output_order]
        return y.reshape(*shape[:-1], y.shape[-1])


def _op(x: torch.Tensor, key: str) -> torch.Tensor:
    return _LAYERS[key].forward_quantized(x)


def _op_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], _LAYERS[key].out_features)


direct_register_custom_op("pdmix_w8a8_mix_linear", _op, fake_impl=_op_fake)

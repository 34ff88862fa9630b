"""A MoE layer's W8A8_DYNAMIC experts (docs/moe.md) inside vLLM's RoutedExperts: the checkpoint's
per-expert int8 weights loaded once into vLLM's stacked layout (w13 = gate/up [E, 2I, H], w2 = down
[E, H, I]) with their per-channel scales, activations quantized per token on every row.

Two ways to run them, chosen once per layer:
- vLLM's own int8 fused MoE (`select_int8_moe_backend`: Triton on NVIDIA GPUs, the AMX kernel on
  x86 CPUs that have AMX), exactly as vLLM's compressed-tensors W8A8 int8 MoE method sets it up;
- elsewhere (x86 CPUs without AMX, where vLLM has no int8 MoE), pdmix's own: rows grouped by
  expert, each expert's gate/up and down through the plugin's linear kernels (kernels.py: pdmix's
  C linear on the stored weight, SPEC §5's dynamic path bit for bit), weighted and summed as
  pdmix's engine does (pdmix.models.moe.run_experts).
Routing (softmax, top-k, renormalization) is vLLM's router either way.
"""

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.oracle.int8 import (convert_to_int8_moe_kernel_format,
                                                              make_int8_moe_kernel, make_int8_moe_quant_config,
                                                              select_int8_moe_backend)
from vllm.model_executor.layers.quantization.utils.quant_utils import kInt8DynamicTokenSym, kInt8StaticChannelSym
from vllm.model_executor.utils import replace_parameter, set_weight_attrs
from vllm.platforms import current_platform

from pdmix.format.names import DESCRIPTION_FILE, FLOAT
from pdmix.models.moe import run_experts
from pdmix.schemes import w8a8_dynamic
from pdmix.vllm import kernels

PROJS = ("gate_proj", "up_proj", "down_proj")


def method_for(config, layer, prefix: str):
    """The method of the experts under `prefix` (model.layers.L.mlp.experts): all W8A8_DYNAMIC, or all
    float (vLLM's own unquantized method); a checkpoint with some experts rolled back is refused."""
    schemes = {config.scheme(f"{prefix}.{e}.{p}") for e in range(layer.global_num_experts) for p in PROJS}
    if schemes == {FLOAT}:
        return None
    if schemes != {w8a8_dynamic.NAME}:
        raise ValueError(f"pdmix: {DESCRIPTION_FILE}: the experts of {prefix} are labelled {' and '.join(sorted(schemes))}; "
                         f"vLLM's fused experts take one scheme per layer ({w8a8_dynamic.NAME} or {FLOAT})")
    return W8A8DynamicMoEMethod(layer.moe_config, prefix)


class W8A8DynamicMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, prefix: str):
        super().__init__(moe)
        self.prefix = prefix
        # (not `experts_cls`: vLLM's base class reads that attribute whenever it exists)
        try:
            self.int8_backend, self.vllm_experts = select_int8_moe_backend(
                config=moe, weight_key=kInt8StaticChannelSym, activation_key=kInt8DynamicTokenSym)
        except (NotImplementedError, ValueError):
            self.int8_backend = self.vllm_experts = None  # no vLLM int8 MoE for this platform: pdmix's own
        self.experts = None  # pdmix's own: [(w13 kernel, w2 kernel)] per expert

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        self.out_dtype = params_dtype
        i = intermediate_size_per_partition

        def param(name, *shape, dtype=torch.float32, **attrs):
            p = torch.nn.Parameter(torch.zeros(num_experts, *shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, {**extra_weight_attrs, **attrs})

        param("w13_weight", 2 * i, hidden_size, dtype=torch.int8)
        param("w2_weight", hidden_size, i, dtype=torch.int8)
        channel = {"quant_method": FusedMoeWeightScaleSupported.CHANNEL.value}
        for what in ("weight_scale", "weight_offset"):  # weight_offset: the stored zeros, checked after loading
            param(f"w13_{what}", 2 * i, 1, **channel)
            param(f"w2_{what}", hidden_size, 1, **channel)
        layer.w13_input_scale = layer.w2_input_scale = None  # per token, at run time

    def process_weights_after_loading(self, layer) -> None:
        for w in ("w13", "w2"):
            if getattr(layer, f"{w}_weight_offset").any():
                raise ValueError(f"pdmix: an expert weight_offset under {self.prefix} is not zero; "
                                 f"{w8a8_dynamic.NAME} weights are symmetric")
            delattr(layer, f"{w}_weight_offset")
        act = getattr(layer.activation, "value", layer.activation)
        if str(act).lower() != "silu":
            raise ValueError(f"pdmix: {self.prefix}: experts with activation {act!r}; W8A8_DYNAMIC experts run SiLU-gated MLPs")
        if self.int8_backend is not None:
            self._vllm_kernel(layer)
        else:
            if layer.local_num_experts != layer.global_num_experts:
                raise ValueError(f"pdmix: {self.prefix}: expert parallelism needs vLLM's int8 fused MoE, which this "
                                 f"platform lacks; run without --enable-expert-parallel (tensor parallelism works)")
            self.experts = [tuple(self._linear(layer, w, e) for w in ("w13", "w2")) for e in range(layer.local_num_experts)]

    def _linear(self, layer, w: str, e: int):
        """Expert e's half `w` as a plugin linear kernel on a view of the stacked int8 weight (no copy: packed,
        where pdmix's C linear packs, in the stacked tensor's own storage)."""
        t = {"weight": getattr(layer, f"{w}_weight").data[e], "weight_scale": getattr(layer, f"{w}_weight_scale").data[e]}
        return kernels.make(w8a8_dynamic.params_from_tensors(t, f"{self.prefix}.{e}.{w}"), self.out_dtype, current_platform,
                            in_place=True)

    def _vllm_kernel(self, layer) -> None:
        """vLLM's int8 fused MoE, set up as its compressed-tensors W8A8 int8 MoE method does."""
        w13, w2 = convert_to_int8_moe_kernel_format(int8_backend=self.int8_backend, w13=layer.w13_weight,
                                                    w2=layer.w2_weight, layer=layer, w13_scale=layer.w13_weight_scale)
        replace_parameter(layer, "w13_weight", w13)
        replace_parameter(layer, "w2_weight", w2)
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = make_int8_moe_kernel(int8_backend=self.int8_backend, moe_quant_config=self.moe_quant_config,
                                               moe_config=self.moe, experts_cls=self.vllm_experts,
                                               routing_tables=layer._expert_routing_tables())
        self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    def get_fused_moe_quant_config(self, layer):
        if self.int8_backend is None:
            return None
        return make_int8_moe_quant_config(int8_backend=self.int8_backend, w1_scale=layer.w13_weight_scale,
                                          w2_scale=layer.w2_weight_scale, a1_scale=None, a2_scale=None,
                                          per_act_token_quant=True, layer=layer)

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.experts[e]
        gate_up = rows.new_empty((rows.shape[0], w13.out_features))
        w13.dynamic(rows, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up  # in the model dtype, as pdmix's MLP
        out = rows.new_empty((rows.shape[0], w2.out_features))
        w2.dynamic(act, out)
        return out

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, shared_experts,
              shared_experts_input):
        if self.moe_kernel is not None:
            return self.moe_kernel.apply(hidden_states=x, w1=layer.w13_weight, w2=layer.w2_weight,
                                         topk_weights=topk_weights, topk_ids=topk_ids, activation=layer.activation,
                                         global_num_experts=layer.global_num_experts, expert_map=layer.expert_map,
                                         apply_router_weight_on_input=layer.apply_router_weight_on_input,
                                         shared_experts=shared_experts, shared_experts_input=shared_experts_input)
        return run_experts(x.contiguous(), topk_weights.to(x.dtype), topk_ids, len(self.experts), self._expert)

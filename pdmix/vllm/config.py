"""The "w8a8_mix" quantization method: vLLM hands it quant_model_description.json (every tensor
name -> "W8A8_MIX", "W8A8_DYNAMIC" (a MoE model's MLP linears, docs/moe.md) or "FLOAT", SPEC §2)
and asks it for each layer's method: linears here (linear.py), a MoE layer's experts in moe.py."""

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from pdmix.format.description import HEADER_KEYS
from pdmix.format.names import DESCRIPTION_FILE, FLOAT
from pdmix.schemes import w8a8_dynamic, w8a8_mix

NAME = "w8a8_mix"
# vLLM's fused linears and the checkpoint linears they hold, in output order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def members(prefix: str) -> list[str]:
    """Checkpoint names of the linears behind a vLLM linear: model.layers.0.self_attn.qkv_proj ->
    [...q_proj, ...k_proj, ...v_proj]; an unfused linear is its own member."""
    head, _, last = prefix.rpartition(".")
    return [f"{head}.{m}" for m in FUSED[last]] if last in FUSED else [prefix]


@register_quantization_config(NAME)
class W8A8MixConfig(QuantizationConfig):
    def __init__(self, types: dict[str, str]):
        super().__init__()
        self.types = types  # tensor name -> "W8A8_MIX" | "W8A8_DYNAMIC" | "FLOAT"

    def __repr__(self) -> str:
        n = sum(1 for name, kind in self.types.items() if kind != FLOAT and name.endswith(".weight"))
        return f"W8A8MixConfig({n} quantized linears)"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # CUTLASS int8 GEMM: Turing and newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [DESCRIPTION_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "W8A8MixConfig":
        types = {}
        for name, kind in config.items():
            if name in HEADER_KEYS or name == "quant_method":
                continue
            if w8a8_mix.is_label(kind):
                kind = w8a8_mix.NAME
            elif kind not in (w8a8_dynamic.NAME, FLOAT):
                raise ValueError(f"pdmix: {DESCRIPTION_FILE}: tensor {name} has unknown type {kind!r}")
            types[name] = kind
        if not any(k == w8a8_mix.NAME for k in types.values()):
            raise ValueError(f"pdmix: {DESCRIPTION_FILE} labels no tensor {w8a8_mix.NAME}")
        return cls(types)

    def scheme(self, linear: str) -> str:
        """A linear's label: "W8A8_MIX", "W8A8_DYNAMIC" or "FLOAT"."""
        return self.types.get(linear + ".weight", FLOAT)

    def is_quantized(self, linear: str) -> bool:
        return self.scheme(linear) != FLOAT

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            from pdmix.vllm.moe import method_for
            return method_for(self, layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        names = members(prefix)
        schemes = {self.scheme(n) for n in names} - {FLOAT}
        if not schemes:
            return UnquantizedLinearMethod()
        if len(schemes) > 1:
            raise ValueError(f"pdmix: {DESCRIPTION_FILE}: the linears fused into {prefix} ({', '.join(names)}) "
                             f"mix the schemes {' and '.join(sorted(schemes))}; one fused linear takes one scheme")
        from pdmix.vllm.linear import W8A8MixLinearMethod
        return W8A8MixLinearMethod(prefix, names, [self.is_quantized(n) for n in names], dynamic=schemes == {w8a8_dynamic.NAME})

    def checkpoint_name(self, name: str) -> str:
        """The float weight of a float member of a fused group that also has quantized members goes
        to that layer's `weight_float`; every other tensor keeps its name."""
        prefix, _, suffix = name.rpartition(".")
        if suffix == "weight" and self.types.get(name) == FLOAT and self.in_mixed_group(prefix):
            return prefix + ".weight_float"
        return name

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """A checkpoint tensor as the plugin's parameters take it; deq_scale decoded to fp32 (an fp16
        model stores its bits in int64)."""
        if name.endswith(".deq_scale"):
            tensor = w8a8_mix.decode_deq_scale(tensor)
        return self.checkpoint_name(name), tensor

    def in_mixed_group(self, linear: str) -> bool:
        head, _, last = linear.rpartition(".")
        for group in FUSED.values():
            if last in group:
                return any(self.is_quantized(f"{head}.{m}") for m in group)
        return False

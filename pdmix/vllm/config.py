"""The "w8a8_mix" quantization method: vLLM hands it quant_model_description.json (every tensor
name -> "W8A8_MIX" or "FLOAT", SPEC §2) and asks it for each layer's method."""

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from pdmix.format.description import HEADER_KEYS
from pdmix.format.names import DESCRIPTION_FILE, FLOAT
from pdmix.schemes import w8a8_mix

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
        self.types = types  # tensor name -> "W8A8_MIX" | "FLOAT"

    def __repr__(self) -> str:
        n = sum(1 for name, kind in self.types.items() if kind == w8a8_mix.NAME and name.endswith(".weight"))
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
            elif kind != FLOAT:
                raise ValueError(f"pdmix: {DESCRIPTION_FILE}: tensor {name} has unknown type {kind!r}")
            types[name] = kind
        if not any(k == w8a8_mix.NAME for k in types.values()):
            raise ValueError(f"pdmix: {DESCRIPTION_FILE} labels no tensor {w8a8_mix.NAME}")
        return cls(types)

    def is_quantized(self, linear: str) -> bool:
        return self.types.get(linear + ".weight") == w8a8_mix.NAME

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = members(prefix)
        quantized = [self.is_quantized(n) for n in names]
        if not any(quantized):
            return UnquantizedLinearMethod()
        from pdmix.vllm.linear import W8A8MixLinearMethod
        return W8A8MixLinearMethod(prefix, names, quantized)

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

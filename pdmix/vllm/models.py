"""vLLM's Llama, Qwen2, Qwen3 and Qwen3-MoE with what a W8A8_MIX checkpoint adds, registered under the same
architecture names (for any other checkpoint they are vLLM's own classes, unchanged):

- the biases m4 outlier suppression leaves (SPEC §6): RMSNorm + bias, and a bias on linears that
  vLLM builds without one (Llama's q/k/v, gate/up). vLLM's loader skips unexpected `.bias`
  tensors without a word, and a model that drops them produces garbage;
- loading that places every tensor of the checkpoint, or names the first one it could not place.
"""

import re

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.utils import set_weight_attrs

from pdmix.format.names import DESCRIPTION_FILE
from pdmix.kernels import cpu_norm
from pdmix.vllm.config import W8A8MixConfig

# a checkpoint expert's tensor -> the stacked parameter vLLM's RoutedExperts loads it into (vLLM 0.32
# reports it under the MoE runner's `routed_experts`)
EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.")
STACKED = {"gate_proj": "w13_", "up_proj": "w13_", "down_proj": "w2_"}


class BiasedRMSNorm(RMSNorm):
    """rmsnorm(x) * weight + bias, the bias added in fp32 to the rounded norm output.

    On CPU, where pdmix's C library is built, it is pdmix's engine's norm (kernels/cpu_norm.py: one C
    call, torch's roundings, the bias inside) on the residual stream as the engine keeps it (the sum
    rounded to the model dtype, then normalized): about ten torch ops fewer per norm, 61 norms a
    SmolLM2 step. Elsewhere vLLM's RMSNorm, then the bias."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32), requires_grad=False)
        # asked here: a graph being traced cannot build the library
        self.in_c = cpu_norm.available() and self.has_weight and self.variance_size_override is None

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return (y.float() + self.bias).to(y.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.in_c and cpu_norm.usable(x, self.weight):
            if residual is not None:
                x = residual = x + residual
            norm = torch.ops.pdmix.rms_norm if torch.compiler.is_compiling() else cpu_norm.rms_norm
            y = norm(x, self.weight, self.bias, self.variance_epsilon)
            return y if residual is None else (y, residual)
        if residual is None:
            return self._add_bias(super().forward(x))
        y, residual = super().forward(x, residual)
        return self._add_bias(y), residual


class W8A8MixModel:
    """Mixed into a vLLM causal LM class; inert unless its quant config is W8A8MixConfig."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.w8a8_mix = vllm_config.quant_config if isinstance(vllm_config.quant_config, W8A8MixConfig) else None
        if self.w8a8_mix is not None:
            for name in self.w8a8_mix.types:
                if name.endswith(".bias"):
                    self._make_room_for_bias(name)

    def _vllm_name(self, name: str) -> str | None:
        return self.hf_to_vllm_mapper.map_name(name)

    def _placed(self, name: str, loaded: set[str]) -> bool:
        expert = EXPERT.search(name)
        if expert is None:
            return self._vllm_name(name) in loaded
        stacked = STACKED[expert.group(1)]
        return any(EXPERT.sub(f".experts.{runner}{stacked}", name) in loaded for runner in ("", "routed_experts."))

    def _make_room_for_bias(self, name: str) -> None:
        mapped = self._vllm_name(name)
        if mapped is None:
            return
        path, _, _ = mapped.rpartition(".")
        try:
            module = self.get_submodule(path)
        except AttributeError:
            return  # not in this model (another pipeline stage): load_weights names it if it stays unplaced
        if isinstance(module, RMSNorm) and not isinstance(module, BiasedRMSNorm):
            parent, _, attr = path.rpartition(".")
            setattr(self.get_submodule(parent), attr, BiasedRMSNorm(module.hidden_size, module.variance_epsilon))
        elif isinstance(module, LinearBase) and getattr(module, "bias", None) is None:
            rows = module.output_size_per_partition
            bias = nn.Parameter(torch.zeros(rows, dtype=torch.get_default_dtype()), requires_grad=False)
            module.bias = bias
            set_weight_attrs(bias, {"output_dim": 0, "weight_loader": module.weight_loader})

    def load_weights(self, weights):
        if self.w8a8_mix is None:
            return super().load_weights(weights)
        cfg, seen = self.w8a8_mix, {}  # seen: checkpoint name -> the name it was loaded as

        def prepared():
            for name, tensor in weights:
                mapped, tensor = cfg.checkpoint_tensor(name, tensor)
                seen[name] = mapped
                yield mapped, tensor

        loaded = super().load_weights(prepared())
        tied = getattr(self.config, "tie_word_embeddings", False)
        for name, mapped in seen.items():
            if tied and name.startswith("lm_head."):
                continue  # vLLM ties it to the embedding
            if not self._placed(mapped, loaded):
                raise ValueError(f"pdmix: checkpoint tensor {name} has no place in vLLM's {type(self).__name__}; "
                                 f"refusing to run without it")
        missing = sorted(set(cfg.types) - set(seen))
        if missing:
            raise ValueError(f"pdmix: {len(missing)} tensor(s) of {DESCRIPTION_FILE} are not in the weight files, "
                             f"e.g. {missing[0]}")
        return loaded


class W8A8MixLlamaForCausalLM(W8A8MixModel, LlamaForCausalLM):
    pass


class W8A8MixQwen2ForCausalLM(W8A8MixModel, Qwen2ForCausalLM):
    pass


class W8A8MixQwen3ForCausalLM(W8A8MixModel, Qwen3ForCausalLM):
    pass


class W8A8MixQwen3MoeForCausalLM(W8A8MixModel, Qwen3MoeForCausalLM):
    pass


ARCHITECTURES = {"LlamaForCausalLM": W8A8MixLlamaForCausalLM, "Qwen2ForCausalLM": W8A8MixQwen2ForCausalLM,
                 "Qwen3ForCausalLM": W8A8MixQwen3ForCausalLM, "Qwen3MoeForCausalLM": W8A8MixQwen3MoeForCausalLM}


def register() -> None:
    from vllm import ModelRegistry
    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{cls.__name__}")

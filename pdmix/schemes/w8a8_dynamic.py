"""The W8A8_DYNAMIC scheme (docs/moe.md): per-channel symmetric int8 weights, activations quantized
dynamically per token on every row, prefill and decode alike. MoE checkpoints in the W8A8_MIX format
use it for their MLP linears (experts, and a dense layer's MLP): msModelSlim's `"*.mlp.*":
"w8a8_dynamic"`, which is also the expert format vLLM's int8 fused MoE takes.

Three stored tensors per linear, each labelled "W8A8_DYNAMIC" in the description: `weight` int8 [n, k],
`weight_scale` [n, 1] and `weight_offset` [n, 1] (zeros) in the model dtype (or fp32). There is no
static part (no input_scale/input_offset/deq_scale/quant_bias), and a bias the source layer had stays a
FLOAT `bias` tensor. At run time a layer is a `W8A8Params` whose static fields are inert (kernels are
only asked for the dynamic path), so the kernel backends run it unchanged.
"""

import torch

from pdmix.errors import PdmixError
from pdmix.schemes.w8a8_mix import PARAM_DTYPES, W8A8Params

NAME = "W8A8_DYNAMIC"
TENSORS = ("weight", "weight_scale", "weight_offset")
TENSOR_SPEC = {  # beside "weight": I8 [n, k]
    "weight_scale": (PARAM_DTYPES, lambda n: [n, 1]),
    "weight_offset": (PARAM_DTYPES, lambda n: [n, 1]),
}
PER_CHANNEL = TENSORS


def params_from_tensors(t: dict[str, torch.Tensor], name: str = "", bias: torch.Tensor | None = None) -> W8A8Params:
    """Runtime form: the dynamic path's weight, per-channel scale and float bias (zeros if none)."""
    w = t["weight"]
    if w.dtype != torch.int8 or w.dim() != 2:
        raise PdmixError(f"{name}.weight: expected a 2-D int8 tensor, got {w.dtype} {list(w.shape)}")
    n = w.shape[0]
    scale = t["weight_scale"].to(torch.float32).reshape(-1)
    one, zero = torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    return W8A8Params(weight=w.contiguous(), weight_scale=scale, input_scale=one, input_offset=zero,
                      deq_scale=scale.clone(), quant_bias=torch.zeros(n, dtype=torch.int32),
                      bias_float=torch.zeros(n) if bias is None else bias.to(torch.float32).reshape(-1))


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three tensors of a float weight [n, k] (model dtype), as msModelSlim computes them: the
    W8A8_MIX weight quantization (SPEC §4), nothing else."""
    from pdmix.quant.arithmetic import quantize_weight
    q, ws = quantize_weight(w)
    return {"weight": q, "weight_scale": ws, "weight_offset": torch.zeros_like(ws)}


def shard_column(t: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """A column-parallel rank's tensors: every one follows the weight's output rows."""
    step = t["weight"].shape[0] // size
    return {s: v.narrow(0, rank * step, step).contiguous() for s, v in t.items()}

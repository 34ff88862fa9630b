"""SPEC §4: how the quantizer turns a float linear plus observed activation ranges into the seven
tensors of a W8A8_MIX linear. Arithmetic is in the model dtype (bf16 or fp16) unless noted, as
msModelSlim does it, so that the output matches its files bit for bit."""

from dataclasses import dataclass

import torch

from pdmix.schemes.w8a8_mix import encode_deq_scale, weight_row_sums

FP32_EPS = torch.finfo(torch.float32).eps


@dataclass
class QuantizedLinear:
    weight: torch.Tensor         # int8 [n, k]
    weight_scale: torch.Tensor   # dtype [n, 1]
    weight_offset: torch.Tensor  # dtype [n, 1], zeros
    input_scale: torch.Tensor    # dtype [1]
    input_offset: torch.Tensor   # dtype [1], integer valued
    deq_scale: torch.Tensor      # fp32 [n] (int64 fp32 bits for an fp16 model)
    quant_bias: torch.Tensor     # int32 [n]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.__dict__.items()}


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale max|w| / 127, [n,1] in w.dtype."""
    return (torch.maximum(w.amax(dim=1, keepdim=True), -w.amin(dim=1, keepdim=True)) / 127).clamp(min=FP32_EPS)


def quantize_weight(w: torch.Tensor, rows_per_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (weight int8 [n,k], weight_scale [n,1] in w.dtype).

    Rows are independent, so they are done a chunk at a time: the same bits, bounded temporaries.
    """
    scale = weight_scale(w)
    q = torch.empty(w.shape, dtype=torch.int8)
    for r in range(0, w.shape[0], rows_per_chunk):
        # round is half-to-even, as msModelSlim's torch.round
        q[r:r + rows_per_chunk] = (w[r:r + rows_per_chunk] / scale[r:r + rows_per_chunk]).round_().clamp_(-127, 127)
    return q, scale


def static_activation_params(mins: torch.Tensor, maxs: torch.Tensor, dtype: torch.dtype):
    """(input_scale [1], input_offset [1]) from the per-forward minima and maxima of a linear's input."""
    mn = mins.to(dtype).mean().clamp(max=0)
    mx = maxs.to(dtype).mean().clamp(min=0)
    scale = ((mx - mn) / 255).clamp(min=FP32_EPS)
    offset = -128 - torch.round(mn / scale)
    return scale.reshape(1), offset.reshape(1)


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                    input_offset: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedLinear:
    """The seven tensors of SPEC §3 for float weight w [n,k] (model dtype) and optional bias [n].
    weight: (int8 weight, weight_scale) rounded otherwise (GPTQ); default minmax's quantize_weight(w)."""
    dtype = w.dtype
    q, ws = weight if weight is not None else quantize_weight(w)
    deq = (input_scale * ws).reshape(-1).to(torch.float32)
    b32 = torch.zeros(w.shape[0], dtype=torch.float32) if bias is None else bias.to(dtype).to(torch.float32)
    wsum = weight_row_sums(q)
    qbias = torch.round(b32 / deq - wsum * input_offset.to(torch.float32)).to(torch.int32)
    return QuantizedLinear(
        weight=q, weight_scale=ws, weight_offset=torch.zeros_like(ws),
        input_scale=input_scale.to(dtype).clone(), input_offset=input_offset.to(dtype).clone(),
        deq_scale=encode_deq_scale(deq, dtype), quant_bias=qbias,
    )

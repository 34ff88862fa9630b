"""The W8A8_MIX scheme (SPEC §2-§5, §8): per-channel symmetric int8 weights; activations dynamic per
token on prompt rows and static per tensor on decode rows.

What lives here is what every engine needs to agree on: the seven stored tensors and their legal
dtypes and shapes, the deq_scale encoding, the float bias recovered from quant_bias, the runtime
form of a layer (`W8A8Params`), fusing layers that read one input, and how tensor parallelism
shards the stored tensors. Kernels (pdmix.kernels) compute with `W8A8Params`; the quantizer
(pdmix.quant.arithmetic) writes what `TENSORS` describes.
"""

from dataclasses import dataclass

import torch

from pdmix.errors import PdmixError

NAME = "W8A8_MIX"
LEGACY_NAMES = ("W8A8",)  # older writers label the same tensors "W8A8"

# The seven tensors of one quantized linear, in the order msModelSlim writes them.
TENSORS = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale", "quant_bias")
# Legal safetensors dtypes and shapes for a weight [n, k] (SPEC §3): scales in the model dtype or fp32,
# deq_scale fp32 or (fp16 models) int64 holding the fp32 bits.
PARAM_DTYPES = ("BF16", "F16", "F32")
TENSOR_SPEC = {  # beside "weight": I8 [n, k]
    "weight_scale": (PARAM_DTYPES, lambda n: [n, 1]),
    "weight_offset": (PARAM_DTYPES, lambda n: [n, 1]),
    "input_scale": (PARAM_DTYPES, lambda n: [1]),
    "input_offset": (PARAM_DTYPES, lambda n: [1]),
    "deq_scale": (("F32", "I64"), lambda n: [n]),
    "quant_bias": (("I32",), lambda n: [n]),
}
# Sharded with the output channels by a column-parallel layer; per tensor (input_*) or, in a
# row-parallel layer, replicated (SPEC §8).
PER_CHANNEL = ("weight", "weight_scale", "weight_offset", "deq_scale", "quant_bias")

TINY = torch.finfo(torch.float32).tiny


def is_label(kind: str) -> bool:
    """Whether a description label names this scheme (legacy "W8A8" included)."""
    return kind == NAME or kind in LEGACY_NAMES


def encode_deq_scale(deq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 deq_scale as stored: fp32 for bf16 models, int64 holding the fp32 bits for fp16 ones."""
    if dtype == torch.float16:
        return deq.view(torch.int32).to(torch.int64)
    return deq


def decode_deq_scale(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_deq_scale (accepts either storage)."""
    if stored.dtype == torch.int64:
        return stored.to(torch.int32).view(torch.float32)
    return stored.to(torch.float32)


def weight_row_sums(weight: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """sum_k(weight) per output row, exact, as fp32 [n]. In row chunks: a whole-tensor sum with an
    int dtype would first materialize a widened copy of the weight."""
    return torch.cat([c.to(torch.int32).sum(dim=1) for c in weight.split(rows_per_chunk)]).to(torch.float32)


def recover_bias(deq_scale: torch.Tensor, quant_bias: torch.Tensor, input_offset: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """bias_float = deq_scale * (quant_bias + input_offset * sum_k(weight)), fp32 [n] (SPEC §5)."""
    wsum = weight_row_sums(weight)
    return deq_scale.to(torch.float32) * (quant_bias.to(torch.float32) + input_offset.to(torch.float32) * wsum)


@dataclass
class W8A8Params:
    """A W8A8_MIX linear in runtime form: what the kernels compute with (SPEC §5)."""
    weight: torch.Tensor        # int8 [n, k]
    weight_scale: torch.Tensor  # fp32 [n]
    input_scale: torch.Tensor   # fp32 scalar
    input_offset: torch.Tensor  # fp32 scalar, integer valued
    deq_scale: torch.Tensor     # fp32 [n]
    quant_bias: torch.Tensor    # int32 [n]
    bias_float: torch.Tensor    # fp32 [n], the dynamic path's bias, recovered from quant_bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def to(self, device) -> "W8A8Params":
        return W8A8Params(**{k: v.to(device) for k, v in self.__dict__.items()})


def params_from_tensors(t: dict[str, torch.Tensor], name: str = "",
                        bias_float: torch.Tensor | None = None) -> W8A8Params:
    """Runtime form of a layer's stored tensors (any SPEC §3 dtype variant). bias_float defaults to the
    one recovered from this weight; a row-parallel shard passes the one of the whole weight."""
    w = t["weight"]
    if w.dtype != torch.int8 or w.dim() != 2:
        raise PdmixError(f"{name}.weight: expected a 2-D int8 tensor, got {w.dtype} {list(w.shape)}")
    input_offset = t["input_offset"].to(torch.float32).reshape(())
    deq_scale = decode_deq_scale(t["deq_scale"]).reshape(-1)
    quant_bias = t["quant_bias"].to(torch.int32).reshape(-1)
    if bias_float is None:
        bias_float = recover_bias(deq_scale, quant_bias, input_offset, w)
    return W8A8Params(weight=w.contiguous(), weight_scale=t["weight_scale"].to(torch.float32).reshape(-1),
                      input_scale=t["input_scale"].to(torch.float32).reshape(()), input_offset=input_offset,
                      deq_scale=deq_scale, quant_bias=quant_bias, bias_float=bias_float)


def static_weight_scale(p: W8A8Params) -> torch.Tensor:
    """The weight scale that makes an int8 GEMM with activation scale input_scale and zero point
    input_offset compute the static path: x_scale * w_scale = deq_scale, the file's bf16-rounded
    product (not input_scale * weight_scale). With bias_float as the GEMM's bias,
    deq_scale * (x_q @ W^T - input_offset * sum_k W) + bias_float = deq_scale * (acc + quant_bias)."""
    return (p.deq_scale / p.input_scale).contiguous()


def concat(members: list[W8A8Params], names: list[str]) -> W8A8Params:
    """One layer computing several that read the same input (q/k/v, gate/up), outputs concatenated.

    The members must share input_scale/input_offset (SPEC §7): the fused layer quantizes its input
    once, so a checkpoint where they differ is refused rather than computed wrongly.
    """
    first = members[0]
    for m, name in zip(members[1:], names[1:]):
        if not (torch.equal(m.input_scale, first.input_scale) and torch.equal(m.input_offset, first.input_offset)):
            raise PdmixError(f"{name}: input_scale/input_offset differ from {names[0]}'s; they read the same "
                             f"input and must share them (SPEC §7)")
    cat = lambda field: torch.cat([getattr(m, field) for m in members])
    return W8A8Params(weight=cat("weight"), weight_scale=cat("weight_scale"), input_scale=first.input_scale,
                      input_offset=first.input_offset, deq_scale=cat("deq_scale"), quant_bias=cat("quant_bias"),
                      bias_float=cat("bias_float"))


def _slice(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    step = t.shape[dim] // size
    return t.narrow(dim, rank * step, step).contiguous()


def shard_column(t: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """A column-parallel rank's stored tensors (SPEC §8): per-channel tensors follow the weight's
    output rows; input_scale/input_offset are replicated."""
    return {s: _slice(v, 0, rank, size) if s in PER_CHANNEL else v for s, v in t.items()}


def row_quant_bias(quant_bias: torch.Tensor, rank: int) -> torch.Tensor:
    """A row-parallel rank's quant_bias (SPEC §8): whole on rank 0, zero elsewhere. A rank's
    recovered bias_float then uses its own weight columns, so the ranks' biases sum to the layer's
    on both paths."""
    return quant_bias if rank == 0 else torch.zeros_like(quant_bias)

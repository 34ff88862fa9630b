"""Which decoder layers run a decode-only step's attention half as one C call (kernels/cpu_block.py),
and that call's per-step inputs.

A layer qualifies when everything in that half already runs in C in the runtime: a bf16 model on the
CPU with pdmix's C library, q/k/v fused into one linear (Qwen3's per-head q/k norms included), and each
of q/k/v and o either a W8A8_MIX linear on the cpu_int8 backend or a rolled-back bf16 one, with no
tensor parallelism. Other layers, prompt rows and steps that mix them run the layer's Python form,
which the C call matches bit for bit (tests/test_decode_block.py). Where every layer has its MLP in C
too, the model's whole stack is one call (`DecodeStack`).
"""

import torch
import torch.nn.functional as F

from pdmix.kernels import cpu_attention, cpu_block, cpu_float
from pdmix.kernels.clib import library
from pdmix.kernels.s8gemm import W8A8Linear
from pdmix.models.layers import MLP, DecoderLayer, RMSNorm
from pdmix.models.linear import FloatLinear, W8A8MixLinear, dynamic_rows


def linear_form(m):
    """The C form of one linear (a W8A8Linear, or a bf16 float (weight, bias)), or None."""
    if isinstance(m, W8A8MixLinear) and not m.row_parallel:
        c = getattr(m.kernel, "linear", None)  # the cpu_int8 backend's whole linear in C
        return c if isinstance(c, W8A8Linear) and c.out_dtype == torch.bfloat16 else None
    if type(m) is FloatLinear and not m.row_parallel and m.columns is None and m.batch_invariant:
        ok = m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() and cpu_float.usable(m.weight[:1], m.weight)
        return (m.weight, m.bias) if ok else None
    return None


def norm_form(n: RMSNorm):
    if not (n.in_c and n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous()):
        return None
    return n.weight, None if n.bias is None else n.bias.float().contiguous(), n.eps


class DecodeLayer:
    """A layer's decode-only step in C calls: its attention half, and where the MLP's gate/up and down
    linears have C forms too, those (gate_up inside the first call, down with the residual in a second);
    silu(gate) * up stays torch's (MLP.activation)."""

    def __init__(self, block: cpu_block.AttentionBlock, mlp):
        self.block, self.mlp, self.head_dim = block, mlp, block.head_dim

    def __call__(self, x, step, cache_k, cache_v, split) -> torch.Tensor:
        n_dynamic = dynamic_rows(split, x.shape[0])
        h, y = self.block(x, step, cache_k, cache_v, n_dynamic)
        if self.block.down_struct is None:
            return h + self.mlp(y, split)
        return self.block.down(self.mlp.activation(y), h, n_dynamic)


def decode_layer(layer: DecoderLayer) -> DecodeLayer | None:
    a = layer.self_attn
    if library()[0] is None or a.qkv_proj is None:
        return None
    forms = (norm_form(layer.input_layernorm), norm_form(layer.post_attention_layernorm),
             linear_form(a.qkv_proj), linear_form(a.o_proj))
    qk_norms = None if a.q_norm is None else (norm_form(a.q_norm), norm_form(a.k_norm))
    if any(f is None for f in forms + (qk_norms or ())) or not layer.input_layernorm.weight.is_cpu:
        return None
    mlp, gate_up, down = layer.mlp, None, None
    if type(mlp) is MLP and mlp.gate_up_proj is not None:
        gate_up, down = linear_form(mlp.gate_up_proj), linear_form(mlp.down_proj)
        if gate_up is None or down is None:
            gate_up = down = None
    block = cpu_block.AttentionBlock(*forms, (a.num_heads, a.num_kv_heads, a.head_dim),
                                     layer.input_layernorm.weight.shape[0], gate_up, down, qk_norms)
    return DecodeLayer(block, mlp)


class DecodeStack:
    """A decode-only step's whole decoder stack in one C call (kernels/cpu_block.Stack)."""

    def __init__(self, layers: list[DecodeLayer], silu: torch.Tensor):
        self.stack = cpu_block.Stack([d.block for d in layers], silu)
        self.head_dim = self.stack.head_dim

    def __call__(self, x, step, cache, split) -> torch.Tensor:
        n_dynamic = dynamic_rows(split, x.shape[0])
        return self.stack(x, step, cache, n_dynamic)


def silu_table() -> torch.Tensor | None:
    """torch's bf16 silu of every bf16 value, indexed by its bits (int16 [65536]), for the C stack's
    silu(gate) * up; None where torch's vectorized and element-by-element loops differ on a value (the
    two can differ, std::exp against Sleef's), since a row's elements fall in either depending on its
    width. Both are taken here: the table from the contiguous tensor, the other from a strided view."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    vectorized, each = F.silu(x), F.silu(torch.stack([x, x], 1).view(-1)[::2]).contiguous()
    nan = vectorized.isnan() & each.isnan()  # NaN in, or -inf: the payloads may differ, NaN either way
    if not torch.equal(vectorized.view(torch.int16)[~nan], each.view(torch.int16)[~nan]):
        return None
    return vectorized.view(torch.int16)


def attach(model) -> int:
    """Give each qualifying layer its C form (DecoderLayer.decode_block), and the model its one-call
    stack (CausalLM.decode_stack) where every layer has its MLP in C; returns how many layers."""
    forms = [decode_layer(layer) for layer in model.layers]
    for layer, form in zip(model.layers, forms):
        layer.decode_block = form
    whole = forms and all(f is not None and f.block.down_struct is not None for f in forms)
    silu = silu_table() if whole else None
    model.decode_stack = DecodeStack(forms, silu) if silu is not None else None
    return sum(f is not None for f in forms)


def step_inputs(meta, cache, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> "cpu_block.DecodeStep | None":
    """A decode-only step's inputs for the C call (None for a step with prompt rows, or a cache or rows
    the C attention does not take)."""
    g = meta.decode
    if meta.prefill or g is None or cos.dtype != torch.bfloat16 or not cpu_attention.usable(cos, cache.k[0]):
        return None
    return cpu_block.DecodeStep(cos, sin, meta.slot_mapping.flat, g.block_tables, g.lengths, cache.block_size,
                                cache.k[0].dtype, head_dim ** -0.5)

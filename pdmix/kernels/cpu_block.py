"""A decode step's decoder layer in two C calls (csrc/decode_block.c). The first runs input norm,
q/k/v projection (and Qwen3's q/k norms), rotary, the cache write and attention, o projection, the
residual add, the post-attention norm and gate/up; the second the down projection and the residual
add (silu(gate) * up between them stays torch's). Each step is the C function its own call runs, so
the bits are the separate calls'. About twenty Python-level calls and torch ops a layer become two
(SmolLM2, one thread: 11.6 -> 8.5 ms a decode step). Where every layer has both calls, the whole
stack is one (`Stack`), with silu(gate) * up by a table of torch's own bf16 silu.

Built by pdmix/runtime/decode_block.py for the layers it fits (bf16, the C library, fused q/k/v);
this module only holds the C structs and makes the calls.
"""

import ctypes
import weakref

import torch

from pdmix.kernels.clib import library
from pdmix.kernels.s8gemm import W8A8Linear

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class BlockLinear(ctypes.Structure):
    _fields_ = [("q8", _p), ("w", _p), ("bias", _p), ("n", _i64), ("k", _i64)]


class BlockNorm(ctypes.Structure):
    _fields_ = [("w", _p), ("bias", _p), ("eps", _f32)]


class AttentionBlockStruct(ctypes.Structure):
    _fields_ = [("input", BlockNorm), ("post", BlockNorm), ("q", BlockNorm), ("k", BlockNorm), ("qkv", BlockLinear), ("o", BlockLinear),
                ("gate_up", BlockLinear), ("hidden", _i64), ("H", _i64), ("KV", _i64), ("D", _i64)]


class DecodeStepStruct(ctypes.Structure):
    _fields_ = [("cos", _p), ("sin", _p), ("slots", _p), ("tables", _p), ("width", _i64), ("lengths", _p),
                ("block", _i64), ("cache_bf16", ctypes.c_int), ("scale", _f32)]


class DecodeStep:
    """A decode-only step's attention inputs, shared by its layers: cos and sin [T, D] bf16, each row's
    cache slot, block table and length (the new token included)."""

    def __init__(self, cos, sin, slots, tables, lengths, block_size: int, cache_dtype: torch.dtype, scale: float):
        self.tensors = [t.contiguous() for t in (cos, sin, slots, tables, lengths)]
        cos, sin, slots, tables, lengths = self.tensors
        self.struct = DecodeStepStruct(cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                                       tables.shape[1], lengths.data_ptr(), block_size,
                                       cache_dtype == torch.bfloat16, scale)
        self.ref = ctypes.byref(self.struct)


def norm_struct(weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> BlockNorm:
    return BlockNorm(weight.data_ptr(), None if bias is None else bias.data_ptr(), eps)


def linear_struct(linear: "W8A8Linear | tuple[torch.Tensor, torch.Tensor | None]") -> BlockLinear:
    """A W8A8_MIX linear's C form, or a bf16 (weight, bias or None)."""
    if isinstance(linear, W8A8Linear):
        return BlockLinear(ctypes.addressof(linear._struct), None, None, linear.n, linear.k)
    w, b = linear
    return BlockLinear(None, w.data_ptr(), None if b is None else b.data_ptr(), w.shape[0], w.shape[1])


class AttentionBlock:
    """The calls; keeps every tensor they point to alive (norm weights and fp32 biases, bf16 linears and
    biases, the W8A8Linears) for as long as it lives. Shapes: heads (H, KV, D), hidden. With gate_up and
    down (the MLP's linears), the block's second output is gate_up's, and `down` finishes the layer;
    qk_norms: Qwen3's per-head q and k norms, (weight, bias, eps) each."""

    def __init__(self, input_norm: tuple, post_norm: tuple, qkv, o, heads: tuple[int, int, int], hidden: int,
                 gate_up=None, down=None, qk_norms: tuple | None = None):
        self.keep = [input_norm, post_norm, qkv, o, gate_up, down, qk_norms]
        qn, kn = (BlockNorm(), BlockNorm()) if qk_norms is None else (norm_struct(*n) for n in qk_norms)
        self.struct = AttentionBlockStruct(norm_struct(*input_norm), norm_struct(*post_norm), qn, kn, linear_struct(qkv),
                                           linear_struct(o), BlockLinear() if gate_up is None else linear_struct(gate_up),
                                           hidden, *heads)
        self.down_struct = None if down is None else linear_struct(down)
        self.ref, self.head_dim = ctypes.byref(self.struct), heads[2]
        self.out_features = hidden if gate_up is None else self.struct.gate_up.n

    def __call__(self, x: torch.Tensor, step: DecodeStep, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 n_dynamic: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] bf16 -> (h, y): the residual after attention, and its post-attention norm (or
        gate_up's projection of that)."""
        x = x.contiguous()
        h, y = torch.empty_like(x), x.new_empty((x.shape[0], self.out_features))
        if library()[0].pdmix_attention_block(self.ref, step.ref, x.data_ptr(), x.shape[0], n_dynamic,
                                              cache_k.data_ptr(), cache_v.data_ptr(), h.data_ptr(), y.data_ptr(),
                                              torch.get_num_threads()):
            raise MemoryError("decode attention block: no memory for its scratch rows")
        return h, y

    def down(self, act: torch.Tensor, residual: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        """residual + down(act), [T, hidden] bf16."""
        act = act.contiguous()
        out = torch.empty_like(residual)
        if library()[0].pdmix_linear_residual(ctypes.byref(self.down_struct), act.data_ptr(), act.shape[0], n_dynamic,
                                              residual.data_ptr(), out.data_ptr(), torch.get_num_threads()):
            raise MemoryError("decode block: no memory for the down projection's rows")
        return out


class DecodeLayerStruct(ctypes.Structure):
    _fields_ = [("attn", _p), ("down", _p), ("kc", _p), ("vc", _p)]


class Stack:
    """Every layer of a decode step in one call (pdmix_decode_layers): blocks, AttentionBlocks that all
    have gate_up and down; silu: int16 [65536], torch's bf16 silu of each bf16 bit pattern (see
    runtime/decode_block.silu_table). The call's layer array is made once per cache (a KVCache)."""

    def __init__(self, blocks: list[AttentionBlock], silu: torch.Tensor):
        assert blocks and all(b.down_struct is not None for b in blocks)
        self.blocks, self.silu, self.head_dim = blocks, silu.contiguous(), blocks[0].head_dim
        self.layers, self.for_cache = None, lambda: None

    def __call__(self, x: torch.Tensor, step: DecodeStep, cache, n_dynamic: int) -> torch.Tensor:
        """x [T, hidden] bf16 -> the last layer's output; cache: the KVCache (its per-layer k and v)."""
        if self.for_cache() is not cache:
            self.layers = (DecodeLayerStruct * len(self.blocks))(*(
                DecodeLayerStruct(ctypes.addressof(b.struct), ctypes.addressof(b.down_struct), k.data_ptr(), v.data_ptr())
                for b, k, v in zip(self.blocks, cache.k, cache.v)))
            self.for_cache = weakref.ref(cache)
        out = x.clone(memory_format=torch.contiguous_format)
        if library()[0].pdmix_decode_layers(self.layers, len(self.blocks), step.ref, self.silu.data_ptr(), out.data_ptr(),
                                            out.shape[0], n_dynamic, torch.get_num_threads()):
            raise MemoryError("decode stack: no memory for its scratch rows")
        return out

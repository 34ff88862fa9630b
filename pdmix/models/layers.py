"""One decoder layer of Llama / Qwen2 / Qwen3, written out (gpt-fast style).

Module names mirror Hugging Face's (`self_attn.q_proj`, `mlp.down_proj`, ...), so checkpoint
tensor names map onto them directly. Linears are any module with `forward(x, split)`: float ones
for the float model and calibration, W8A8_MIX ones for the quantized runtime. Attention itself is
passed in (`attn(layer_idx, q, k, v)`), so the same layer runs over a paged KV cache in the runtime
and over one contiguous sequence during calibration.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pdmix.kernels import cpu_norm, cpu_rotary
from pdmix.models.config import ModelConfig
from pdmix.models.linear import fuse_linears


def inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, fp32 [..., 1]."""
    if torch.compiler.is_compiling():
        return torch.ops.pdmix.inv_rms(x32, eps)
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


@torch.library.custom_op("pdmix::inv_rms", mutates_args=())
def _inv_rms_op(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """inv_rms as an opaque op in a compiled graph: Inductor sums in another order than eager torch,
    and a 1-ulp difference in the mean flips bf16 roundings downstream (then int8 codes, then tokens)."""
    return inv_rms(x32, eps)


@_inv_rms_op.register_fake
def _(x32, eps):
    return x32.new_empty((*x32.shape[:-1], 1))


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm, plus the optional bias that outlier suppression leaves (SPEC §6)."""

    def __init__(self, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float32), requires_grad=False)
        self.eps = eps
        # True (the runtime, set by its loader where the C library is): one C call where it runs
        # (kernels/cpu_norm.py), its own order of the sum of squares; False: torch's ops, as the
        # quantization pipeline's float forward (msModelSlim's) computes
        self.in_c = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_c and cpu_norm.usable(x, self.weight):
            if torch.compiler.is_compiling():
                return torch.ops.pdmix.rms_norm(x, self.weight, self.bias, self.eps)
            return cpu_norm.rms_norm(x, self.weight, self.bias, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * inv_rms(x32, self.eps)
        y = self.weight * x32.to(dtype)
        if self.bias is not None:
            y = (y.to(torch.float32) + self.bias).to(dtype)
        return y


class Rotary:
    """cos/sin tables for rotary position embedding; non-default rope types come from transformers."""

    def __init__(self, cfg: ModelConfig, device="cpu"):
        rp = dict(cfg.raw.get("rope_parameters") or cfg.raw.get("rope_scaling") or {})
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        theta = rp.get("rope_theta", cfg.raw.get("rope_theta", 10000.0))
        self.scaling = 1.0
        if rope_type == "default":
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            inv, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg.hf_config(), device)
            self.inv_freq = inv.to(torch.float32)
        self.dtype = cfg.dtype

    def to(self, device):
        self.inv_freq = self.inv_freq.to(device)
        return self

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(self.dtype), (emb.sin() * self.scaling).to(self.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over one contiguous sequence: q [T,H,D], k/v [T,KV,D] -> [T,H,D].

    Computed in fp32: CPU SDPA in bf16 is an order of magnitude slower for short sequences.
    """
    o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                       v.transpose(0, 1).float(), is_causal=True, enable_gqa=True)
    return o.transpose(0, 1).to(q.dtype)


def packed_causal_attention(lengths: list[int], attend=causal_attention):
    """attn(layer_idx, q, k, v) over several sequences packed row after row (varlen), each through attend."""
    def attn(_, q, k, v):
        return torch.cat([attend(*t) for t in zip(q.split(lengths), k.split(lengths), v.split(lengths))])
    return attn


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 linears: dict[str, nn.Module], q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (linears[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_norm, self.k_norm = q_norm, k_norm
        self.qkv_proj = None  # set by fuse(): q/k/v as one linear

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj],
                                     f"model.layers.{self.layer_idx}.self_attn.qkv_proj")
        if self.qkv_proj is not None:
            self.qkv_sizes = [m.out_features for m in (self.q_proj, self.k_proj, self.v_proj)]
            del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x, split):
        if self.qkv_proj is not None:
            return self.qkv_proj(x, split).split(self.qkv_sizes, dim=-1)
        return self.q_proj(x, split), self.k_proj(x, split), self.v_proj(x, split)

    def rotated_qkv(self, x, cos, sin, split):
        """q [T, H, D], k and v [T, KV, D], with rotary applied to q and k."""
        t, h, kv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k are adjacent in the fused output: rotate them in one pass (same values, fewer ops)
            qkv = self.qkv_proj(x, split)
            qk = qkv[:, :(h + kv) * d].view(t, h + kv, d)
            # the runtime's fused output is its own: rotated in place, in one C call where that runs
            qk = cpu_rotary.rotate_(qk, cos, sin) if cpu_rotary.usable(qk, cos) else apply_rotary(qk, cos, sin)
            return qk[:, :h], qk[:, h:], qkv[:, (h + kv) * d:].view(t, kv, d)
        q, k, v = self.project_qkv(x, split)
        q, k, v = q.reshape(t, h, d), k.reshape(t, kv, d), v.reshape(t, kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attn, split=None):
        t = x.shape[0]
        q, k, v = self.rotated_qkv(x, cos, sin, split)
        o = attn(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim), split)


class MLP(nn.Module):
    def __init__(self, linears: dict[str, nn.Module]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (linears[n] for n in ("gate_proj", "up_proj", "down_proj"))
        self.gate_up_proj = None  # set by fuse(): gate/up as one linear

    def fuse(self, name: str) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj], name)
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    @staticmethod
    def activation(gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from gate_up_proj's output (gate, then up)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x, split=None):
        if self.gate_up_proj is not None:
            return self.down_proj(self.activation(self.gate_up_proj(x, split)), split)
        return self.down_proj(F.silu(self.gate_proj(x, split)) * self.up_proj(x, split), split)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, linears: dict[str, nn.Module], norms: dict[str, RMSNorm],
                 tp_size: int = 1, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = norms["input_layernorm"]
        self.post_attention_layernorm = norms["post_attention_layernorm"]
        self.self_attn = Attention(layer_idx, cfg.num_heads // tp_size, cfg.num_kv_heads // tp_size, cfg.head_dim,
                                   linears, norms.get("q_norm"), norms.get("k_norm"))
        self.mlp = MLP(linears) if mlp is None else mlp  # mlp: a sparse layer's block (pdmix.models.moe)
        # the runtime's decode-only steps in C calls, where they fit (runtime/decode_block.py)
        self.decode_block = None

    def fuse(self) -> "DecoderLayer":
        """Fuse the linears that read one input (q/k/v, gate/up) for the runtime: one input quantization
        and one GEMM instead of three. Calibration keeps them separate, to observe each."""
        self.self_attn.fuse()
        self.mlp.fuse(f"model.layers.{self.self_attn.layer_idx}.mlp.gate_up_proj")
        return self

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, split=None) -> torch.Tensor:
        """x [T, hidden]: the rows of all sequences of a step, flattened."""
        fused = self.decode_block and getattr(attn, "run_decode_layer", None)
        out = fused and fused(self.decode_block, self.self_attn.layer_idx, x, cos, sin, split)
        if out is not None:  # the same bits as the two lines below
            return out
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, split)
        return h + self.mlp(self.post_attention_layernorm(h), split)


NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
QK_NORM_NAMES = ("self_attn.q_norm", "self_attn.k_norm")


def layer_norms(cfg: ModelConfig, layer_idx: int, get, has) -> dict[str, RMSNorm]:
    """The RMSNorms of a decoder layer from tensors `get(name)`, with any bias present (SPEC §6)."""
    norms = {}
    names = NORM_NAMES + (QK_NORM_NAMES if cfg.qk_norm else ())
    for n in names:
        p = f"model.layers.{layer_idx}.{n}"
        bias = get(p + ".bias") if has(p + ".bias") else None
        norms[n.rpartition(".")[2]] = RMSNorm(get(p + ".weight"), cfg.rms_norm_eps, bias)
    return norms

"""SmoothQuant (`smooth`) and msModelSlim's `m4` (smoothing plus a shift, alpha searched per group).

Each linear-input group X, read by linears y = X W^T + b, is rewritten exactly as

    X' = (X - z) / s        W' = W diag(s)        b' = b + W z

with a per-channel scale s = r^alpha / max|W|^(1 - alpha) (r: the channel's activation half-range)
and, for m4, a per-channel shift z (the centre of the channel's range). X' is made by the tensor
that produces X, whose output channel c becomes (c - z) / s:
  - qkv, gate_up: the RMSNorm before them (y = rmsnorm(x) * w + b): w' = w / s, b' = (b - z) / s;
  - o: v_proj's rows. Attention output rows are convex combinations of v rows, so a shift of v
    comes through unchanged. Under GQA one v channel feeds num_heads / num_kv_heads query heads,
    so z and s live on v channels and repeat over the o_proj columns that read them;
  - down: up_proj's rows. down reads silu(gate) * up: a scale of up comes through, a shift does not.
All arithmetic is fp32; results go back to the model dtype (norm biases stay fp32, SPEC §6).
"""

from dataclasses import dataclass

import torch

from pdmix.kernels.reference import quantize_static
from pdmix.quant.arithmetic import quantize_weight, static_activation_params

ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8
MIN_SCALE, MAX_SCALE = 1e-4, 1e4  # keeps w / s and W * s finite in fp16


@dataclass(frozen=True)
class Edge:
    group: str                 # the stats group (anti_outlier.GROUPS) whose input is smoothed
    producer: str              # the tensor whose output channels are that input
    consumers: tuple[str, ...]
    shift: bool                # whether the producer can absorb a per-channel shift
    heads: bool                # producer channels are v channels shared by grouped query heads


EDGES = (
    Edge("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True, False),
    Edge("o", "self_attn.v_proj", ("self_attn.o_proj",), True, True),
    Edge("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), True, False),
    Edge("down", "mlp.up_proj", ("mlp.down_proj",), False, False),
)


class Channels:
    """Maps the group's input channels to the producer's output channels; they differ for o under GQA."""

    def __init__(self, cfg, heads: bool):
        self.kv = cfg.num_kv_heads if heads else None
        self.rep = cfg.num_heads // cfg.num_kv_heads
        self.head_dim = cfg.head_dim

    def reduce(self, v: torch.Tensor, fn) -> torch.Tensor:
        """[k] input channels -> producer channels, combining the query heads of a kv head with fn."""
        if self.kv is None:
            return v
        return fn(v.view(self.kv, self.rep, self.head_dim), dim=1).flatten()

    def expand(self, v: torch.Tensor | None) -> torch.Tensor | None:
        if self.kv is None or v is None:
            return v
        return v.view(self.kv, 1, self.head_dim).expand(-1, self.rep, -1).flatten()


def smoothing_scales(r: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = r^alpha / wmax^(1-alpha); 1 where a channel is dead (r or wmax zero)."""
    s = r.pow(alpha) / wmax.pow(1 - alpha)
    ok = (r > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(MIN_SCALE, MAX_SCALE)


def proxy_error(mn: torch.Tensor, mx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Expected squared static-W8A8 error of X W^T, summed over outputs, from per-channel ranges of X.

    Models quantization noise as uniform (step^2 / 12) and each channel of X as uniform on [mn, mx]:
    per-tensor activation step dx gives dx^2/12 * sum W^2; per-row weight step dw_i gives
    dw_i^2/12 * sum_j E[x_j^2].
    """
    dx = (mx.max().clamp(min=0) - mn.min().clamp(max=0)) / 255
    ex2 = (mn * mn + mn * mx + mx * mx) / 3
    dw = w.abs().amax(dim=1) / 127
    return (dx * dx * w.pow(2).sum() + dw.pow(2).sum() * ex2.sum()) / 12


def sampled_error(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean squared static-W8A8 error of x W^T on sample rows x, activation range from [min mn, max mx]."""
    scale, offset = static_activation_params(mn.min().reshape(1), mx.max().reshape(1), torch.float32)
    xq = (quantize_static(x, scale, offset).float() - offset) * scale
    q, ws = quantize_weight(w)
    return (xq @ (q.float() * ws).T - x @ w.T).pow(2).mean()


@dataclass
class GroupInput:
    """One group's input statistics and consumer weights (fp32), in both channel spaces."""
    ch: Channels
    mn: torch.Tensor        # [k] per input channel
    mx: torch.Tensor
    w: torch.Tensor         # [n, k] all consumers, stacked
    sample: torch.Tensor | None = None  # [N, k] rows of the float input, if the pipeline gave them

    def plan(self, alpha: float, shift: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(z or None, s) on producer channels."""
        mn, mx = self.ch.reduce(self.mn, torch.amin), self.ch.reduce(self.mx, torch.amax)
        wmax = self.ch.reduce(self.w.abs().amax(dim=0), torch.amax)
        if shift:
            return (mx + mn) / 2, smoothing_scales((mx - mn) / 2, wmax, alpha)
        return None, smoothing_scales(torch.maximum(mn.abs(), mx.abs()), wmax, alpha)

    def error(self, z: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(self.mn) if z is None else self.ch.expand(z)
        s = self.ch.expand(s)
        mn, mx, w = (self.mn - z) / s, (self.mx - z) / s, self.w * s
        if self.sample is None:
            return proxy_error(mn, mx, w)
        return sampled_error((self.sample.float() - z) / s, mn, mx, w)


def search_alpha(g: GroupInput, alphas, default: float, shift: bool) -> float:
    """The alpha of the grid (plus default) with the least error; ties go to the one nearest default."""
    candidates = sorted(set(alphas) | {default}, key=lambda a: abs(a - default))
    errors = [g.error(*g.plan(a, shift)).item() for a in candidates]
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


def fold_into_producer(t: dict, name: str, z: torch.Tensor | None, s: torch.Tensor) -> None:
    """Output channel c of a norm (weight [k]) or linear (weight [k, in]) becomes (c - z) / s."""
    w = t[name + ".weight"]
    t[name + ".weight"] = w / s.reshape(-1, *(1,) * (w.dim() - 1))
    bias = t.get(name + ".bias")
    if z is not None:
        bias = (0 if bias is None else bias) - z
    if bias is not None:
        t[name + ".bias"] = bias / s


def fold_into_consumer(t: dict, name: str, z: torch.Tensor | None, s: torch.Tensor) -> None:
    """A linear reading (x - z) / s instead of x: b += W z (original W), W = W diag(s)."""
    w = t[name + ".weight"]
    if z is not None:
        t[name + ".bias"] = t.get(name + ".bias", 0) + w @ z
    t[name + ".weight"] = w * s


def cast_back(t: dict, tensors: dict) -> dict:
    """fp32 work tensors back to their input dtypes; a new bias takes its weight's dtype, fp32 on norms."""
    out = {}
    for k, v in t.items():
        if k in tensors:
            out[k] = v.to(tensors[k].dtype)
        else:
            w = tensors[k.removesuffix(".bias") + ".weight"]
            out[k] = v.to(torch.float32 if w.dim() == 1 else w.dtype)
    return out


def smooth_layer(cfg, layer_idx: int, tensors: dict, stats: dict, alpha: float, shift: bool, alphas,
                 samples: dict | None = None) -> dict:
    p = f"model.layers.{layer_idx}."
    t = {k: v.float() for k, v in tensors.items()}
    for e in EDGES:
        if e.group not in stats:
            continue
        g = GroupInput(Channels(cfg, e.heads), stats[e.group].min.float(), stats[e.group].max.float(),
                       torch.cat([t[p + c + ".weight"] for c in e.consumers]),
                       (samples or {}).get(e.group))
        use_shift = shift and e.shift
        a = search_alpha(g, alphas, alpha, use_shift) if len(alphas) > 1 else alpha
        z, s = g.plan(a, use_shift)
        fold_into_producer(t, p + e.producer, z, s)
        for c in e.consumers:
            fold_into_consumer(t, p + c, g.ch.expand(z), g.ch.expand(s))
    return cast_back(t, tensors)


def smooth(cfg, layer_idx, tensors, stats, alpha: float = 0.5, samples=None) -> dict:
    """SmoothQuant at a fixed alpha (samples are not needed)."""
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=False, alphas=(alpha,))


def m4(cfg, layer_idx, tensors, stats, alpha: float = 0.5, samples=None) -> dict:
    """Shift plus smoothing, alpha searched per group over ALPHA_GRID (ties to `alpha`).

    samples: optional {group: [N, k] float input rows} (a bounded random subsample of the
    calibration tokens); with them the search minimises the measured fake-quant error of X W^T,
    without them an error model built from the per-channel ranges.
    """
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=True, alphas=ALPHA_GRID, samples=samples)

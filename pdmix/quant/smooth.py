"""SmoothQuant (`smooth`) and msModelSlim's `m4` (smoothing plus a shift, alpha searched per group).

Each linear-input group X, read by linears y = X W^T + b, is rewritten exactly as

    X' = (X - z) / s        W' = W diag(s)        b' = b + W z

with a per-channel scale s = r^alpha / max|W|^(1 - alpha) (r: the channel's absmax; with a shift,
its half-range) and, for m4, a per-channel shift z (the centre of the channel's range). X' is made by the tensor
that produces X, whose output channel c becomes (c - z) / s:
  - qkv, gate_up: the RMSNorm before them (y = rmsnorm(x) * w + b): w' = w / s, b' = (b - z) / s;
  - o: v_proj's rows. Attention output rows are convex combinations of v rows, so a shift of v
    comes through unchanged. Under GQA one v channel feeds num_heads / num_kv_heads query heads,
    so z and s live on v channels and repeat over the o_proj columns that read them;
  - down: up_proj's rows. down reads silu(gate) * up: a scale of up comes through, a shift does not.
m4 picks alpha per group from ALPHA_GRID by the static W8A8 error of X' W'^T, modelled from the
per-channel ranges. (Measuring it on sampled, held-out calibration rows was tried and lost end to
end on SmolLM2: better on each layer alone, worse over the model.) All arithmetic is fp32; results go back to the model dtype (norm
biases stay fp32, SPEC §6).
"""

from dataclasses import dataclass

import torch

from pdmix.models.arch import SMOOTH_EDGES, smooth_consumers

ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8
MIN_SCALE, MAX_SCALE = 1e-4, 1e4  # keeps w / s and W * s finite in fp16
EVAL_ROWS = 512  # output rows the alpha search measures error on


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


@dataclass
class GroupInput:
    """The linears reading one group's input, and how that input's channels map to the producer's."""
    ch: Channels
    w: torch.Tensor      # fp32 [n, k], all consumers stacked
    w_eval: torch.Tensor  # a bounded subset of w's rows, for measuring error
    shift: bool

    def plan(self, mn: torch.Tensor, mx: torch.Tensor, alpha: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(z or None, s) on producer channels, from per-input-channel ranges."""
        mn, mx = self.ch.reduce(mn, torch.amin), self.ch.reduce(mx, torch.amax)
        wmax = self.ch.reduce(self.w.abs().amax(dim=0), torch.amax)
        if self.shift:
            return (mx + mn) / 2, smoothing_scales((mx - mn) / 2, wmax, alpha)
        return None, smoothing_scales(torch.maximum(mn.abs(), mx.abs()), wmax, alpha)

    def input_plan(self, mn, mx, alpha) -> tuple[torch.Tensor, torch.Tensor]:
        """plan() on the group's input channels, z = 0 without shift."""
        z, s = self.plan(mn, mx, alpha)
        return (torch.zeros_like(mn) if z is None else self.ch.expand(z)), self.ch.expand(s)


def proxy_error(g: GroupInput, mn: torch.Tensor, mx: torch.Tensor, alpha: float) -> float:
    """Expected squared static-W8A8 error of X' W'^T from per-channel ranges of X alone.

    Quantization noise is taken as uniform (step^2 / 12) and each channel of X' as uniform on its
    range: the per-tensor activation step dx costs dx^2/12 * sum W'^2, the per-row weight step dw_i
    costs dw_i^2/12 * sum_j E[x'_j^2].
    """
    z, s = g.input_plan(mn, mx, alpha)
    mn, mx, w = (mn - z) / s, (mx - z) / s, g.w_eval * s
    dx = (mx.max().clamp(min=0) - mn.min().clamp(max=0)) / 255
    ex2 = (mn * mn + mn * mx + mx * mx) / 3
    dw = w.abs().amax(dim=1) / 127
    return ((dx * dx * w.pow(2).sum() + dw.pow(2).sum() * ex2.sum()) / 12).item()


def search_alpha(error, alphas, default: float) -> float:
    """The alpha of the grid (plus default) with the least error(alpha); ties go to the one nearest default."""
    candidates = sorted(set(alphas) | {default}, key=lambda a: abs(a - default))
    if len(candidates) == 1:
        return default
    errors = [error(a) for a in candidates]
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
    """A linear reading (x - z) / s instead of x: b += W z, W = W diag(s)."""
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


def eval_rows(w: torch.Tensor, limit: int = EVAL_ROWS) -> torch.Tensor:
    """A fixed random subset of w's output rows: error per output is an average, so this estimates it."""
    if w.shape[0] <= limit:
        return w
    return w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:limit]]


def smooth_layer(cfg, layer_idx: int, tensors: dict, stats: dict, alpha: float, shift: bool, alphas) -> dict:
    p = f"model.layers.{layer_idx}."
    t = {k: v.float() for k, v in tensors.items()}
    for e in SMOOTH_EDGES:
        if e.group not in stats:
            continue
        consumers = smooth_consumers(e)
        w = torch.cat([t[p + c + ".weight"] for c in consumers])
        g = GroupInput(Channels(cfg, e.heads), w, eval_rows(w), shift and e.shift)
        mn, mx = (v.to(w.device, torch.float32) for v in (stats[e.group].min, stats[e.group].max))
        a = search_alpha(lambda a: proxy_error(g, mn, mx, a), alphas, alpha)
        z, s = g.plan(mn, mx, a)
        fold_into_producer(t, p + e.producer, z, s)
        for c in consumers:
            fold_into_consumer(t, p + c, g.ch.expand(z), g.ch.expand(s))
    return cast_back(t, tensors)


def smooth(cfg, layer_idx, tensors, stats, alpha: float = 0.5) -> dict:
    """SmoothQuant at a fixed alpha."""
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=False, alphas=(alpha,))


def m4(cfg, layer_idx, tensors, stats, alpha: float = 0.5) -> dict:
    """Shift plus smoothing, alpha searched per group over ALPHA_GRID (ties to `alpha`) by an error
    model built from the per-channel ranges in `stats` (see proxy_error)."""
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=True, alphas=ALPHA_GRID)

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
m4 picks alpha per group from ALPHA_GRID by the static W8A8 error of X' W'^T: measured on
held-out calibration forwards when the pipeline passes samples (ForwardSample), else modelled
from the per-channel ranges. All arithmetic is fp32; results go back to the model dtype (norm
biases stay fp32, SPEC §6).
"""

from dataclasses import dataclass

import torch

from pdmix.quant.arithmetic import quantize_weight, static_activation_params
from pdmix.quant.observer import fake_quant_static

ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8
MIN_SCALE, MAX_SCALE = 1e-4, 1e4  # keeps w / s and W * s finite in fp16
EVAL_ROWS = 512  # output rows the alpha search measures error on


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


@dataclass
class ForwardSample:
    """What m4's alpha search keeps of one calibration forward's input to one group."""
    min: torch.Tensor   # fp32 [k] per-channel min over the forward's tokens
    max: torch.Tensor   # fp32 [k]
    rows: torch.Tensor  # [m, k] some of its rows, model dtype

    @classmethod
    def of(cls, x: torch.Tensor, n_random: int = 32, n_top: int = 8, generator=None) -> "ForwardSample":
        """Up to n_random rows at random plus the n_top rows of largest |x| (the ones clipping hurts)."""
        x = x.reshape(-1, x.shape[-1])
        pick = torch.randperm(x.shape[0], generator=generator)[:n_random].to(x.device)
        top = x.abs().amax(dim=1).topk(min(n_top, x.shape[0])).indices
        x32 = x.to(torch.float32)
        return cls(x32.amin(0), x32.amax(0), x[torch.cat([pick, top]).unique()])


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


def fake_quant_error(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> float:
    """Mean squared error of x w^T under static W8A8 (SPEC §4/§5 arithmetic), x and w fp32."""
    q, ws = quantize_weight(w)
    return (fake_quant_static(x, scale, offset) @ (q.float() * ws).T - x @ w.T).pow(2).mean().item()


def cross_validated_error(g: GroupInput, forwards: list[ForwardSample], alpha: float, folds: int = 4) -> float:
    """Static W8A8 error of X' W'^T on held-out forwards, with s, z and the activation range (SPEC §4:
    mean of per-forward min/max) fitted on the others. Held out because a scale fitted on the same
    tokens overfits: channels quiet in calibration get amplified, then clip on new text."""
    folds = max(1, min(folds, len(forwards)))
    total = 0.0
    for k in range(folds):
        test = forwards[k::folds]
        train = [f for i, f in enumerate(forwards) if i % folds != k] or test
        fmin, fmax = (torch.stack([getattr(f, a) for f in train]).to(g.w.device) for a in ("min", "max"))
        z, s = g.input_plan(fmin.amin(0), fmax.amax(0), alpha)
        scale, offset = static_activation_params(((fmin - z) / s).amin(1), ((fmax - z) / s).amax(1),
                                                 test[0].rows.dtype)
        x = (torch.cat([f.rows for f in test]).to(g.w.device, torch.float32) - z) / s
        total += fake_quant_error(x, g.w_eval * s, scale, offset)
    return total / folds


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


def smooth_layer(cfg, layer_idx: int, tensors: dict, stats: dict, alpha: float, shift: bool, alphas,
                 samples: dict | None = None) -> dict:
    p = f"model.layers.{layer_idx}."
    t = {k: v.float() for k, v in tensors.items()}
    for e in EDGES:
        if e.group not in stats:
            continue
        w = torch.cat([t[p + c + ".weight"] for c in e.consumers])
        g = GroupInput(Channels(cfg, e.heads), w, eval_rows(w), shift and e.shift)
        mn, mx = (v.to(w.device, torch.float32) for v in (stats[e.group].min, stats[e.group].max))
        forwards = (samples or {}).get(e.group)
        if forwards:
            a = search_alpha(lambda a: cross_validated_error(g, forwards, a), alphas, alpha)
        else:
            a = search_alpha(lambda a: proxy_error(g, mn, mx, a), alphas, alpha)
        z, s = g.plan(mn, mx, a)
        fold_into_producer(t, p + e.producer, z, s)
        for c in e.consumers:
            fold_into_consumer(t, p + c, g.ch.expand(z), g.ch.expand(s))
    return cast_back(t, tensors)


def smooth(cfg, layer_idx, tensors, stats, alpha: float = 0.5, samples=None) -> dict:
    """SmoothQuant at a fixed alpha (samples are not needed)."""
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=False, alphas=(alpha,))


def m4(cfg, layer_idx, tensors, stats, alpha: float = 0.5, samples=None) -> dict:
    """Shift plus smoothing, alpha searched per group over ALPHA_GRID (ties to `alpha`).

    samples: optional {group: [ForwardSample.of(x) for each calibration forward]}. With them the
    search minimises the measured static W8A8 error of X' W'^T on held-out forwards; without
    them, an error model built from the per-channel ranges in `stats` (weaker: see proxy_error).
    """
    return smooth_layer(cfg, layer_idx, tensors, stats, alpha, shift=True, alphas=ALPHA_GRID, samples=samples)

"""Rollback: which linears stay float (SPEC §7).

A linear group's sensitivity to activation quantization is scored one of two ways (`--rollback_score`):
  - ratio (msModelSlim's, the default): max|x| / std(x) of its input over the calibration set;
  - error: what static W8A8 of that group alone does to its decoder layer's output, measured: the
    mean over tokens of |y_q - y|^2 / |y|^2, y the layer's float output (the residual stream) and
    y_q the same with the group's weights and inputs fake-quantized (minmax weight, the minmax
    static range). Per token and relative, because the final RMSNorm sees each token's hidden state
    relative to its own size; a few attention-sink tokens with massive norms weigh no more than others.
Linears that read the same input (q/k/v, gate/up) share a score and roll back together.
"""

from dataclasses import dataclass

import torch

from pdmix.errors import PdmixError
from pdmix.models.arch import BY_NAME, GROUPS, INPUT_GROUPS, layer_linears, linear_prefix


@dataclass
class InputStats:
    absmax: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.absmax = max(self.absmax, x.abs().max().item())
        self.total += x.sum().item()
        self.total_sq += x.pow(2).sum().item()
        self.count += x.numel()

    def score(self) -> float:
        mean = self.total / self.count
        std = max(self.total_sq / self.count - mean * mean, 0.0) ** 0.5
        return self.absmax / max(std, 1e-12)


ROLLBACK_SCORES = ("ratio", "error")


@dataclass
class OutputError:
    """The `error` score: mean over tokens of |out - ref|^2 / |ref|^2 (rows are tokens)."""
    total: float = 0.0
    count: int = 0

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = out.to(torch.float32), ref.to(torch.float32)
        err = (out - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
        self.total += err.sum().item()
        self.count += ref.shape[0]

    def score(self) -> float:
        return self.total / max(self.count, 1)


def group_prefixes(layer: int, group: tuple[str, ...]) -> list[str]:
    return [linear_prefix(layer, n) for n in group]


def expand_names(names, num_layers: int, cfg=None) -> set[str]:
    """--disable_names: full linear names (model.layers.3.mlp.down_proj, or with cfg a MoE model's
    model.layers.3.mlp.experts.7.down_proj); a name brings the linears that read its input."""
    chosen = set()
    linears = {p for i in range(num_layers) for p, _ in layer_linears(cfg, i)} if cfg is not None else set()
    for name in names:
        if name in ("lm_head", "model.embed_tokens"):
            continue  # always float
        if ".experts." in name and name in linears:
            base, _, leaf = name.rpartition(".")
            chosen.update(f"{base}.{n}" for n in GROUPS[BY_NAME[leaf].group])
            continue
        found = [g for i in range(num_layers) for g in INPUT_GROUPS if name in group_prefixes(i, g)
                 and (cfg is None or name in linears)]
        if not found:
            raise PdmixError(f"--disable_names {name}: no such linear (expected e.g. {linear_prefix(0, 'down_proj')})")
        layer = int(name.split(".")[2])
        chosen.update(group_prefixes(layer, found[0]))
    return chosen


def most_sensitive(scores: dict[tuple[int, tuple[str, ...]], float], n: int) -> list[tuple[str, float]]:
    """The top-scoring groups until at least n linears are chosen: [(linear name, score)]."""
    chosen = []
    for (layer, group), score in sorted(scores.items(), key=lambda kv: -kv[1]):
        if len(chosen) >= n:
            break
        chosen += [(p, score) for p in group_prefixes(layer, group)]
    return chosen

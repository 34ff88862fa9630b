"""Qwen3-MoE's sparse MLP block: a float router picks each token's top-k experts; the rows are grouped
by expert, every expert that got rows runs once on all of them (its linears through their kernel
backend: W8A8_DYNAMIC experts on the dynamic path), and each token's expert outputs are weighted and
summed in the model dtype, in ascending expert order, as transformers' Qwen3MoeExperts does."""

import torch
from torch import nn

from pdmix.models.arch import LINEARS, ROUTER, expert_prefix, is_sparse, linear_prefix
from pdmix.models.layers import MLP, DecoderLayer
from pdmix.models.linear import FloatLinear


class SparseMoE(nn.Module):
    def __init__(self, gate: nn.Module, experts: list[MLP], top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.gate, self.experts = gate, nn.ModuleList(experts)  # HF names: mlp.gate, mlp.experts.E
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def fuse(self, name: str) -> None:
        """Each expert's gate/up as one linear (name: the layer's mlp.gate_up_proj)."""
        base = name.rpartition(".")[0]
        for e, expert in enumerate(self.experts):
            expert.fuse(f"{base}.experts.{e}.gate_up_proj")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert indices [T, k]): softmax in fp32, top-k, renormalized."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor, split=None) -> torch.Tensor:
        weights, experts = self.route(x)
        return run_experts(x, weights, experts, len(self.experts), lambda e, rows: self.experts[e](rows))


def run_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, expert) -> torch.Tensor:
    """sum_j weights[t, j] * expert(experts[t, j], x[t]) for every token t, computed grouped by expert:
    expert(e, rows) runs once on all rows routed to e. The weighted outputs (weights in x's dtype) are
    summed in ascending expert order, in x's dtype. Shared with the vLLM plugin (pdmix/vllm/moe.py)."""
    t, h, k = x.shape[0], x.shape[1], experts.shape[1]
    experts = experts.long()  # vLLM's router gives int32 ids
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    rows = x[order // k]
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = expert(e, rows[start:start + n])
            start += n
    contrib = torch.empty_like(out)
    contrib[order] = out
    contrib = contrib.view(t, k, h) * weights[..., None]
    contrib = contrib.gather(1, experts.argsort(dim=-1)[..., None].expand(-1, -1, h))
    y = contrib[:, 0]
    for j in range(1, k):
        y = y + contrib[:, j]
    return y


def decoder_layer(cfg, layer: int, make_linear, get, norms: dict, tp_size: int = 1) -> DecoderLayer:
    """A decoder layer, dense or sparse, each linear (experts included) from make_linear(HF prefix);
    get(name) reads the router's float weight (replicated under tensor parallelism)."""
    sparse = is_sparse(cfg, layer)
    linears = {lin.name: make_linear(linear_prefix(layer, lin.name)) for lin in LINEARS
               if not (sparse and lin.block == "mlp")}
    mlp = None
    if sparse:
        names = [lin.name for lin in LINEARS if lin.block == "mlp"]
        experts = [MLP({n: make_linear(expert_prefix(layer, e, n)) for n in names}) for e in range(cfg.num_experts)]
        mlp = SparseMoE(FloatLinear(get(f"model.layers.{layer}.{ROUTER}.weight")), experts, cfg.num_experts_per_tok,
                        cfg.norm_topk_prob)
    return DecoderLayer(cfg, layer, linears, norms, tp_size, mlp)

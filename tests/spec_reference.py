"""SPEC §5 by the letter, independent of pdmix: a whole-model forward that reads a W8A8_MIX
checkpoint's tensors and computes every quantized linear with exact integer arithmetic.
W8A8_DYNAMIC linears (docs/moe.md) take the dynamic path on every row, with no bias; a Qwen3-MoE
sparse layer routes one token at a time through its experts (transformers' arithmetic)."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open


class Reference:
    """SPEC §5 by the letter: y = deq_scale * (x_q @ W^T + quant_bias) for decode rows,
    y = (x_q @ W^T) * s_t * weight_scale + bias_float for prompt rows."""

    def __init__(self, folder: Path, dynamic_bias: bool = True, dtype: torch.dtype | None = None):
        """dtype: compute in it instead of config.json's (the model's float tensors widened to it)."""
        self.t = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                self.t.update({k: h.get_tensor(k) for k in h.keys()})
        self.cfg = json.loads((folder / "config.json").read_text())
        self.dtype = dtype or {"bfloat16": torch.bfloat16, "float16": torch.float16}[self.cfg["dtype"]]
        if dtype is not None:  # the W8A8 scales stay as stored (fp32, or int64 bit patterns)
            self.t = {k: v.to(dtype) if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in self.t.items()}
        self.dynamic_bias = dynamic_bias

    def quant_linear(self, p: str, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
        t = self.t
        w = t[p + ".weight"].to(torch.float64)  # int8 values: float64 products and sums are exact
        deq = t[p + ".deq_scale"]
        deq = (deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq).float().reshape(-1)
        qb = t[p + ".quant_bias"].to(torch.int64).reshape(-1)
        scale, offset = t[p + ".input_scale"].float().reshape(()), t[p + ".input_offset"].float().reshape(())
        x = x.float()
        if dynamic:
            s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            acc = torch.round(x / s).double() @ w.T
            y = acc.float() * s * t[p + ".weight_scale"].float().reshape(-1)
            if self.dynamic_bias:
                y = y + deq * (qb.float() + offset * w.sum(1).float())
        else:
            xq = torch.clamp(torch.round(x / scale + offset), -128, 127)
            acc = (xq.double() @ w.T).to(torch.int64)
            y = deq * (acc + qb).float()
        return y.to(self.dtype)

    def linear(self, p: str, x: torch.Tensor, n_dynamic: int) -> torch.Tensor:
        if p + ".weight_scale" in self.t and p + ".deq_scale" not in self.t:  # W8A8_DYNAMIC
            w = self.t[p + ".weight"].to(torch.float64)
            s = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            acc = torch.round(x.float() / s).double() @ w.T
            return (acc.float() * s * self.t[p + ".weight_scale"].float().reshape(-1)).to(self.dtype)
        if p + ".deq_scale" not in self.t:  # kept float
            return F.linear(x, self.t[p + ".weight"], self.t.get(p + ".bias"))
        return torch.cat([self.quant_linear(p, x[:n_dynamic], True), self.quant_linear(p, x[n_dynamic:], False)])

    def rms(self, p: str, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = self.t[p + ".weight"] * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])).to(x.dtype)
        if p + ".bias" in self.t:
            y = (y.float() + self.t[p + ".bias"].float()).to(x.dtype)
        return y

    def sparse_mlp(self, p: str, h: torch.Tensor) -> torch.Tensor:
        """Qwen3-MoE's block, token by token: fp32 softmax router, top-k, optional renormalization; each
        chosen expert's output times its weight added in ascending expert order, in the model dtype."""
        c = self.cfg
        probs = F.linear(h, self.t[p + "gate.weight"]).float().softmax(-1)
        weights, experts = probs.topk(c["num_experts_per_tok"], -1)
        if c.get("norm_topk_prob"):
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(self.dtype)
        out = []
        for r in range(h.shape[0]):
            y = torch.zeros(h.shape[1], dtype=self.dtype)
            for w, e in sorted(zip(weights[r].tolist(), experts[r].tolist()), key=lambda we: we[1]):
                q, x = f"{p}experts.{e}.", h[r:r + 1]
                g, u = self.linear(q + "gate_proj", x, 1), self.linear(q + "up_proj", x, 1)
                y = y + self.linear(q + "down_proj", F.silu(g) * u, 1)[0] * torch.tensor(w, dtype=self.dtype)
            out.append(y)
        return torch.stack(out)

    def forward(self, ids: list[int], n_dynamic: int) -> torch.Tensor:
        c, t = self.cfg, self.t
        heads, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
        n = len(ids)
        inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
        freqs = torch.arange(n).float()[:, None] * inv[None]
        cos, sin = torch.cat([freqs, freqs], -1).cos().to(self.dtype), torch.cat([freqs, freqs], -1).sin().to(self.dtype)

        def rope(x):
            rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
            return x * cos[:, None] + rot * sin[:, None]

        x = t["model.embed_tokens.weight"][torch.tensor(ids)]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.rms(p + "input_layernorm", x)
            q = self.linear(p + "self_attn.q_proj", h, n_dynamic).view(n, heads, d)
            k = self.linear(p + "self_attn.k_proj", h, n_dynamic).view(n, kv, d)
            v = self.linear(p + "self_attn.v_proj", h, n_dynamic).view(n, kv, d)
            if p + "self_attn.q_norm.weight" in t:
                q, k = self.rms(p + "self_attn.q_norm", q), self.rms(p + "self_attn.k_norm", k)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
            scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / d ** 0.5
            o = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v.float())
            x = x + self.linear(p + "self_attn.o_proj", o.to(self.dtype).reshape(n, heads * d), n_dynamic)
            h = self.rms(p + "post_attention_layernorm", x)
            if p + "mlp.gate.weight" in t:
                x = x + self.sparse_mlp(p + "mlp.", h)
                continue
            g, u = self.linear(p + "mlp.gate_proj", h, n_dynamic), self.linear(p + "mlp.up_proj", h, n_dynamic)
            x = x + self.linear(p + "mlp.down_proj", F.silu(g) * u, n_dynamic)
        lm_head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
        return F.linear(self.rms("model.norm", x), lm_head).float()


def assert_close(got: torch.Tensor, ref: torch.Tensor):
    # bf16 rounding of attention (fp32 sums in another order) can move a value to the next
    # quantization level now and then; a wrong formula moves logits by far more.
    err = (got - ref).abs()
    assert err.max() < 0.02 * ref.abs().max(), f"max error {err.max():.4f} vs logit scale {ref.abs().max():.3f}"
    assert err.mean() < 0.003 * ref.abs().max(), f"mean error {err.mean():.5f}"


def fake_static(x: torch.Tensor, mn: float, mx: float) -> torch.Tensor:
    """SPEC §4's static quantizer, in x's dtype, and back: per-tensor asymmetric int8 from the range
    [mn, mx] (in msModelSlim's minmax, the mean of the per-prompt extremes), widened to include 0."""
    mn, mx = min(mn, 0.0), max(mx, 0.0)
    scale = (mx - mn) / 255
    offset = -128 - round(mn / scale)
    return ((x / scale + offset).round().clamp(-128, 127) - offset) * scale

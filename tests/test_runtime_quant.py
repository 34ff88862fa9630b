"""W8A8_MIX checkpoints through the engine, against a plain-torch SPEC §5 forward written out here.

The reference reads the checkpoint's tensors itself and runs one teacher-forced forward over a
whole sequence: prompt rows on the dynamic path, the rest on the static path (what the engine's
prefill then decode steps must compute, row for row).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from builders import build_w8a8_checkpoint
from pdmix import LLM, SamplingParams
from pdmix.runtime.scheduler import Sequence

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10]


class Reference:
    """SPEC §5 by the letter: y = deq_scale * (x_q @ W^T + quant_bias) for decode rows,
    y = (x_q @ W^T) * s_t * weight_scale + bias_float for prompt rows."""

    def __init__(self, folder: Path, dynamic_bias: bool = True):
        self.t = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                self.t.update({k: h.get_tensor(k) for k in h.keys()})
        self.cfg = json.loads((folder / "config.json").read_text())
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[self.cfg["dtype"]]
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
        if p + ".deq_scale" not in self.t:  # kept float
            return F.linear(x, self.t[p + ".weight"], self.t.get(p + ".bias"))
        return torch.cat([self.quant_linear(p, x[:n_dynamic], True), self.quant_linear(p, x[n_dynamic:], False)])

    def rms(self, p: str, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = self.t[p + ".weight"] * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])).to(x.dtype)
        if p + ".bias" in self.t:
            y = (y.float() + self.t[p + ".bias"].float()).to(x.dtype)
        return y

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


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    made = {}

    def get(arch, variant="pdmix", m4=False, dtype=torch.bfloat16, tie=False, float_layers=()):
        key = (arch, variant, m4, dtype, tie, float_layers)
        if key not in made:
            src = tiny_models(arch, dtype=dtype, tie=tie)
            made[key] = build_w8a8_checkpoint(src, root / f"ck{len(made)}", variant=variant, m4_biases=m4,
                                              float_layers=float_layers)
        return made[key]
    return get


def generate(llm, prompt=PROMPT, n=6):
    out = llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, return_logits=True))[0].outputs[0]
    return out.token_ids, out.logits


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_prefill_and_decode_match_spec_reference(checkpoints, arch):
    ck = checkpoints(arch)
    tokens, logits = generate(LLM(ck, block_size=4, max_batch_size=2))
    ref = Reference(ck).forward(PROMPT + tokens[:-1], n_dynamic=len(PROMPT))[len(PROMPT) - 1:]
    assert_close(logits[:1], ref[:1])   # prefill (dynamic rows)
    assert_close(logits[1:], ref[1:])   # decode steps (static rows)


def test_forced_paths_and_score_match_reference(checkpoints):
    ck = checkpoints("qwen3", tie=True)
    ref = Reference(ck)
    ids = PROMPT + [7, 99, 300, 41]
    everything = 10**6
    for mode, n_dyn in (("static", 0), ("dynamic", everything)):
        tokens, logits = generate(LLM(ck, quant_mode=mode, block_size=8), ids, n=3)
        assert_close(logits, ref.forward(ids + tokens[:-1], n_dyn)[len(ids) - 1:])
    llm = LLM(ck, block_size=8)
    for mode, n_dyn in (("pdmix", 5), ("static", 0), ("dynamic", everything)):
        assert_close(llm.score(ids, n_prefill=5, mode=mode), ref.forward(ids, n_dyn))
    # the two paths really differ, so the above tells them apart
    assert (ref.forward(ids, 0) - ref.forward(ids, everything)).abs().max() > 0.05


def test_mixed_batch_gives_each_sequence_its_solo_output(checkpoints):
    llm = LLM(checkpoints("qwen3"), block_size=4, max_batch_size=4, max_prefill_tokens=8)
    params = SamplingParams(max_tokens=5, ignore_eos=True, return_logits=True)
    prompts = [PROMPT[:4], PROMPT[4:8], PROMPT[1:14]]  # the third is prefilled in two chunks
    solo = [generate_one(llm, p, params) for p in prompts]
    engine = llm.engine
    a, b, c = (Sequence(p, params) for p in prompts)
    engine.scheduler.add(a)
    engine.scheduler.add(b)
    engine.step()   # a and b prefill
    engine.step()   # a and b decode
    engine.scheduler.add(c)
    engine.step()   # c's first chunk while a and b decode
    assert (len(a.output_ids), len(b.output_ids), c.num_computed, len(c.output_ids)) == (3, 3, 8, 0)
    engine.step()   # c's last chunk while a and b decode
    assert (len(a.output_ids), len(c.output_ids)) == (4, 1)
    while engine.scheduler.has_work():
        engine.step()
    for seq, (tokens, logits) in zip((a, b, c), solo):
        assert seq.output_ids == tokens
        assert torch.equal(torch.stack(seq.logits), logits)


def generate_one(llm, prompt, params):
    out = llm.generate([prompt], params)[0].outputs[0]
    return out.token_ids, out.logits


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.bfloat16), ("qwen3", torch.float16)])
def test_msmodelslim_layout_with_m4_biases(checkpoints, arch, dtype):
    ck = checkpoints(arch, variant="msmodelslim", m4=True, dtype=dtype)
    t = Reference(ck).t
    assert t["model.norm.bias"].dtype == torch.float32 and t["model.layers.0.self_attn.q_proj.input_scale"].dtype == torch.float32
    assert (dtype == torch.float16) == (t["model.layers.0.self_attn.q_proj.deq_scale"].dtype == torch.int64)
    tokens, logits = generate(LLM(ck, block_size=4))
    ids = PROMPT + tokens[:-1]
    ref = Reference(ck).forward(ids, len(PROMPT))[len(PROMPT) - 1:]
    assert_close(logits, ref)
    # a runtime that drops the recovered bias on the dynamic path is far off on the prompt rows
    no_bias = Reference(ck, dynamic_bias=False).forward(ids, len(PROMPT))[len(PROMPT) - 1:]
    assert (no_bias[0] - logits[0]).abs().max() > 0.1 * ref[0].abs().max()
    with pytest.raises(AssertionError):
        assert_close(logits[:1], no_bias[:1])


def test_float_layers_sharded_files_and_tied_embeddings(checkpoints, tmp_path):
    float_layers = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                    "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")
    ck = checkpoints("qwen3", variant="msmodelslim", m4=True, tie=True, float_layers=float_layers)
    assert "model.layers.0.self_attn.q_proj.bias" in Reference(ck).t  # m4 bias on a float layer
    tokens, logits = generate(LLM(ck, block_size=4))
    assert_close(logits, Reference(ck).forward(PROMPT + tokens[:-1], len(PROMPT))[len(PROMPT) - 1:])
    # the same tensors split over two shard files load to the same model
    two = tmp_path / "two-shards"
    shutil.copytree(ck, two)
    single = next(two.glob("*.safetensors"))
    names = sorted(Reference(ck).t)
    tensors = Reference(ck).t
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"quant_model_weight_w8a8_mix-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(two / fname))
        weight_map.update(dict.fromkeys(part, fname))
    single.unlink()
    (two / "quant_model_weight_w8a8_mix.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokens2, logits2 = generate(LLM(two, block_size=4))
    assert tokens2 == tokens and torch.equal(logits2, logits)


def test_checkpoint_from_the_pdmix_quantizer(tiny_models, small_calib, tmp_path):
    from pdmix.quant.config import QuantConfig
    from pdmix.quant.pipeline import quantize

    cfg = QuantConfig(calib_file=str(small_calib), anti_method="m4", disable_level="L2", part_file_size=0.0001, quiet=True)
    ck = quantize(tiny_models("qwen2"), tmp_path / "q", cfg)
    assert (ck / "quant_model_weight_w8a8_mix.safetensors.index.json").exists()  # sharded
    tokens, logits = generate(LLM(ck, block_size=4))
    assert_close(logits, Reference(ck).forward(PROMPT + tokens[:-1], len(PROMPT))[len(PROMPT) - 1:])

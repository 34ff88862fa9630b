"""Random-weight Hugging Face model folders: tiny ones for tests, real shapes for benchmarks.

Configs come from transformers' own config classes; weights are written one decoder layer per
safetensors shard, so a multi-GB model is generated with one layer in memory. A byte-level
tokenizer (256 byte tokens, no merges) plus ChatML special tokens needs no download. A few
RMSNorm entries are set large so that activations carry per-channel outliers, as real models do.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdmix.models.arch import BY_MODEL_TYPE

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # Qwen3-MoE: layer 1 a dense MLP (mlp_only_layers), the others 8 experts, 2 active
    "tiny-moe": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
}


def shape_arch(shape: str) -> str:
    """The architecture a named shape is of: 'qwen3_moe' for the MoE shapes, else 'qwen3'."""
    return "qwen3_moe" if "num_experts" in SHAPES[shape] else "qwen3"


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: ids 0-255 are bytes, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS)
    fast.chat_template = CHATML
    return fast


def _config(arch: str, shape: dict, dtype: torch.dtype, vocab_size: int, tie: bool):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}[arch]
    kw = dict(shape)
    kw.setdefault("vocab_size", vocab_size)
    if arch == "qwen2":
        kw.pop("head_dim", None)  # Qwen2 derives it from hidden/heads
    cfg = cls(**kw, max_position_embeddings=4096, tie_word_embeddings=tie, rms_norm_eps=1e-6,
              bos_token_id=256, eos_token_id=258, pad_token_id=256)
    cfg.architectures = [BY_MODEL_TYPE[arch].name]
    cfg.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return cfg


def _linear(g, n, k, dtype, std=0.02):
    return (torch.randn(n, k, generator=g) * std).to(dtype)


def _mlp(cfg, i: int, g, dtype) -> dict:
    """Layer i's MLP: dense gate/up/down, or (a Qwen3-MoE sparse layer) a float router `mlp.gate` and
    one gate/up/down per expert, as Hugging Face checkpoints store them."""
    h, p = cfg.hidden_size, f"model.layers.{i}.mlp."
    experts = getattr(cfg, "num_experts", 0) or 0
    if not experts or i in cfg.mlp_only_layers or (i + 1) % cfg.decoder_sparse_step:
        inter = cfg.intermediate_size
        return {p + "gate_proj.weight": _linear(g, inter, h, dtype), p + "up_proj.weight": _linear(g, inter, h, dtype),
                p + "down_proj.weight": _linear(g, h, inter, dtype)}
    inter = cfg.moe_intermediate_size
    t = {p + "gate.weight": _linear(g, experts, h, dtype, std=0.1)}  # decisive enough routing
    for e in range(experts):
        q = f"{p}experts.{e}."
        t.update({q + "gate_proj.weight": _linear(g, inter, h, dtype), q + "up_proj.weight": _linear(g, inter, h, dtype),
                  q + "down_proj.weight": _linear(g, h, inter, dtype)})
    return t


def make_random_model(folder, arch: str = "qwen3", shape: str | dict = "tiny", dtype=torch.bfloat16,
                      layers: int | None = None, vocab_size: int = 512, tie: bool = False, outliers: bool = True,
                      seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a random `arch` model ('llama', 'qwen2', 'qwen3', 'qwen3_moe') of a named or given shape to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = _config(arch, shape, dtype, vocab_size, tie)
    cfg.save_pretrained(folder)
    if arch == "qwen3_moe":  # the name Qwen3-MoE checkpoints (and transformers 4.x) use; 5.x maps it back
        raw = json.loads((folder / "config.json").read_text())
        raw["num_experts"] = raw.pop("num_local_experts")
        (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    h, nl = cfg.hidden_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    g = torch.Generator().manual_seed(seed)
    weight_map = {}

    def norm(n):
        w = 1.0 + 0.1 * torch.randn(n, generator=g)
        if outliers and n >= 16:
            idx = torch.randperm(n, generator=g)[: max(1, n // 32)]
            w[idx] = 20.0 + 10.0 * torch.rand(len(idx), generator=g)
        return w.to(dtype)

    def flush(tensors, i, total):
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    total = nl + 1
    for i in range(nl):
        p = f"model.layers.{i}."
        t = {
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": _linear(g, heads * hd, h, dtype),
            p + "self_attn.k_proj.weight": _linear(g, kv * hd, h, dtype),
            p + "self_attn.v_proj.weight": _linear(g, kv * hd, h, dtype),
            p + "self_attn.o_proj.weight": _linear(g, h, heads * hd, dtype),
        }
        t.update(_mlp(cfg, i, g, dtype))
        if arch == "qwen2":
            for n, size in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                t[p + f"self_attn.{n}_proj.bias"] = (torch.randn(size, generator=g) * 0.5).to(dtype)
        if arch in ("qwen3", "qwen3_moe"):
            t[p + "self_attn.q_norm.weight"] = (1.0 + 0.1 * torch.randn(hd, generator=g)).to(dtype)
            t[p + "self_attn.k_norm.weight"] = (1.0 + 0.1 * torch.randn(hd, generator=g)).to(dtype)
        flush(t, i, total)
    last = {"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, h, generator=g) * 0.5).to(dtype),
            "model.norm.weight": (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)}
    if not tie:
        last["lm_head.weight"] = _linear(g, cfg.vocab_size, h, dtype, std=0.05)
    flush(last, nl, total)
    size = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 256, "eos_token_id": 258, "do_sample": False}, f, indent=2)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder

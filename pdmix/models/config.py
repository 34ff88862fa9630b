"""What pdmix needs of a model's config.json, parsed once and checked."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_json_object

# architecture -> (q/k/v bias by design, q_norm/k_norm)
SUPPORTED_ARCHS = {
    "LlamaForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    dtype: torch.dtype
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)
    folder: Path | None = None

    def hf_config(self):
        """The transformers config object (rope parameters of every kind are read from it)."""
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(self.folder))


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def load_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise PdmixError(f"{folder}: not a directory")
    raw = read_json_object(path, " (not a Hugging Face model folder?)")
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else raw.get("model_type", "?")
    if arch not in SUPPORTED_ARCHS:
        raise PdmixError(f"{path}: architecture {arch} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if dtype_name not in DTYPES:
        raise PdmixError(f"{path}: dtype {dtype_name} is not supported (supported: bfloat16, float16)")
    qkv_bias, qk_norm = SUPPORTED_ARCHS[arch]
    try:
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        gen_cfg = folder / "generation_config.json"
        eos = _as_list(raw.get("eos_token_id"))
        if gen_cfg.exists():
            eos = sorted(set(eos) | set(_as_list(json.loads(gen_cfg.read_text()).get("eos_token_id"))))
        return ModelConfig(
            arch=arch,
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=DTYPES[dtype_name],
            qkv_bias=qkv_bias or bool(raw.get("attention_bias", False)),
            o_bias=arch == "LlamaForCausalLM" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=qk_norm,
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            eos_token_ids=eos,
            bos_token_id=raw.get("bos_token_id"),
            raw=raw,
            folder=folder,
        )
    except KeyError as e:
        raise PdmixError(f"{path}: missing field {e.args[0]}") from None

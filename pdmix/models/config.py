"""What pdmix needs of a model's config.json, parsed once and checked."""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_json_object
from pdmix.models.arch import ARCHITECTURES, BY_MODEL_TYPE

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
    num_experts: int = 0             # Qwen3-MoE (0: a dense model)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)
    folder: Path | None = None

    def hf_config(self):
        """The transformers config object (rope parameters of every kind are read from it)."""
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(self.folder))


def with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """cfg as run with activations in `dtype` (pdmix.params.DTYPES): "auto" keeps the stored dtype; "float32"
    widens every float weight exactly and computes in fp32, SPEC §5's arithmetic otherwise unchanged (the
    checkpoint's int8 weights and scales, exact int32 accumulation; the epilogue no longer rounds to bf16)."""
    return cfg if dtype == "auto" else replace(cfg, dtype=torch.float32)


# Upper bounds far above any real model: they stop a typo (1e8 layers) before memory is sized from it.
MAX_DIM, MAX_LAYERS, MAX_HEADS, MAX_VOCAB, MAX_POSITIONS = 1 << 20, 1 << 12, 1 << 12, 1 << 24, 1 << 24
MAX_EXPERTS = 1 << 14


class _Fields:
    """Typed, range-checked reads of config.json fields; every message names the file and the field."""

    def __init__(self, raw: dict, path: Path):
        self.raw, self.path = raw, path

    def fail(self, key: str, problem: str) -> PdmixError:
        return PdmixError(f"{self.path}: {key} {problem}")

    def int(self, key: str, lo: int, hi: int, default=None) -> int:
        v = self.raw.get(key)
        if v is None:
            if default is None:
                raise PdmixError(f"{self.path}: missing field {key}")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"is {v!r} ({type(v).__name__}), expected an integer")
        if not lo <= v <= hi:
            raise self.fail(key, f"is {v}, expected {lo}..{hi}")
        return v

    def float(self, key: str, lo: float, hi: float, default: float) -> float:
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(key, f"is {v!r}, expected a finite number")
        if not lo < v < hi:
            raise self.fail(key, f"is {v}, expected between {lo} and {hi}")
        return float(v)

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.raw.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(key, f"is {v!r}, expected true or false")
        return v

    def token_ids(self, key: str, vocab: int) -> list[int]:
        v = self.raw.get(key)
        ids = [] if v is None else list(v) if isinstance(v, list) else [v]
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise PdmixError(f"{self.path}: {key} {v!r}: expected token ids in 0..{vocab - 1}")
        return ids


def _arch(raw: dict, path: Path) -> str:
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise PdmixError(f"{path}: architectures is {archs!r}, expected a list of names")
    if archs:
        arch = archs[0]
    else:
        model_type = raw.get("model_type")
        known = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
        if known is None:
            raise PdmixError(f"{path}: no \"architectures\" and model_type {model_type!r} is not one of "
                             f"{', '.join(BY_MODEL_TYPE)}")
        arch = known.name
    if arch not in ARCHITECTURES:
        raise PdmixError(f"{path}: architecture {arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _check_rope(raw: dict, path: Path) -> None:
    """The rotary settings Rotary reads: a known rope type and a finite, positive theta."""
    rp = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise PdmixError(f"{path}: rope_parameters is {rp!r}, expected an object")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise PdmixError(f"{path}: rope_type {rope_type!r} is unknown (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    theta = rp.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise PdmixError(f"{path}: rope_theta is {theta!r}, expected a finite number above 1")


def _moe_fields(f: _Fields, num_layers: int) -> dict:
    """Qwen3-MoE's routing fields (num_experts, or transformers 5's num_local_experts)."""
    key = "num_experts" if "num_experts" in f.raw or "num_local_experts" not in f.raw else "num_local_experts"
    experts = f.int(key, 1, MAX_EXPERTS)
    top_k = f.int("num_experts_per_tok", 1, MAX_EXPERTS)
    if top_k > experts:
        raise f.fail("num_experts_per_tok", f"is {top_k}, more than the model's {experts} experts ({key})")
    only = f.raw.get("mlp_only_layers") or []
    if not (isinstance(only, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers
                                           for i in only)):
        raise f.fail("mlp_only_layers", f"is {only!r}, expected a list of layer indices below {num_layers}")
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=f.int("moe_intermediate_size", 1, MAX_DIM),
                norm_topk_prob=f.bool("norm_topk_prob"), decoder_sparse_step=f.int("decoder_sparse_step", 1, MAX_LAYERS, 1),
                mlp_only_layers=tuple(only))


def load_config(folder: str | Path) -> ModelConfig:
    """config.json (and generation_config.json's eos ids), every field pdmix uses type- and range-checked."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise PdmixError(f"{folder}: not a directory")
    raw = read_json_object(path, " (not a Hugging Face model folder?)")
    arch = _arch(raw, path)
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if dtype_name not in DTYPES:
        raise PdmixError(f"{path}: dtype {dtype_name} is not supported (supported: bfloat16, float16)")
    qkv_bias, qk_norm = ARCHITECTURES[arch].qkv_bias, ARCHITECTURES[arch].qk_norm
    f = _Fields(raw, path)
    hidden = f.int("hidden_size", 1, MAX_DIM)
    heads = f.int("num_attention_heads", 1, MAX_HEADS)
    kv_heads = f.int("num_key_value_heads", 1, heads, default=heads)
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    if raw.get("head_dim") is None and hidden % heads:
        raise f.fail("hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads} (and no head_dim)")
    head_dim = f.int("head_dim", 1, MAX_DIM, default=hidden // heads)
    if head_dim % 2:
        raise f.fail("head_dim", f"is {head_dim}; rotary embeddings need an even head_dim")
    vocab = f.int("vocab_size", 1, MAX_VOCAB)
    attention_bias = f.bool("attention_bias")
    eos = f.token_ids("eos_token_id", vocab)
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.exists():
        eos = sorted(set(eos) | set(_Fields(read_json_object(gen_cfg), gen_cfg).token_ids("eos_token_id", vocab)))
    bos = f.token_ids("bos_token_id", vocab)
    _check_rope(raw, path)
    num_layers = f.int("num_hidden_layers", 1, MAX_LAYERS)
    return ModelConfig(
        arch=arch,
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", 1, MAX_DIM),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=f.float("rms_norm_eps", 0.0, 1.0, 1e-6),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        dtype=DTYPES[dtype_name],
        qkv_bias=qkv_bias or attention_bias,
        o_bias=arch == "LlamaForCausalLM" and attention_bias,
        mlp_bias=f.bool("mlp_bias"),
        qk_norm=qk_norm,
        max_position_embeddings=f.int("max_position_embeddings", 1, MAX_POSITIONS, default=32768),
        **(_moe_fields(f, num_layers) if ARCHITECTURES[arch].moe else {}),
        eos_token_ids=eos,
        bos_token_id=bos[0] if bos else None,
        raw=raw,
        folder=folder,
    )

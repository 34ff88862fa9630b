"""File and tensor names of a W8A8_MIX directory (SPEC §2-§3)."""

from pdmix.schemes.w8a8_mix import LEGACY_NAMES as LEGACY_QUANT_TYPES, NAME as QUANT_TYPE, TENSORS as QUANT_SUFFIXES

WEIGHT_FILE = "quant_model_weight_w8a8_mix.safetensors"
INDEX_FILE = WEIGHT_FILE + ".index.json"
SHARD_TEMPLATE = "quant_model_weight_w8a8_mix-{i:05d}-of-{n:05d}.safetensors"
DESCRIPTION_FILE = "quant_model_description.json"
FLOAT = "FLOAT"
VERSION = "1.0.0"

# Linear layers of one decoder layer, by HF name, and how TP shards them (SPEC §8).
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Linears that read the same input share static activation parameters and roll back together (SPEC §7).
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def linear_prefix(layer: int, name: str) -> str:
    """HF name of a decoder-layer linear, e.g. model.layers.3.self_attn.q_proj."""
    block = "self_attn" if name in ATTN_LINEARS else "mlp"
    return f"model.layers.{layer}.{block}.{name}"


def split_tensor_name(name: str) -> tuple[str, str]:
    """'a.b.q_proj.weight_scale' -> ('a.b.q_proj', 'weight_scale')."""
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix

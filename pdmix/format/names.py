"""File and tensor names of a W8A8_MIX directory (SPEC §2-§3)."""

from pdmix.schemes.w8a8_dynamic import NAME as DYNAMIC_TYPE, TENSORS as DYNAMIC_SUFFIXES
from pdmix.schemes.w8a8_mix import LEGACY_NAMES as LEGACY_QUANT_TYPES, NAME as QUANT_TYPE, TENSORS as QUANT_SUFFIXES

WEIGHT_FILE = "quant_model_weight_w8a8_mix.safetensors"
INDEX_FILE = WEIGHT_FILE + ".index.json"
SHARD_TEMPLATE = "quant_model_weight_w8a8_mix-{i:05d}-of-{n:05d}.safetensors"
DESCRIPTION_FILE = "quant_model_description.json"
FLOAT = "FLOAT"
VERSION = "1.0.0"
SCHEME_TENSORS = {QUANT_TYPE: QUANT_SUFFIXES, DYNAMIC_TYPE: DYNAMIC_SUFFIXES}  # label -> a linear's tensors


def split_tensor_name(name: str) -> tuple[str, str]:
    """'a.b.q_proj.weight_scale' -> ('a.b.q_proj', 'weight_scale')."""
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix

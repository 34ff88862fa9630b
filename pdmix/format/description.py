"""quant_model_description.json: every tensor name -> "W8A8_MIX", "W8A8_DYNAMIC" (docs/moe.md) or "FLOAT" (SPEC §2)."""

import json
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_json_object
from pdmix.format.names import DESCRIPTION_FILE, DYNAMIC_TYPE, FLOAT, LEGACY_QUANT_TYPES, QUANT_TYPE, VERSION

HEADER_KEYS = ("model_quant_type", "version")


def build_description(tensor_types: dict[str, str]) -> dict:
    desc = {"model_quant_type": QUANT_TYPE, "version": VERSION}
    desc.update(tensor_types)
    return desc


def write_description(folder: Path, tensor_types: dict[str, str]) -> None:
    with open(Path(folder) / DESCRIPTION_FILE, "w") as f:
        json.dump(build_description(tensor_types), f, indent=2)
        f.write("\n")


def read_description(folder: Path) -> tuple[dict, dict[str, str]]:
    """Returns (header, {tensor name: type}); legacy "W8A8" labels are read as W8A8_MIX."""
    path = Path(folder) / DESCRIPTION_FILE
    raw = read_json_object(path)
    header = {k: raw[k] for k in HEADER_KEYS if k in raw}
    types = {}
    for name, kind in raw.items():
        if name in HEADER_KEYS:
            continue
        if kind in LEGACY_QUANT_TYPES:
            kind = QUANT_TYPE
        if kind not in (QUANT_TYPE, DYNAMIC_TYPE, FLOAT):
            raise PdmixError(f"{path}: tensor {name} has unknown type {kind!r}")
        types[name] = kind
    return header, types


def is_quant_checkpoint(folder: Path) -> bool:
    return (Path(folder) / DESCRIPTION_FILE).exists()

"""Lazy, tensor-at-a-time access to the safetensors of a checkpoint folder (float HF or W8A8_MIX).

Nothing is read until asked for: the quantizer streams one decoder layer at a time and the
runtime loads one tensor at a time, so a model larger than RAM can still be processed.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pdmix.errors import PdmixError
from pdmix.format.names import INDEX_FILE, WEIGHT_FILE
from pdmix.jsonfile import read_json

HF_WEIGHT_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"


def _read_index(path: Path) -> dict[str, str]:
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if weight_map is None:
        raise PdmixError(f"{path}: not a valid safetensors index (no weight_map object)")
    if not isinstance(weight_map, dict):
        raise PdmixError(f"{path}: weight_map is not an object")
    return weight_map


def weight_files(folder: Path, quantized: bool) -> tuple[list[Path], Path | None]:
    """The safetensors files of a folder and its index json (None for a single file)."""
    single, index = (WEIGHT_FILE, INDEX_FILE) if quantized else (HF_WEIGHT_FILE, HF_INDEX_FILE)
    if (folder / index).exists():
        files = sorted({folder / f for f in _read_index(folder / index).values()})
        for f in files:
            if not f.exists():
                raise PdmixError(f"{f}: listed in {folder / index} but missing")
        return files, folder / index
    if (folder / single).exists():
        return [folder / single], None
    if not quantized:
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files, None
    raise PdmixError(f"{folder}: no {single} or {index} found")


class SafetensorsFolder:
    """All tensors of a folder's safetensors files, by name; each read on demand."""

    def __init__(self, folder: str | Path, quantized: bool):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PdmixError(f"{self.folder}: not a directory")
        self.files, self.index_path = weight_files(self.folder, quantized)
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in self.files:
            handle = self._open(f)
            for name in handle.keys():
                if name in self._where:
                    raise PdmixError(f"{f}: tensor {name} also in {self._where[name]}")
                self._where[name] = f
        if self.index_path is not None:
            listed = _read_index(self.index_path)
            for name, fname in listed.items():
                if self._where.get(name) != self.folder / fname:
                    raise PdmixError(f"{self.index_path}: tensor {name} is not in {fname}")
            for name in self._where:
                if name not in listed:
                    raise PdmixError(f"{self.index_path}: tensor {name} in {self._where[name].name} is not indexed")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except OSError as e:  # permission denied, a folder in its place, ...: not "not a valid safetensors file"
                raise PdmixError(f"{path}: cannot read ({e.strerror or e})") from None
            except (SafetensorError, ValueError) as e:
                raise PdmixError(f"{path}: not a valid safetensors file ({e})") from None
        return self._handles[path]

    def release(self) -> None:
        """Close the memory maps, so the pages read so far stop counting against this process."""
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise PdmixError(f"{self.folder}: tensor {name} missing")
        path = self._where[name]
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PdmixError(f"{path}: cannot read tensor {name} ({e})") from None

    def get_rows(self, name: str, rows: list[int]) -> dict[int, torch.Tensor]:
        """Selected rows [1, ...] of a tensor (embedding lookups), reading only those rows."""
        sl = self._open(self._where[name]).get_slice(name)
        return {r: sl[r:r + 1] for r in rows}

    def meta(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype string such as 'BF16', shape) without reading the data."""
        sl = self._open(self._where[name]).get_slice(name)
        return sl.get_dtype(), list(sl.get_shape())

"""Write a W8A8_MIX checkpoint with bounded memory.

Tensors arrive a decoder layer at a time and are spilled to small safetensors files at once.
`finish` then lays them out in shards of at most `part_file_size` GB, copying one tensor at a time
from the memory-mapped spill files: peak memory is one tensor, not one shard. A shard's safetensors
header is written by hand because the library only saves a whole in-memory dict.
"""

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pdmix.format.description import write_description
from pdmix.format.names import INDEX_FILE, SHARD_TEMPLATE, WEIGHT_FILE

_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """safetensors dtype string ('BF16') -> torch dtype."""
    return _TORCH_DTYPE[st_dtype]


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.dtype, list[int]]], fetch) -> None:
    """Write a safetensors file whose tensors come one at a time from fetch(name)."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            t = fetch(name).contiguous()
            assert t.dtype == dtype and list(t.shape) == list(shape), name
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


class CheckpointWriter:
    def __init__(self, out_dir: Path, part_file_size_gb: float = 4.0):
        self.out_dir = Path(out_dir)
        self.limit = max(1, int(part_file_size_gb * 1024**3))
        self.spill_dir = self.out_dir / ".spill"
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[tuple[str, torch.dtype, list[int], Path]] = []
        self.types: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor], types: dict[str, str]) -> None:
        """Spill a group of tensors (one decoder layer, say) to disk; types: name -> W8A8_MIX|FLOAT."""
        if not tensors:
            return
        path = self.spill_dir / f"{len(list(self.spill_dir.iterdir())):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        for name, t in tensors.items():
            if name in self.types:
                raise ValueError(f"tensor {name} written twice")
            self.entries.append((name, t.dtype, list(t.shape), path))
            self.types[name] = types[name]

    def add_from_file(self, name: str, st_dtype: str, shape: list[int], path: Path, kind: str) -> None:
        """Copy a tensor unchanged from an existing safetensors file (embeddings, say) at finish time."""
        self.entries.append((name, torch_dtype(st_dtype), list(shape), Path(path)))
        self.types[name] = kind

    def _plan_shards(self) -> list[list[int]]:
        shards, current, size = [], [], 0
        for i, (_, dtype, shape, _) in enumerate(self.entries):
            n = _nbytes(dtype, shape)
            if current and size + n > self.limit:
                shards.append(current)
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            shards.append(current)
        return shards

    def finish(self) -> list[str]:
        """Lay out the shards, the index (when more than one) and the description; returns file names."""
        where = {e[0]: e[3] for e in self.entries}
        current = {}  # one open file at a time: its mapped pages stop counting once it is closed

        def fetch(name):
            path = where[name]
            if path not in current:
                current.clear()
                current[path] = safe_open(str(path), framework="pt")
            return current[path].get_tensor(name)

        shards = self._plan_shards()
        names = [WEIGHT_FILE] if len(shards) == 1 else [
            SHARD_TEMPLATE.format(i=i + 1, n=len(shards)) for i in range(len(shards))]
        weight_map, total = {}, 0
        for fname, idx in zip(names, shards):
            entries = [self.entries[i][:3] for i in idx]
            write_safetensors_streaming(self.out_dir / fname, entries, fetch)
            for name, dtype, shape in entries:
                weight_map[name] = fname
                total += _nbytes(dtype, shape)
        if len(shards) > 1:
            with open(self.out_dir / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
        current.clear()
        for p in self.spill_dir.iterdir():
            p.unlink()
        self.spill_dir.rmdir()
        write_description(self.out_dir, self.types)
        return names

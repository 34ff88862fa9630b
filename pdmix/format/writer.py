"""Write a W8A8_MIX checkpoint with bounded memory.

Tensors arrive a decoder layer at a time and are spilled to small safetensors files at once.
`finish` then lays them out in shards of at most `part_file_size` GB, copying bytes from the spill
files (and, for tensors kept as they are, from the source model's files): peak memory is one copy
buffer, not one shard or even one tensor. A shard's safetensors
header is written by hand because the library only saves a whole in-memory dict.
"""

import json
import struct
from pathlib import Path

import torch
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


COPY_CHUNK = 64 * 1024**2


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.dtype, list[int], Path]]) -> None:
    """Write a safetensors file by copying each tensor's bytes from the file that holds it.

    Plain reads in bounded chunks, no memory map and no tensor object: memory stays at one chunk.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    sources = {}
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, dtype, shape, src in entries:
            if src not in sources:
                sources[src] = read_header(src)
            src_header, base = sources[src]
            meta = src_header[name]
            if meta["dtype"] != _ST_DTYPE[dtype] or list(meta["shape"]) != list(shape):
                raise ValueError(f"{src}: tensor {name} changed since it was recorded")
            start, end = meta["data_offsets"]
            with open(src, "rb") as f:
                f.seek(base + start)
                remaining = end - start
                while remaining:
                    chunk = f.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise ValueError(f"{src}: tensor {name} is truncated")
                    out.write(chunk)
                    remaining -= len(chunk)


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
        shards = self._plan_shards()
        names = [WEIGHT_FILE] if len(shards) == 1 else [
            SHARD_TEMPLATE.format(i=i + 1, n=len(shards)) for i in range(len(shards))]
        weight_map, total = {}, 0
        for fname, idx in zip(names, shards):
            entries = [self.entries[i] for i in idx]
            write_safetensors_streaming(self.out_dir / fname, entries)
            for name, dtype, shape, _ in entries:
                weight_map[name] = fname
                total += _nbytes(dtype, shape)
        if len(shards) > 1:
            with open(self.out_dir / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
        for p in self.spill_dir.iterdir():
            p.unlink()
        self.spill_dir.rmdir()
        write_description(self.out_dir, self.types)
        return names

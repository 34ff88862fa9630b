"""Tensor parallelism (SPEC §8) as a few plain functions.

`torchrun` sets WORLD_SIZE/RANK; every rank loads its shard of each linear and runs the same
schedule. Row-parallel linears all-reduce their exact accumulators, so ranks stay bit-identical
to one process.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdmix.errors import PdmixError


@dataclass(frozen=True)
class TP:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> TP:
    return TP(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)))


def init(device: torch.device) -> tuple[TP, torch.device]:
    """Join the process group started by torchrun (gloo on CPU, nccl on CUDA); one GPU per rank."""
    tp = from_env()
    if tp.size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", tp.rank)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=tp.rank, world_size=tp.size)
    return tp, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(cfg, size: int) -> None:
    for what, n in (("attention heads", cfg.num_heads), ("key/value heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size), ("expert intermediate size", cfg.moe_intermediate_size)):
        if n % size:
            raise PdmixError(f"{cfg.folder}: tensor parallel size {size} does not divide its {n} {what}")


def shard(t: torch.Tensor, dim: int, tp: TP) -> torch.Tensor:
    """This rank's contiguous slice of t along dim."""
    step = t.shape[dim] // tp.size
    return t.narrow(dim, tp.rank * step, step).contiguous()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_last(t: torch.Tensor) -> torch.Tensor:
    """The ranks' shards of t, concatenated in rank order along the last dimension."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(t: torch.Tensor, tp: TP) -> torch.Tensor:
    """Rank 0's t on every rank (sampled tokens: random sampling must agree across ranks)."""
    if tp.size > 1 and t.numel():
        dist.broadcast(t, src=0)
    return t

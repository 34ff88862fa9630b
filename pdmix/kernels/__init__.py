"""Kernel backends of the W8A8_MIX linear (SPEC §5).

A backend is one class. It is built once per layer from the layer's `W8A8Params` (prepacking,
layouts, derived scales: all load-time work), then `apply(x, n_dynamic)` computes a whole step's
rows: rows [0, n_dynamic) on the dynamic (prefill) path, the rest on the static (decode) path.
`unsupported(device, row_parallel)` says why a backend cannot run a layer (None if it can).

Each device type has a priority list; the first backend that can run a layer is used, unless one is
forced by name (`--kernel`, `LLM(kernel=...)`). `reference` is plain torch, runs anywhere, and is the
oracle of the tests.
"""

import torch

from pdmix.errors import PdmixError
from pdmix.kernels import onednn, s8gemm
from pdmix.kernels.cpu_int8 import CpuInt8Kernel
from pdmix.kernels.cuda import CudaKernel
from pdmix.kernels.onednn import OneDNNKernel
from pdmix.kernels.reference import ReferenceKernel
from pdmix.schemes.w8a8_mix import W8A8Params

BACKENDS = {k.name: k for k in (OneDNNKernel, CpuInt8Kernel, CudaKernel, ReferenceKernel)}


def priority(device_type: str) -> tuple[str, ...]:
    """The backends a device type tries, in order. On CPUs where pdmix's own C GEMM has a vector path
    (x86 with AVX2 or AVX-512 VNNI) it comes first: it streams the checkpoint's weight at decode
    (1.5x oneDNN's GEMM at batch 1 with VNNI, about 2x without, where oneDNN's exact form runs twice
    the arithmetic) and is about even at prefill (docs/performance.md). Elsewhere oneDNN comes first,
    unless it is inexact there (onednn.needs_split, checked at first use, not at import)."""
    if device_type == "cpu":
        own_first = s8gemm.isa() not in (None, "plain") or onednn.needs_split()
        return ("cpu_int8", "onednn", "reference") if own_first else ("onednn", "cpu_int8", "reference")
    return ("cuda", "reference") if device_type == "cuda" else ("reference",)


def check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise PdmixError(f"--kernel {name}: unknown kernel backend; choose from {', '.join(BACKENDS)}")


def choose(device: torch.device, row_parallel: bool = False, name: str | None = None):
    """The backend class for a layer: the forced one (if it can run it) or the first of the device's list."""
    device = torch.device(device)
    check_name(name)
    if name is not None:
        why = BACKENDS[name].unsupported(device, row_parallel)
        if why:
            raise PdmixError(f"--kernel {name}: cannot run this layer on {device.type}: {why}")
        return BACKENDS[name]
    for candidate in priority(device.type):
        if BACKENDS[candidate].unsupported(device, row_parallel) is None:
            return BACKENDS[candidate]
    return ReferenceKernel


def build(p: W8A8Params, out_dtype: torch.dtype, name: str | None = None, reduce=None, reduce_max=None):
    """A ready kernel for one layer."""
    cls = choose(p.weight.device, reduce is not None, name)
    return cls(p, out_dtype, reduce, reduce_max)

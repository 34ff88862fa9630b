"""`pdmix bench --peaks`: the machine's measured GEMM and copy peaks, and the fraction of them that
each linear timing reached."""

import torch
import torch.nn.functional as F

from pdmix import kernels
from pdmix.bench.common import sig
from pdmix.bench.linear import activation, make_linear_pair
from pdmix.bench.machine import median_time

PEAK_GEMM = 2048      # M = N = K of the GEMMs that measure compute peaks
PEAK_COPY_BYTES = 1 << 28


def machine_peaks(device: torch.device, dtype: torch.dtype) -> dict:
    """What this device reaches on work that is pure compute or pure memory traffic, for judging each
    linear's number against: bf16 and int8 GEMM throughput at a large square size, and copy bandwidth
    (bytes read + written) of a 256 MiB tensor."""
    n = PEAK_GEMM
    w, params = make_linear_pair(n, n, dtype, device)
    a = activation(n, n, dtype, device, 1)
    peaks = {"bf16_gflops": 2 * n ** 3 / median_time(lambda: F.linear(a, w), device, 1, 3) / 1e9}
    kernel = kernels.build(params, dtype)
    if hasattr(kernel, "gemm"):  # the int8 GEMM alone, without quantization
        x_u8 = torch.randint(0, 256, (n, n), dtype=torch.uint8, device=device)
        peaks["int8_gops"] = 2 * n ** 3 / median_time(lambda: kernel.gemm(x_u8, None), device, 1, 3) / 1e9
    src = torch.empty(PEAK_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    peaks["copy_gbps"] = 2 * PEAK_COPY_BYTES / median_time(lambda: dst.copy_(src), device, 1, 5) / 1e9
    return {k: sig(v) for k, v in peaks.items()}


def bound(row_path: dict, flop: int, weight_bytes: int, peaks: dict, int8: bool) -> dict:
    """The fraction of the compute peak and of the memory peak that one timing reached."""
    seconds = row_path["ms"] / 1e3
    compute = peaks.get("int8_gops" if int8 else "bf16_gflops")
    gflops, gbps = flop / seconds / 1e9, weight_bytes / seconds / 1e9
    out = {"gbps": sig(gbps), "of_copy_peak": sig(gbps / peaks["copy_gbps"])}
    if compute:
        out["of_compute_peak"] = sig(gflops / compute)
    return out

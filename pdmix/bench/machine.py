"""The machine `pdmix bench` runs on: what it is (CPU or GPU name, Triton version, load average),
its clock (one call and the median of repeated calls, synchronized on CUDA) and its memory (freeing,
peak, resident bytes)."""

import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

MEASURE_BUDGET_S = 1.0     # stop repeating one timing once it has taken this long (slow CPU cases)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def load_average() -> float | None:
    """1-minute load average: CPU timings on a machine loaded past its cores are noise."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: reset the RSS high-water mark, so the peak is the engines' (loaded after
        # quantizing) rather than the whole process's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak is then the process's since its start


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max_memory_allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # kB on Linux


def time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of up to `iters` calls (fewer once MEASURE_BUDGET_S is spent)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    while len(times) < iters and sum(times) < MEASURE_BUDGET_S:
        times.append(time_once(fn, device))
    return statistics.median(times)


def current_rss() -> int:
    """Resident bytes now (Linux), mapped file pages included."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

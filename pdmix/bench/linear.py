"""`pdmix bench` (a), linear level: the fused linear shapes of a decoder layer, bf16 F.linear timed
against the W8A8_MIX linear's dynamic and static paths on each kernel backend, with their error."""

import torch
import torch.nn.functional as F

from pdmix import kernels
from pdmix.bench.common import log, sig
from pdmix.bench.machine import free_memory, median_time
from pdmix.errors import PdmixError
from pdmix.models import arch
from pdmix.quant.arithmetic import quantize_linear, static_activation_params
from pdmix.schemes import w8a8_mix

CALIB_ROWS = 256           # activation rows a bench linear's static input range is calibrated on
W8A8_PATHS = ("dynamic", "static")  # timed against "bf16": F.linear in the model dtype (fp16 for an fp16 model)


def linear_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """(n, k) of the fused linears of one decoder layer, by input group (qkv, o, gate_up, down)."""
    d = arch.dims(dims["hidden_size"], dims["intermediate_size"], dims["num_heads"], dims["num_kv_heads"],
                  dims["head_dim"])
    return {g: arch.group_shape(d, g) for g in arch.GROUPS}


def make_linear_pair(n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(float weight [n,k], the W8A8Params quantized from it) on device. The static input range
    is calibrated on a random activation sample drawn like the bench's inputs (see `activation`)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    sample = activation(CALIB_ROWS, k, dtype, torch.device("cpu"), seed + 1)
    scale, offset = static_activation_params(sample.min().reshape(1), sample.max().reshape(1), dtype)
    params = w8a8_mix.params_from_tensors(vars(quantize_linear(w, None, scale, offset)), f"bench.{n}x{k}")
    return w.to(device), params.to(device)


def backends_for(device: torch.device, names: list[str] | None) -> list[str]:
    """The kernel backends to time: those named, or every one that runs on the device."""
    for name in names or ():
        kernels.check_name(name)
        why = kernels.BACKENDS[name].unsupported(device, False)
        if why:
            raise PdmixError(f"--kernels {name}: cannot run on {device.type}: {why}")
    return names or [n for n, k in kernels.BACKENDS.items() if k.unsupported(device, False) is None]


def activation(m: int, k: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Standard normal rows, drawn on the device (a CPU draw of a large M x K is slow)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, k, generator=g, device=device).to(dtype)


def run_path(path: str, x: torch.Tensor, w: torch.Tensor, kernel=None) -> torch.Tensor:
    """bf16 F.linear, or one W8A8 path (dynamic / static) of a kernel backend, quantization included."""
    if path == "bf16":
        return F.linear(x, w)
    return kernel.apply(x, x.shape[0] if path == "dynamic" else 0)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_linear_case(layer: str, m: int, w: torch.Tensor, built: dict, s: dict, device, seed: int) -> dict:
    n, k = w.shape
    flop = 2 * m * n * k
    x = activation(m, k, w.dtype, device, seed)
    row = {"layer": layer, "m": m, "n": n, "k": k}
    timed = lambda path, kernel=None: median_time(lambda: run_path(path, x, w, kernel), device, s["warmup"], s["iters"])
    with torch.inference_mode():
        ref = run_path("bf16", x, w)
        bf16 = timed("bf16")
        row["bf16"] = {"ms": sig(bf16 * 1e3), "tflops": sig(flop / bf16 / 1e12)}
        for name, kernel in built.items():
            row[name] = {}
            for path in W8A8_PATHS:
                t = timed(path, kernel)
                row[name][path] = {"ms": sig(t * 1e3), "tflops": sig(flop / t / 1e12), "speedup": sig(bf16 / t),
                                   "rel_err": sig(rel_err(run_path(path, x, w, kernel), ref))}
    return row


def bench_linears(dims: dict, s: dict, device: torch.device, dtype: torch.dtype, seed: int,
                  backends: list[str]) -> tuple[list, list]:
    rows, skipped = [], []
    ms = [m for m in s["m"] if m <= s["max_m"]]
    skipped += [{"layer": "*", "m": m, "reason": f"M > --max_m {s['max_m']}"} for m in s["m"] if m > s["max_m"]]
    for i, (layer, (n, k)) in enumerate(linear_shapes(dims).items()):
        log(f"linear {layer} n={n} k={k}: M {','.join(map(str, ms))}")
        w, params = make_linear_pair(n, k, dtype, device, seed + 10 * i)
        built = {name: kernels.build(params, dtype, name) for name in backends}
        for m in ms:
            try:
                rows.append(bench_linear_case(layer, m, w, built, s, device, seed + 10 * i + 2))
            except RuntimeError as e:  # out of memory, or a kernel that rejects this M
                skipped.append({"layer": layer, "m": m, "reason": str(e).splitlines()[0][:200]})
                free_memory(device)
        del w, params, built
        free_memory(device)
    return rows, skipped

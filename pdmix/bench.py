"""`pdmix bench`: speed of float vs W8A8 PD-mix on one device, in one process.

(a) Linear level: the four fused linear shapes of a decoder layer, bf16 F.linear against the
    W8A8_MIX linear on its dynamic (prefill) and static (decode) paths, activation quantization
    included. The W8A8 linear is a W8A8MixLinear built by the quantizer's arithmetic and run with
    the kernel backend the runtime picks for the device, so it times the code the runtime runs.
(b) End to end: prefill and decode throughput, TTFT, TPOT and peak memory of the runtime (LLM) on
    the float model and on its pdmix quantization (made here with a short calibration).

The model is a float Hugging Face folder (--model_path) or a named shape with random weights
(--shape); everything built goes to a temporary folder that is removed at the end.
"""

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pdmix import kernels
from pdmix.errors import PdmixError
from pdmix.models import arch
from pdmix.params import whole
from pdmix.paths import check_output_file, check_writable_dir, write_results
from pdmix.quant.arithmetic import quantize_linear, static_activation_params
from pdmix.schemes import w8a8_mix
from pdmix.synth import SHAPES, shape_arch

DEFAULT_M = [1, 16, 64, 256, 1024, 2048, 4096, 8192]
# Flags left unset take these, by device type. CPU keeps M and the iterations small: one large-M
# GEMM of a real shape takes seconds there.
DEFAULTS = {
    "cuda": dict(iters=50, warmup=10, max_m=8192, prompt_lens=[128, 2048], batch_sizes=[1, 32]),
    "cpu": dict(iters=5, warmup=1, max_m=1024, prompt_lens=[128, 2048], batch_sizes=[1, 32]),
}
BIG_HIDDEN = 4096          # qwen3-8b and larger: CPU prefill defaults to short prompts only
MEASURE_BUDGET_S = 1.0     # stop repeating one timing once it has taken this long (slow CPU cases)
CALIB_ROWS = 256           # activation rows a bench linear's static input range is calibrated on
CALIB_MAX_LEN = 256        # tokens per calibration prompt of the end-to-end quantization
W8A8_PATHS = ("dynamic", "static")  # timed against "bf16": F.linear in the model dtype (fp16 for an fp16 model)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_path", help="float Hugging Face folder (quantized here with a short calibration)")
    src.add_argument("--shape", choices=list(SHAPES), help="random Qwen3 (or, *-a3b and tiny-moe, Qwen3-MoE) weights of this shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of --shape (default: all of the shape)")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--m", type=int_list, default=None, help=f"linear rows M (default {','.join(map(str, DEFAULT_M))})")
    p.add_argument("--max_m", type=int, default=None, help="skip larger M (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per linear (default 50 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10 CUDA, 1 CPU)")
    p.add_argument("--prompt_lens", type=int_list, default=None,
                   help="prefill prompt lengths (default 128,2048; 128 on CPU for 8B-size shapes)")
    p.add_argument("--batch_sizes", type=int_list, default=None, help="decode batch sizes (default 1,32)")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens generated per sequence when decoding")
    p.add_argument("--decode_prompt_len", type=int, default=128, help="prompt length of the decode sequences")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per point; the median is kept")
    p.add_argument("--calib_max_samples", type=int, default=8, help="calibration prompts of the quantization")
    p.add_argument("--skip_linear", action="store_true", help="no linear-level microbenchmark")
    p.add_argument("--skip_e2e", action="store_true", help="no end-to-end benchmark")
    p.add_argument("--tmp_dir", default=None, help="where the temporary model folders go (default: the system's)")
    p.add_argument("--quant_path", default=None,
                   help="an existing W8A8_MIX folder of --model_path to run end to end (default: quantize here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--hf", action="store_true",
                   help="also time transformers' bf16 generate (prefill, and decode at batch 1) on the float model")
    p.add_argument("--peaks", action="store_true",
                   help="also measure the machine's GEMM and copy peaks and say what bounds each linear timing")
    p.add_argument("--kernels", type=name_list, default=None,
                   help="W8A8 kernel backends timed at linear level (default: all that run on the device)")
    p.add_argument("--kernel", default=None, help="force this kernel backend end to end (default: the device's first)")
    p.add_argument("--compile", action="store_true",
                   help="also run both pdmix engines with their decoder stack compiled (float_compiled, pdmix_compiled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="JSON to stdout (the table goes to stderr)")
    p.add_argument("--output", default=None, help="write the JSON to this file")


def log(msg: str) -> None:
    print(f"[pdmix bench] {msg}", file=sys.stderr, flush=True)


def sig(x: float) -> float:
    """Four significant digits: readable JSON that never rounds a small positive time to 0."""
    return float(f"{x:.4g}")


# ---------------------------------------------------------------- settings and environment

def command_line(args) -> str:
    """The command as given, rebuilt from the parsed flags (works under cli.main(argv) too)."""
    words = ["pdmix", "bench"]
    for key, value in vars(args).items():
        if key.startswith("_") or key == "command" or value is None or value is False:
            continue
        words.append(f"--{key}")
        if isinstance(value, list):
            words.append(",".join(map(str, value)))
        elif value is not True:
            words.append(str(value))
    return shlex.join(words)


def model_dims(args) -> dict:
    """Shape of the model: from the named shape, or from the folder's config.json."""
    if args.shape:
        s = SHAPES[args.shape]
        return dict(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                    num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
                    vocab_size=s.get("vocab_size", 512), layers=args.layers or s["num_hidden_layers"], dtype="bfloat16",
                    **moe_dims(s.get("num_experts", 0), s.get("moe_intermediate_size", 0)))
    from pdmix.models.config import load_config
    cfg = load_config(args.model_path)
    return dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                layers=cfg.num_layers, dtype=str(cfg.dtype).removeprefix("torch."),
                **moe_dims(cfg.num_experts, cfg.moe_intermediate_size))


def moe_dims(experts: int, moe_intermediate_size: int) -> dict:
    """A MoE model's expert count and size (nothing for a dense one)."""
    return dict(experts=experts, moe_intermediate_size=moe_intermediate_size) if experts else {}


def resolve_settings(args, device: torch.device, dims: dict) -> dict:
    defaults = dict(DEFAULTS[device.type])
    if device.type == "cpu" and dims["hidden_size"] >= BIG_HIDDEN:
        defaults["prompt_lens"] = [128]
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    s.update(m=args.m or DEFAULT_M, decode_tokens=args.decode_tokens, decode_prompt_len=args.decode_prompt_len,
             repeats=args.repeats, calib_max_samples=args.calib_max_samples)
    for name in ("iters", "max_m", "repeats", "decode_prompt_len", "calib_max_samples"):
        if s[name] < 1:
            raise PdmixError(f"--{name} must be at least 1, got {s[name]}")
    if s["warmup"] < 0:
        raise PdmixError(f"--warmup must be at least 0, got {s['warmup']}")
    if s["decode_tokens"] < 2:
        raise PdmixError(f"--decode_tokens must be at least 2 (the first token comes from prefill), "
                         f"got {s['decode_tokens']}")
    return s


def check_args(args) -> None:
    if args.layers is not None and args.model_path:
        raise PdmixError("--layers applies to --shape only")
    if args.layers is not None:
        whole("--layers", args.layers, 1)
    if args.quant_path and not args.model_path:
        raise PdmixError("--quant_path needs --model_path (its float model)")
    if args.threads is not None:
        whole("--threads", args.threads, 1)
    if args.skip_linear and args.skip_e2e:
        raise PdmixError("--skip_linear and --skip_e2e together leave nothing to run")
    if args.tmp_dir is not None:
        check_writable_dir(args.tmp_dir, "--tmp_dir")


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


# ---------------------------------------------------------------- the machine's measured peaks

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


# ---------------------------------------------------------------- (a) linear level

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


# ---------------------------------------------------------------- (b) end to end

def check_disk(folder: Path, dims: dict, model_path: str | None) -> None:
    """Refuse early when the float and quantized folders cannot fit (a real shape is tens of GB)."""
    if model_path:
        need = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))  # quantized <= float
    else:
        layer = sum(n * k for n, k in linear_shapes(dims).values())
        if dims.get("experts"):  # every layer sparse: experts instead of the dense MLP
            layer += dims["hidden_size"] * (3 * dims["experts"] * dims["moe_intermediate_size"] - 3 * dims["intermediate_size"])
        embed = 2 * dims["vocab_size"] * dims["hidden_size"]
        need = 2 * (dims["layers"] * layer + embed) + (dims["layers"] * layer + 2 * embed)  # float + int8
    free = shutil.disk_usage(folder).free
    if need * 1.05 > free:
        raise PdmixError(f"the models need about {need / 1e9:.1f} GB in {folder}, {free / 1e9:.1f} GB free; "
                         "use fewer --layers or another --tmp_dir")


def prepare_models(args, dims: dict, s: dict, device: torch.device, tmp: Path) -> tuple[Path, Path, float | None]:
    """(float folder, quantized folder, quantization seconds or None for a given --quant_path)."""
    from pdmix.quant.config import QuantConfig
    from pdmix.quant.pipeline import quantize
    from pdmix.synth import make_random_model

    if args.quant_path:
        check_positions(Path(args.model_path), s)
        return Path(args.model_path), Path(args.quant_path), None
    check_disk(tmp, dims, args.model_path)
    if args.shape:
        log(f"building random {args.shape} with {dims['layers']} layers in {tmp}")
        float_dir = make_random_model(tmp / "float", shape_arch(args.shape), args.shape, layers=dims["layers"], seed=args.seed)
    else:
        float_dir = Path(args.model_path)
    check_positions(float_dir, s)
    log(f"quantizing to W8A8_MIX ({s['calib_max_samples']} calibration prompts)")
    t = time.perf_counter()
    config = QuantConfig(calib_max_samples=s["calib_max_samples"], calib_max_len=CALIB_MAX_LEN,
                         device=device.type, quiet=True)
    quant_dir = quantize(float_dir, tmp / "w8a8", config)
    return float_dir, quant_dir, time.perf_counter() - t


def current_rss() -> int:
    """Resident bytes now (Linux), mapped file pages included."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tensor_bytes(model) -> int:
    """Bytes of a model's weights as held at run time: parameters, buffers and the kernels' prepared tensors."""
    from pdmix.models.linear import W8A8MixLinear

    def kernel_tensors(kernel):
        for v in vars(kernel).values():
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, w8a8_mix.W8A8Params):
                yield from vars(v).values()

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for m in model.modules() if isinstance(m, W8A8MixLinear) and m.kernel for t in kernel_tensors(m.kernel)]
    storages = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in tensors if not t.is_mkldnn}
    return sum(storages.values()) + sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn)


def load_engine(folder: Path, s: dict, device: torch.device, kernel: str | None, compile: bool = False) -> tuple:
    """(LLM, load facts): seconds, RSS added by loading beside the model's tensor bytes and its KV cache."""
    from pdmix.runtime.kv_cache import blocks_needed
    from pdmix.runtime.llm import LLM

    block = 128
    # KV blocks for the largest point only, so the memory is what the benchmark needs.
    num_blocks = max(max(s["batch_sizes"]) * blocks_needed(s["decode_prompt_len"] + s["decode_tokens"], block),
                     blocks_needed(max(s["prompt_lens"]) + 1, block))
    free_memory(device)
    rss, t = current_rss(), time.perf_counter()
    llm = LLM(folder, block_size=block, max_batch_size=max(s["batch_sizes"]),
              max_input_length=max(s["prompt_lens"] + [s["decode_prompt_len"]]),
              max_output_length=s["decode_tokens"], num_blocks=num_blocks, device=str(device), kernel=kernel,
              compile=compile)
    facts = {"load_s": sig(time.perf_counter() - t), "load_rss_bytes": current_rss() - rss,
             "tensor_bytes": tensor_bytes(llm.model),
             "kv_cache_bytes": sum(c.numel() * c.element_size() for c in llm.engine.cache.k + llm.engine.cache.v)}
    t = time.perf_counter()
    llm.warmup()
    facts["warmup_s"] = sig(time.perf_counter() - t)  # with compile: tracing and compiling (or Inductor's cache)
    return llm, facts


def rates(tokens: int, seconds: float, cpu_seconds: float) -> dict:
    return {"tokens_per_s": sig(tokens / seconds), "tokens_per_cpu_s": sig(tokens / cpu_seconds)}


def engine_prefill(llm, prompt: list[int]) -> dict:
    from pdmix.runtime.sampling import SamplingParams
    llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    st = llm.stats
    return dict(rates(st.prefill_tokens, st.prefill_s, st.prefill_cpu_s), ttft_ms=sig(st.prefill_s * 1e3))


def engine_decode(llm, prompts: list[list[int]], n: int) -> dict:
    from pdmix.runtime.sampling import SamplingParams
    llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    st = llm.stats
    steps = st.decode_tokens / len(prompts)  # every sequence decodes in every step
    return dict(rates(st.decode_tokens, st.decode_s, st.decode_cpu_s), tpot_ms=sig(st.decode_s / steps * 1e3))


def hf_generate_times(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t, time.process_time() - c


def hf_prefill(model, prompt: list[int]) -> dict:
    wall, cpu = hf_generate_times(model, prompt, 1)
    return dict(rates(len(prompt), wall, cpu), ttft_ms=sig(wall * 1e3))


def hf_decode(model, prompt: list[int], n: int) -> dict:
    """transformers' own generate at batch 1: the time of n + 1 new tokens less that of 1."""
    wall1, cpu1 = hf_generate_times(model, prompt, 1)
    wall, cpu = hf_generate_times(model, prompt, n + 1)
    return dict(rates(n, wall - wall1, cpu - cpu1), tpot_ms=sig((wall - wall1) / n * 1e3))


def alternate(runners: dict, repeats: int, key: str) -> dict:
    """Run each engine `repeats` times, alternating them so that machine noise hits all alike; for
    each keep the run with the median `key`, and add each engine's speed-up over the float one."""
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            runs[name].append(run())
    point = {name: sorted(r, key=lambda x: x[key])[len(r) // 2] for name, r in runs.items()}
    for name in runners:
        if name != "float":
            base = point[speedup_base(name)]
            point[name]["speedup"] = sig(point[name]["tokens_per_s"] / base["tokens_per_s"])
            point[name]["cpu_speedup"] = sig(point[name]["tokens_per_cpu_s"] / base["tokens_per_cpu_s"])
    return point


def speedup_base(name: str) -> str:
    """What an engine's speed-up is over: pdmix_compiled over float_compiled (int8's gain among compiled
    engines), float_compiled and everything else over the eager float engine."""
    return "float_compiled" if name == "pdmix_compiled" else "float"


def bench_e2e(args, dims: dict, s: dict, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="pdmix-bench-", dir=args.tmp_dir) as tmp:
        float_dir, quant_dir, quant_s = prepare_models(args, dims, s, device, Path(tmp))
        result = {"quantize_s": None if quant_s is None else sig(quant_s), "float_path": str(float_dir),
                  "pdmix_path": str(quant_dir)}
        reset_peak_memory(device)
        engines, result["engines"] = {}, {}
        folders = [("float", float_dir, False), ("pdmix", quant_dir, False)]
        if args.compile:
            folders += [("float_compiled", float_dir, True), ("pdmix_compiled", quant_dir, True)]
        for name, folder, compiled in folders:
            log(f"end to end: loading the {name} engine")
            engines[name], result["engines"][name] = load_engine(
                folder, s, device, None if name.startswith("float") else args.kernel, compiled)
        hf = load_hf(float_dir) if args.hf else None
        g = torch.Generator().manual_seed(args.seed)
        vocab = engines["float"].cfg.vocab_size
        prompt = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()
        result["prefill"], result["decode"] = [], []
        for n in s["prompt_lens"]:
            log(f"end to end: prefill of {n} tokens")
            p = prompt(n)
            runners = {name: (lambda llm=llm: engine_prefill(llm, p)) for name, llm in engines.items()}
            if hf is not None:
                runners["transformers"] = lambda: hf_prefill(hf, p)
            result["prefill"].append(dict(prompt_len=n, **alternate(runners, s["repeats"], "tokens_per_s")))
        for b in s["batch_sizes"]:
            log(f"end to end: decode at batch {b}")
            ps = [prompt(s["decode_prompt_len"]) for _ in range(b)]
            runners = {name: (lambda llm=llm: engine_decode(llm, ps, s["decode_tokens"])) for name, llm in engines.items()}
            if hf is not None and b == 1:
                runners["transformers"] = lambda: hf_decode(hf, ps[0], s["decode_tokens"])
            result["decode"].append(dict(batch_size=b, prompt_len=s["decode_prompt_len"],
                                         **alternate(runners, s["repeats"], "tokens_per_s")))
        result["peak_mem_bytes"] = peak_memory(device)
        del engines, hf
        free_memory(device)
    return result


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM
    log("end to end: loading transformers' bf16 model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model


def check_positions(folder: Path, s: dict) -> None:
    from pdmix.models.config import load_config
    limit = load_config(folder).max_position_embeddings
    longest = max(s["prompt_lens"] + [s["decode_prompt_len"] + s["decode_tokens"]])
    if longest > limit:
        raise PdmixError(f"sequences of {longest} tokens exceed the model's max_position_embeddings {limit}")


# ---------------------------------------------------------------- report

def linear_table(rows: list, skipped: list, backends: list[str]) -> list[str]:
    head = f"{'layer':<10}{'M':>6}{'N':>7}{'K':>7} |{'bf16 ms':>9}{'TFLOP/s':>9}"
    for b in backends:
        head += f" |{b[:8] + ' dyn':>13}{'x':>7}{'err':>7}{'sta ms':>9}{'x':>7}{'err':>7}"
    lines = ["linear level (W8A8 includes activation quantization; x = speed-up vs bf16; err = rel. error vs bf16)",
             head, "-" * len(head)]
    for r in rows:
        line = f"{r['layer']:<10}{r['m']:>6}{r['n']:>7}{r['k']:>7} | {r['bf16']['ms']:>8.4g} {r['bf16']['tflops']:>8.3g}"
        for b in backends:
            d, st = r[b]["dynamic"], r[b]["static"]
            line += (f" | {d['ms']:>12.4g} {d['speedup']:>5.2f}x {d['rel_err']:>6.1%}"
                     f" {st['ms']:>8.4g} {st['speedup']:>5.2f}x {st['rel_err']:>6.1%}")
        lines.append(line)
    lines += [f"skipped {x['layer']} M={x['m']}: {x['reason']}" for x in skipped]
    return lines


def e2e_table(e2e: dict, mem_kind: str) -> list[str]:
    names = [n for n in ("float", "pdmix", "float_compiled", "pdmix_compiled", "transformers")
             if any(n in p for p in e2e["prefill"] + e2e["decode"])]
    lines = ["end to end (prompt rows W8A8 dynamic, decode rows static); tok/s and tokens per CPU-second; "
             "x = pdmix over float (then pdmix_compiled over float_compiled)",
             f"{'':<16}" + "".join(f"{n[:12] + ' tok/s':>19}{'/cpu-s':>9}" for n in names)
             + f"{'x':>7}{'x cpu':>7}" * (1 + ("pdmix_compiled" in names))]
    for part, key in (("prefill", "prompt_len"), ("decode", "batch_size")):
        for point in e2e[part]:
            label = f"{part} {'L' if part == 'prefill' else 'B'}={point[key]}"
            cells = "".join(f"{point[n]['tokens_per_s']:>19.1f}{point[n]['tokens_per_cpu_s']:>9.1f}" if n in point
                            else f"{'-':>19}{'-':>9}" for n in names)
            ratios = "".join(f"{point[n]['speedup']:>6.2f}x{point[n]['cpu_speedup']:>6.2f}x"
                             for n in ("pdmix", "pdmix_compiled") if n in point)
            lines.append(f"{label:<16}{cells}{ratios}")
    for name, eng in e2e["engines"].items():
        lines.append(f"{name} engine: load {eng['load_s']:.1f} s, warm-up {eng['warmup_s']:.1f} s, RSS {eng['load_rss_bytes'] / 2**30:+.2f} GiB for "
                     f"{eng['tensor_bytes'] / 2**30:.2f} GiB of tensors and a {eng['kv_cache_bytes'] / 2**30:.2f} GiB KV cache")
    lines.append(f"peak {mem_kind}: {e2e['peak_mem_bytes'] / 2**30:.2f} GiB")
    return lines


def format_table(result: dict) -> str:
    lines = [f"pdmix bench: {result['shape'] or result['model_path']}, {result['layers']} layers, {result['dtype']}, "
             f"{result['device_name']}, {result['torch_threads']} threads, torch {result['torch']}, "
             f"kernels {', '.join(result['kernel_backends'])} (end to end: {result['e2e_kernel']})"]
    load, cores = result["load_avg_start"], result["cpu_count"]
    if result["device"] == "cpu" and load is not None and load + result["torch_threads"] > cores + 0.5:
        lines.append(f"warning: load average {load} before the run, {result['torch_threads']} torch threads on "
                     f"{cores} cores: timings include waits for a CPU")
    if "linear" in result:
        lines += [""] + linear_table(result["linear"], result["linear_skipped"], result["kernel_backends"])
    if "e2e" in result:
        mem = "GPU mem" if result["device"] == "cuda" else "RSS"
        quant_s = result["e2e"]["quantize_s"]
        lines += ["", f"quantization: {quant_s:.1f} s" if quant_s else f"checkpoint: {result['e2e']['pdmix_path']}"]
        lines += e2e_table(result["e2e"], mem)
    return "\n".join(lines)


def run(args) -> int:
    from pdmix.device import resolve_device

    check_args(args)
    if args.output:
        check_output_file(args.output)  # now, not after the whole run
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(args)
    device = resolve_device(args.device)
    dims = model_dims(args)
    s = resolve_settings(args, device, dims)
    dtype = getattr(torch, dims["dtype"])
    backends = backends_for(device, args.kernels)
    kernels.check_name(args.kernel)
    result = {
        "command": command, "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version(),
        "kernel_backends": backends, "e2e_kernel": args.kernel or kernels.choose(device).name,
        "shape": args.shape, "model_path": args.model_path, "layers": dims["layers"], "dtype": dims["dtype"],
        "dims": {k: v for k, v in dims.items() if k not in ("layers", "dtype")},
        "settings": s,
        "peak_mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_start": load_average(),
    }
    if not args.skip_linear:
        result["linear"], result["linear_skipped"] = bench_linears(dims, s, device, dtype, args.seed, backends)
        if args.peaks:
            log("measuring the machine's peaks (GEMM throughput, copy bandwidth)")
            result["peaks"] = peaks = machine_peaks(device, dtype)
            for row in result["linear"]:
                flop, k_n = 2 * row["m"] * row["n"] * row["k"], row["n"] * row["k"]
                row["bf16"]["bound"] = bound(row["bf16"], flop, dtype.itemsize * k_n, peaks, int8=False)
                for name in backends:
                    for path in W8A8_PATHS:
                        row[name][path]["bound"] = bound(row[name][path], flop, k_n, peaks, int8=True)
    if not args.skip_e2e:
        result["e2e"] = bench_e2e(args, dims, s, device)
    result["load_avg_end"] = load_average()
    text = json.dumps(result, indent=2)
    if args.output:
        write_results(args.output, text + "\n")
    table = format_table(result)
    if args.json:
        print(text)
        print(table, file=sys.stderr)
    else:
        print(table)
    return 0

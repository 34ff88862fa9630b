"""`pdmix bench` (b), end to end: the float model and its quantization built in a temporary folder,
the runtime's engines (and optionally transformers) loaded on them, prefill and decode timed
alternately, and the engines' load facts and peak memory."""

import shutil
import tempfile
import time
from pathlib import Path

import torch

from pdmix.bench.common import log, sig
from pdmix.bench.linear import linear_shapes
from pdmix.bench.machine import current_rss, free_memory, peak_memory, reset_peak_memory
from pdmix.errors import PdmixError
from pdmix.schemes import w8a8_mix
from pdmix.synth import shape_arch

CALIB_MAX_LEN = 256        # tokens per calibration prompt of the end-to-end quantization


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
    # by where each tensor starts: one tensor under two names (tied embeddings, a kernel's view of its
    # weight) counts once, tensors side by side in one storage (kernels/arena.py) each count
    spans = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if not t.is_mkldnn}
    return sum(spans.values()) + sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn)


def load_engine(folder: Path, s: dict, device: torch.device, kernel: str | None, compile: bool = False,
                lm_head: str = "float") -> tuple:
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
              compile=compile, lm_head=lm_head)
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
        folders = [("float", float_dir, False, "float"), ("pdmix", quant_dir, False, "float")]
        if args.lm_head == "int8":
            folders.append(("pdmix_int8_head", quant_dir, False, "int8"))
        if args.compile:
            folders += [("float_compiled", float_dir, True, "float"), ("pdmix_compiled", quant_dir, True, "float")]
        for name, folder, compiled, lm_head in folders:
            log(f"end to end: loading the {name} engine")
            engines[name], result["engines"][name] = load_engine(
                folder, s, device, None if name.startswith("float") else args.kernel, compiled, lm_head)
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

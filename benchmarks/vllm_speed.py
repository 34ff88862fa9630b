"""Speed and memory of vLLM on a float model vs vLLM with pdmix's plugin on its W8A8_MIX checkpoint.

Prints one JSON object. Each engine lives in its own process (its RSS is its own), both stay up,
and every measurement alternates between them (float, plugin, float, plugin, ...; best of --reps):
- prefill tokens/s of one prompt of --prefill tokens;
- decode tokens/s at each batch size (decode time = time(max_tokens=N) - time(max_tokens=1));
- memory after load: the resident bytes of the decoder layers' linears (what their quant
  methods hold: the plugin's int8 weight and per-channel vectors, float members' weights; a float
  linear counts in * out * 2 bytes, also where vLLM keeps it prepacked in oneDNN) and the engine
  process's RSS.
Run it in the vLLM environment (scripts/setup_vllm.sh):

  .venv-vllm/bin/python benchmarks/vllm_speed.py --float FLOAT_DIR --quant W8A8_MIX_DIR
  .venv-vllm/bin/python benchmarks/vllm_speed.py --llama3-8b-widths DIR --tokenizer SMOLLM2_DIR --batch 1 8

--llama3-8b-widths builds (once, in DIR) a random Llama at Llama-3-8B's widths (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, 4 layers) with SmolLM2's tokenizer and vocabulary, and
its W8A8_MIX checkpoint (`pdmix quant`, 4 calibration prompts: the weights are random, the speed
is what counts).
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in its worker process
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the JSON

LLAMA3_8B_WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def linear_bytes(model) -> int:
    """Resident bytes of the decoder layers' linears, MoE experts included (module docstring)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    from pdmix.vllm.linear import W8A8MixLinearMethod
    from pdmix.vllm.moe import W8A8DynamicMoEMethod
    # every byte range once: tensors sharing memory (oneDNN's zero points of one width, experts' views of
    # their stacked weight) count once, tensors side by side in one storage (pdmix's weight arena) each count
    total, spans = 0, []

    def add(tensors) -> None:
        spans.extend((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)

    for module in model.model.layers.modules():
        if isinstance(module, RoutedExperts):
            method = module.quant_method
            add(module.parameters())
            if isinstance(method, W8A8DynamicMoEMethod) and method.experts is not None:
                add(t for kernels in method.experts for k in kernels for t in k.tensors().values())
            continue
        if not isinstance(module, LinearBase):
            continue
        method = module.quant_method
        if isinstance(method, W8A8MixLinearMethod):
            add(method.kernel.tensors().values())
            total += method.float_weight.nbytes if method.float_cols is not None else 0
        else:
            w = module.weight
            k = getattr(module, "input_size_per_partition", module.input_size)
            n = getattr(module, "output_size_per_partition", module.output_size)
            total += w.nbytes if w.numel() else k * n * 2
    end = 0
    for start, stop in sorted(spans):  # the union of the ranges
        total += max(stop - max(start, end), 0)
        end = max(end, stop)
    return total


def worker(folder: str, args, conn):
    from vllm import LLM, SamplingParams
    llm = LLM(folder, enforce_eager=True, max_model_len=args.prefill + args.decode + 64, dtype="bfloat16",
              distributed_executor_backend="uni", enable_prefix_caching=False, seed=0)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    vocab = llm.get_tokenizer().vocab_size
    prompt = lambda n, i: {"prompt_token_ids": [(17 + 31 * j + 101 * i) % vocab for j in range(n)]}  # noqa: E731

    def run(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    run([prompt(64, 0)], 4)  # warm-up
    import torch
    conn.send({"linear_bytes": linear_bytes(model), "rss_bytes_after_load": rss_bytes(),
               "torch_threads": torch.get_num_threads()})
    while (cmd := conn.recv()) is not None:
        kind, b = cmd
        if kind == "prefill":
            conn.send(run([prompt(args.prefill, 0)], 1))
        else:
            prompts = [prompt(32, i) for i in range(b)]
            conn.send(run(prompts, args.decode) - run(prompts, 1))


def build_llama3_8b_widths(root: Path, tokenizer: Path) -> tuple[Path, Path]:
    """The random float model and its W8A8_MIX checkpoint (built once)."""
    from transformers import AutoTokenizer

    from pdmix.synth import make_random_model
    src, quant = root / "float", root / "w8a8_mix"
    if not (src / "config.json").exists():
        vocab = AutoTokenizer.from_pretrained(tokenizer).vocab_size
        make_random_model(src, "llama", shape=LLAMA3_8B_WIDTHS, dtype=__import__("torch").bfloat16,
                          vocab_size=vocab, tie=True, tokenizer=False)
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy(tokenizer / name, src / name)
    if not (quant / "quant_model_description.json").exists():
        subprocess.run([sys.executable, "-m", "pdmix", "quant", "--model_path", str(src), "--save_path", str(quant),
                        "--device", "cpu", "--quant_type", "w8a8", "--calib_max_samples", "4", "--quiet",
                        "--overwrite"], check=True)
    return src, quant


def receive(proc, conn):
    """The engine process's next answer; stop (not hang) if it died."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            sys.exit(f"vllm_speed: error: an engine process exited with code {proc.exitcode} (its traceback is above)")
    return conn.recv()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--float", help="float (bf16) Hugging Face folder")
    p.add_argument("--quant", help="its W8A8_MIX folder")
    p.add_argument("--llama3-8b-widths", metavar="DIR", help="build/use the random Llama-3-8B-widths pair in DIR")
    p.add_argument("--tokenizer", help="with --llama3-8b-widths: a folder with SmolLM2's tokenizer")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32, help="tokens generated per sequence when timing decode")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=3, help="best of, per engine, alternating")
    args = p.parse_args()
    if args.llama3_8b_widths:
        if not args.tokenizer:
            p.error("--llama3-8b-widths needs --tokenizer")
        args.float, args.quant = map(str, build_llama3_8b_widths(Path(args.llama3_8b_widths), Path(args.tokenizer)))
    elif not (args.float and args.quant):
        p.error("give --float and --quant, or --llama3-8b-widths")

    import vllm
    load_start = round(os.getloadavg()[0], 2)  # the machine is shared: how quiet it was
    ctx = mp.get_context("spawn")
    engines = {}
    for name, folder in (("vllm_bf16", args.float), ("vllm_w8a8_mix_plugin", args.quant)):  # one starts at a time
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(folder, args, child))
        proc.start()
        engines[name] = (proc, parent, receive(proc, parent))

    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "vllm": vllm.__version__,
              "enforce_eager": True, "model_float": args.float, "model_quant": args.quant, "prefill": args.prefill,
              "decode_tokens": args.decode, "reps_best_of_alternating": args.reps}
    for name, (_, _, info) in engines.items():
        result[name] = dict(info)
    points = [("prefill", 0)] + [("decode", b) for b in args.batch]
    for kind, b in points:
        best = {name: float("inf") for name in engines}
        for _ in range(args.reps):
            for name, (_, conn, _) in engines.items():
                time.sleep(0.5)  # let the other engine's OpenMP threads go idle
                conn.send((kind, b))
                best[name] = min(best[name], receive(engines[name][0], conn))
        for name, t in best.items():
            key, tokens = (("prefill_tokens_per_s", args.prefill) if kind == "prefill"
                           else (f"decode_batch{b}_tokens_per_s", b * (args.decode - 1)))
            result[name][key] = round(tokens / t, 1)
    for _, conn, _ in engines.values():
        conn.send(None)
    for proc, _, _ in engines.values():
        proc.join()
    result["load_average_1min_at_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
    f, q = result["vllm_bf16"], result["vllm_w8a8_mix_plugin"]
    result["plugin_over_bf16"] = {k: round(q[k] / f[k], 3) for k in f if k != "torch_threads"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

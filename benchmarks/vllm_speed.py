"""Tokens/s of vLLM on a float model vs vLLM with pdmix's plugin on its W8A8_MIX checkpoint.

Prints one JSON object: for each engine, prefill tokens/s (one prompt of --prefill tokens) and
decode tokens/s at each batch size (decode time = time(max_tokens=N) - time(max_tokens=1)).
Run it in the vLLM environment (scripts/setup_vllm.sh):

  .venv-vllm/bin/python benchmarks/vllm_speed.py --float FLOAT_DIR --quant W8A8_MIX_DIR
"""

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def timed(llm, prompts, max_tokens: int, reps: int) -> float:
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best


def measure(folder: str, args) -> dict:
    from vllm import LLM
    llm = LLM(folder, enforce_eager=True, max_model_len=args.prefill + args.decode + 64, dtype="bfloat16",
              distributed_executor_backend="uni", enable_prefix_caching=False, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    prompt = lambda n, i: {"prompt_token_ids": [(17 + 31 * j + 101 * i) % vocab for j in range(n)]}  # noqa: E731
    timed(llm, [prompt(64, 0)], 4, 1)  # warm-up
    out = {"prefill_tokens_per_s": round(args.prefill / timed(llm, [prompt(args.prefill, 0)], 1, args.reps), 1)}
    for b in args.batch:
        prompts = [prompt(32, i) for i in range(b)]
        t = timed(llm, prompts, args.decode, args.reps) - timed(llm, prompts, 1, args.reps)
        out[f"decode_batch{b}_tokens_per_s"] = round(b * (args.decode - 1) / t, 1)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    from vllm.distributed import cleanup_dist_env_and_memory
    cleanup_dist_env_and_memory()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--float", required=True, help="float (bf16) Hugging Face folder")
    p.add_argument("--quant", required=True, help="its W8A8_MIX folder")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64, help="tokens generated per sequence when timing decode")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=3, help="best of; the first run of a new shape includes oneDNN JIT")
    args = p.parse_args()
    import torch
    import vllm
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "vllm": vllm.__version__, "enforce_eager": True, "model_float": args.float, "model_quant": args.quant,
              "prefill": args.prefill, "decode_tokens": args.decode, "reps_best_of": args.reps,
              "vllm_bf16": measure(args.float, args), "vllm_w8a8_mix_plugin": measure(args.quant, args)}
    result["torch_threads_in_engine"] = torch.get_num_threads()  # vLLM's CPU worker sets its own
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Engine variants of one checkpoint side by side: W8A8 kernel backend x lm_head form (x compiled),
alternating round by round in one process, after a warm-up. Prints JSON: per point and variant the
median tokens per CPU-second (and per second), and each variant's ratio to the first.

    python benchmarks/engine_ab.py --model_path CKPT --threads 1 \
        --variants onednn:float,cpu_int8:float,cpu_int8:int8 --prompt_len 512 --new_tokens 128 \
        --batch_sizes 1,16 --rounds 3

A variant is KERNEL:LM_HEAD[:compiled][:row_major]; row_major loads the cpu_int8 weights in the
checkpoint's layout rather than VNNI-packed (PDMIX_S8GEMM_PACK=0 during its load). Prefill is timed
on the batch-1 request's prompt; decode at batch B runs B different prompts of --prompt_len tokens
(the batch-1 request is the prefill's).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pdmix.runtime.llm import LLM
from pdmix.runtime.sampling import SamplingParams


def parse_variant(text: str) -> dict:
    parts = text.split(":")
    flags = set(parts[2:])
    if len(parts) < 2 or not flags <= {"compiled", "row_major"} or len(flags) != len(parts) - 2:
        sys.exit(f"pdmix: error: --variants {text!r}: expected KERNEL:LM_HEAD[:compiled][:row_major]")
    return {"name": text, "kernel": parts[0], "lm_head": parts[1], "compile": "compiled" in flags,
            "row_major": "row_major" in flags}


def run_point(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    llm.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    s = llm.stats
    return {"prefill": s.prefill_tokens / s.prefill_cpu_s, "prefill_wall": s.prefill_tokens / s.prefill_s,
            "decode": s.decode_tokens / s.decode_cpu_s, "decode_wall": s.decode_tokens / s.decode_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--variants", default="onednn:float,cpu_int8:float,cpu_int8:int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch_sizes", default="1")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 20000, (args.prompt_len,), generator=g).tolist() for _ in range(max(batches))]
    llms = {}
    for v in variants:
        os.environ["PDMIX_S8GEMM_PACK"] = "0" if v["row_major"] else "1"
        llms[v["name"]] = LLM(args.model_path, max_batch_size=max(batches), max_input_length=args.prompt_len,
                              max_output_length=args.new_tokens, kernel=v["kernel"], lm_head=v["lm_head"],
                              compile=v["compile"])
        llms[v["name"]].warmup()
    os.environ.pop("PDMIX_S8GEMM_PACK")
    runs = {(b, v["name"]): [] for b in batches for v in variants}
    for _ in range(args.rounds):
        for b in batches:
            for v in variants:
                runs[(b, v["name"])].append(run_point(llms[v["name"]], prompts[:b], args.new_tokens))
    first = variants[0]["name"]
    points = []
    for b in batches:
        point = {"batch_size": b, "variants": {}}
        for v in variants:
            rs = runs[(b, v["name"])]
            point["variants"][v["name"]] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
            if b > 1:  # a batch's prefill is not the point measured
                for k in ("prefill", "prefill_wall"):
                    del point["variants"][v["name"]][k]
        for name, m in point["variants"].items():
            base = point["variants"][first]
            m["ratio"] = {k: round(m[k] / base[k], 3) for k in m if k in base and k != "ratio"}
        points.append(point)
    print(json.dumps({"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                      "cpu_flags": sorted({f for f in open("/proc/cpuinfo").read().split()
                                           if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")}),
                      "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                      "unit": "tokens per CPU-second (and per second: *_wall), medians of the rounds",
                      "points": points, "time": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

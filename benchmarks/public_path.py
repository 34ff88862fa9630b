"""Decode speed as a user's plain script sees it: `pdmix.LLM(ckpt).generate(...)` with every default,
one thread, `time.process_time()`. Prints JSON, to set beside `pdmix bench`'s decode figure for the
same point (issue 16: within 10%).

    python benchmarks/public_path.py --model_path out/smol [--prompt_len 512] [--new_tokens 128] [--rounds 3]

A round times generate() for one token (the prefill) and for --new_tokens tokens on the same
--prompt_len-token prompt of WikiText-2 text; the decode rate is
(new_tokens - 1) over the difference. The median of the rounds is reported, after one round of warm-up.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pdmix

TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    llm = pdmix.LLM(args.model_path)
    prompt = llm.encode(TEXT.read_text()[:40000])[:args.prompt_len]

    def cpu_seconds(n: int) -> float:
        t0 = time.process_time()
        llm.generate([prompt], pdmix.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.process_time() - t0

    rates = []
    for _ in range(args.rounds + 1):
        prefill, whole = cpu_seconds(1), cpu_seconds(args.new_tokens)
        rates.append((args.new_tokens - 1) / (whole - prefill))
    print(json.dumps({"command": "python benchmarks/public_path.py --model_path %s --prompt_len %d --new_tokens %d "
                      "--rounds %d" % (args.model_path, args.prompt_len, args.new_tokens, args.rounds),
                      "time": time.strftime("%Y-%m-%d %H:%M"), "threads": 1,
                      "decode_tokens_per_cpu_s": round(statistics.median(rates[1:]), 2),
                      "rounds": [round(r, 2) for r in rates[1:]]}, indent=1))


if __name__ == "__main__":
    main()

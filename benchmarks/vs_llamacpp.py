"""pdmix beside llama.cpp on the same CPU, alternating round by round in one run. Prints JSON.

    python benchmarks/vs_llamacpp.py --quant_path out/smol --float_path $(pdmix fetch smollm2) \
        --gguf smollm2-q8_0.gguf --llama_python /tmp/llama-venv/bin/python [--threads 1] [--rounds 3]

llama.cpp runs in its own venv (`--llama_python`, llama-cpp-python installed there, see
../shared/peers/README.md); nothing is installed into pdmix's. It is driven as a child process
over JSON lines, so each engine's CPU time is its own process's (`time.process_time()`), and the
engines never run at the same time. `--convert` makes the GGUF first from the float folder with
llama.cpp's own converter (`--llama_src`: an unpacked llama-cpp-python sdist).

Points, all at one prompt of --prompt_len tokens and --new_tokens greedy tokens, tokens per
CPU-second, medians of the rounds:
- prefill and decode of llama.cpp (the GGUF, e.g. Q8_0);
- pdmix W8A8 (the checkpoint with the default, exact float lm_head);
- pdmix W8A8 with `lm_head="int8"`;
- pdmix's float engine on the float checkpoint (what W8A8 is over).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r'''
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
            n_batch=512, n_ctx=int(sys.argv[3]), verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    llm.reset()
    t0 = time.process_time()
    llm.eval(req["prompt"])
    t1 = time.process_time()
    out = []
    for _ in range(req["new_tokens"]):
        tok = llm.sample(top_k=1, top_p=1.0, temp=0.0)
        out.append(int(tok))
        llm.eval([tok])
    t2 = time.process_time()
    print(json.dumps({"prefill_cpu_s": t1 - t0, "decode_cpu_s": t2 - t1, "tokens": out}), flush=True)
'''


class LlamaWorker:
    def __init__(self, python: str, gguf: str, threads: int, n_ctx: int):
        self.script = tempfile.NamedTemporaryFile("w", suffix="_llama_worker.py", delete=False)
        self.script.write(WORKER)
        self.script.close()
        self.proc = subprocess.Popen([python, self.script.name, gguf, str(threads), str(n_ctx)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            sys.exit(f"pdmix: error: --llama_python {python}: the llama.cpp worker did not start (is llama-cpp-python installed there?)")

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        # its first token comes from the prefill's logits, then new_tokens - 1 decode steps feed one token each
        return {"prefill": len(prompt) / r["prefill_cpu_s"], "decode": new_tokens / r["decode_cpu_s"]}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        os.unlink(self.script.name)


def pdmix_run(llm, prompt: list[int], new_tokens: int) -> dict:
    from pdmix.runtime.sampling import SamplingParams
    llm.generate([prompt], SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
    s = llm.stats
    return {"prefill": s.prefill_tokens / s.prefill_cpu_s, "decode": s.decode_tokens / s.decode_cpu_s}


def convert(llama_src: Path, folder: str, outtype: str, out: Path) -> None:
    """llama.cpp's own converter, run in this interpreter with its vendored gguf-py first on the path."""
    vendor = llama_src / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=str(vendor / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, str(vendor / "convert_hf_to_gguf.py"), folder, "--outtype", outtype,
                    "--outfile", str(out)], check=True, env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant_path", required=True, help="the W8A8_MIX checkpoint")
    p.add_argument("--float_path", required=True, help="its float Hugging Face folder")
    p.add_argument("--gguf", required=True, help="llama.cpp's model (made first with --convert)")
    p.add_argument("--llama_python", required=True, help="the python of a venv with llama-cpp-python")
    p.add_argument("--convert", default=None, metavar="OUTTYPE", help="make --gguf from --float_path first (q8_0, bf16)")
    p.add_argument("--llama_src", default=None, help="unpacked llama-cpp-python sdist (for --convert)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.convert:
        if not args.llama_src:
            sys.exit("pdmix: error: --convert needs --llama_src (an unpacked llama-cpp-python sdist)")
        convert(Path(args.llama_src), args.float_path, args.convert, Path(args.gguf))

    import torch

    from pdmix.runtime.llm import LLM
    torch.set_num_threads(args.threads)
    n_ctx = args.prompt_len + args.new_tokens + 8
    kw = dict(max_batch_size=1, max_input_length=args.prompt_len, max_output_length=args.new_tokens + 1)
    engines = {"pdmix": LLM(args.quant_path, **kw), "pdmix_int8_head": LLM(args.quant_path, lm_head="int8", **kw),
               "pdmix_float": LLM(args.float_path, **kw)}
    vocab = engines["pdmix"].cfg.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1000, min(vocab, 30000), (args.prompt_len,), generator=g).tolist()
    llama = LlamaWorker(args.llama_python, args.gguf, args.threads, n_ctx)
    runners = {"llama.cpp": lambda: llama.run(prompt, args.new_tokens)}
    runners.update({name: (lambda llm=llm: pdmix_run(llm, prompt, args.new_tokens)) for name, llm in engines.items()})
    for run in runners.values():  # warm-up
        run()
    rounds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rounds[name].append(run())
    llama.close()
    med = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in ("prefill", "decode")}
           for name, rs in rounds.items()}
    ratio = lambda a, b, k: round(med[a][k] / med[b][k], 3)
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "time": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "cpu_flags": sorted({f for f in open("/proc/cpuinfo").read().split()
                             if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")}),
        "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "unit": "tokens per CPU-second, medians of the rounds", "gguf": args.gguf,
        "kernels": engines["pdmix"].kernel_names, "medians": med, "all_rounds": rounds,
        "ratios": {"decode_b1_exact_over_llamacpp": ratio("pdmix", "llama.cpp", "decode"),
                   "decode_b1_int8_head_over_llamacpp": ratio("pdmix_int8_head", "llama.cpp", "decode"),
                   "prefill_over_llamacpp": ratio("pdmix", "llama.cpp", "prefill"),
                   "w8a8_decode_over_float_engine": ratio("pdmix", "pdmix_float", "decode")},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

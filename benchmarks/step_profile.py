"""Where a decode step's CPU time goes: linears, attention, lm_head, sampling, step metadata, and the
rest (norms, rotary, residuals, Python). Prints JSON.

    python benchmarks/step_profile.py --model_path CKPT [--threads 1] [--batch_size 1] [--prompt_len 512]

The engine's own methods are wrapped in torch.profiler.record_function for the measurement only;
times are the profiler's inclusive CPU times per decode step (profiling adds a little to each).
"""

import argparse
import contextlib
import functools
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pdmix.models.linear import FloatLinear, W8A8MixLinear
from pdmix.runtime import engine as engine_mod
from pdmix.runtime.attention import PagedAttention
from pdmix.runtime.llm import LLM
from pdmix.runtime.sampling import SamplingParams
from pdmix.runtime.scheduler import Sequence

PARTS = {"linear": [(FloatLinear, "forward"), (W8A8MixLinear, "forward")],
         "attention": [(PagedAttention, "__call__")],
         "lm_head": [(engine_mod.CausalLM, "logits")],
         "sampling": [(engine_mod.Engine, "sample")],
         "metadata": [(engine_mod, "prepare")],
         "step": [(engine_mod.Engine, "step")]}


@contextlib.contextmanager
def labelled():
    """Wrap each part's functions in a record_function named after the part, for the block's duration."""
    saved = []
    for label, targets in PARTS.items():
        for owner, name in targets:
            fn = getattr(owner, name)
            saved.append((owner, name, fn))

            def wrapper(*a, _fn=fn, _label=label, **kw):
                with record_function(_label):
                    return _fn(*a, **kw)
            setattr(owner, name, functools.wraps(fn)(wrapper))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model_path", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--decode_tokens", type=int, default=32)
    p.add_argument("--kernel", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model_path, max_batch_size=args.batch_size, max_input_length=args.prompt_len,
              max_output_length=args.decode_tokens + 1, kernel=args.kernel)
    llm.warmup()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.decode_tokens + 1, ignore_eos=True)
    seqs = [Sequence(torch.randint(0, llm.cfg.vocab_size, (args.prompt_len,), generator=g).tolist(), params)
            for _ in range(args.batch_size)]
    eng = llm.engine
    for seq in seqs:
        eng.scheduler.add(seq)
    while any(seq.prefilling for seq in seqs):  # prefill outside the profile: decode steps only
        eng.step()
    with labelled(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.decode_tokens):
            eng.step()
    events = {e.key: e.cpu_time_total / 1e3 / args.decode_tokens for e in prof.key_averages() if e.key in PARTS}
    parts = {label: round(events.get(label, 0.0), 3) for label in PARTS if label != "step"}
    parts["other"] = round(events["step"] - sum(parts.values()), 3)
    result = {"model_path": args.model_path, "threads": args.threads, "batch_size": args.batch_size,
              "context": args.prompt_len, "kernels": llm.kernel_names, "profiled_steps": args.decode_tokens,
              "decode_step_ms": round(events["step"], 3), "ms_per_step": parts,
              "note": "inclusive CPU time per decode step under torch.profiler; 'other' = norms, rotary, "
                      "residuals, embedding and Python between the parts"}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

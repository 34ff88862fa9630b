"""`pdmix eval`: perplexity per quantization path, through the pdmix runtime.

- dynamic: every token through the prefill (per-token) path;
- static: every token but the window's first through the decode (per-tensor) path. The first runs as
  prefill: a decode step always follows a prefill of at least one token, so it never computes a
  sequence's first token (the attention sink, whose activations are an outlier of their own);
- pdmix: the first `prefill_frac` of each window as prefill, the rest teacher-forced through the
  decode path, as generation sees it. Static quantization does not depend on other rows, so
  teacher-forcing the decode part is one forward whose later rows take the static path.
With `--compare FLOAT_PATH`: the float model's ppl, each mode's relative delta, its mean
KL(float || quantized) per predicted token and top-1 agreement with the float model on the same
windows (a delta also carries which way the errors happen to move this text's likelihood, KL does
not: docs/accuracy.md), and greedy-token agreement (the float model's greedy continuation,
teacher-forced through the quantized model in PD-mix: prompt as prefill, continuation as decode
rows; top-1 match rate).
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

from pdmix.errors import PdmixError
from pdmix.format.description import is_quant_checkpoint
from pdmix.params import DTYPE_HELP, DTYPES, LM_HEAD_HELP, LM_HEADS, check_dtype, number, whole
from pdmix.paths import check_output_file, os_reason, write_results

MODES = ("dynamic", "static", "pdmix")
CHAT_PROMPTS = (
    "What's deep learning?", "How do vaccines train the immune system?", "Give me three tips for learning a new language.",
    "Why is the sky blue?", "Explain recursion to a beginner programmer.", "What causes the seasons on Earth?",
    "How does a bill become a law in a parliament?", "Write a haiku about the sea.",
    "What is the difference between weather and climate?", "How do I make a good cup of tea?",
    "What are black holes?", "Summarise the causes of the French Revolution.",
    "What is a prime number? Give examples.", "How do solar panels produce electricity?",
    "What should I pack for a weekend hiking trip?", "Explain what a database index is.",
    "Why do cats purr?", "What is photosynthesis?", "How can I improve my public speaking?",
    "What is the Pythagorean theorem?",
)


def parse_range(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise PdmixError(f"--data_range {text}: expected START:END fractions, e.g. 0.25:1") from None
    if not 0 <= a < b <= 1:
        raise PdmixError(f"--data_range {text}: need 0 <= START < END <= 1")
    return a, b


def token_windows(tokenizer, data: Path, ctx: int, max_windows: int | None, data_range=(0.0, 1.0)) -> list[list[int]]:
    """Non-overlapping windows of ctx tokens from a slice (fractions of the tokens) of a text file."""
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PdmixError(f"--data {data}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PdmixError(f"--data {data}: cannot read ({os_reason(e)})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[int(len(ids) * data_range[0]):int(len(ids) * data_range[1])]
    wins = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    if max_windows:
        wins = wins[:max_windows]
    if not wins:
        raise PdmixError(f"--data {data}: fewer than {ctx} tokens in the chosen range")
    return wins


def prefill_rows(mode: str, n: int, prefill_frac: float) -> int:
    """How many of a window's n rows run as prefill (per-token path) in a mode."""
    return n if mode == "dynamic" else 1 if mode == "static" else max(1, int(n * prefill_frac))


class Divergence:
    """Sums over a mode's predicted tokens: the NLL of the text, KL(float || quantized) of the
    next-token distributions and agreement of their top-1 tokens. KL needs no reference text, so it
    separates a model's error from the luck of which way it moves the text's perplexity."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.top1 = self.tokens = 0

    def add(self, logits: torch.Tensor, ids: list[int], float_logprobs: torch.Tensor | None) -> torch.Tensor:
        """Counts one window (logits of its rows); returns the next-token log-probs of rows [:-1]."""
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)
        target = torch.tensor(ids[1:], device=lp.device)
        self.nll -= lp.gather(1, target[:, None]).sum().item()
        self.tokens += len(target)
        if float_logprobs is not None:
            f = float_logprobs.to(lp.device)
            self.kl += (f.exp() * (f - lp)).sum().item()
            self.top1 += (f.argmax(-1) == lp.argmax(-1)).sum().item()
        return lp

    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


def chat_ids(tokenizer, question: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(question)["input_ids"]


def greedy_agreement(quant_llm, float_llm, n_prompts: int, new_tokens: int) -> dict:
    from pdmix.runtime.sampling import SamplingParams
    prompts = [chat_ids(float_llm.tokenizer, q) for q in CHAT_PROMPTS[:n_prompts]]
    outs = float_llm.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    agree = total = 0
    for prompt, out in zip(prompts, outs):
        cont = out.outputs[0].token_ids
        logits = quant_llm.score(prompt + cont, len(prompt), "pdmix")
        pred = logits[len(prompt) - 1:-1].argmax(-1).tolist()
        agree += sum(int(a == b) for a, b in zip(pred, cont))
        total += len(cont)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "tokens": total, "agree": agree,
            "rate": agree / total}


def evaluate(model_path, data, ctx=512, max_windows=None, modes=MODES, prefill_frac=0.5, compare=None,
             data_range=(0.0, 1.0), agreement_prompts=20, agreement_tokens=64, device="cpu", quiet=False,
             lm_head: str = "float", dtype: str = "auto") -> dict:
    """Each mode's perplexity; with `compare` (a float model) also each mode's delta against it, its
    mean KL(float || quantized) per token and top-1 agreement on the same windows, and greedy agreement.
    lm_head: the evaluated model's lm_head form (the compare model keeps its float one). dtype: both
    models' activations (pdmix.params.DTYPES); float32 takes the runtime's bf16 rounding out of the
    comparison, 28-43% of the dynamic path's KL on SmolLM2 (docs/accuracy.md)."""
    from tqdm import tqdm

    from pdmix.runtime.llm import LLM
    from pdmix.models.config import load_config
    check_dtype(dtype, "dtype")
    quantized = is_quant_checkpoint(Path(model_path))
    modes = list(modes) if quantized else ["float"]
    max_pos = load_config(model_path).max_position_embeddings
    if ctx > max_pos:
        raise PdmixError(f"--ctx {ctx}: windows longer than the model's max_position_embeddings {max_pos}")
    limit = min(ctx + agreement_tokens + 256, max_pos)
    llm = LLM(model_path, max_input_length=limit, max_batch_size=4, device=device, lm_head=lm_head, dtype=dtype)
    float_llm = LLM(compare, max_input_length=limit, max_batch_size=4, device=device, dtype=dtype) if compare else None
    windows = token_windows(llm.tokenizer, Path(data), ctx, max_windows, data_range)
    result = {"model": str(model_path), "data": str(data), "data_range": list(data_range), "ctx": ctx,
              "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows), "prefill_frac": prefill_frac,
              "lm_head": lm_head, "dtype": str(llm.cfg.dtype).removeprefix("torch."), "device": str(llm.device),
              "ppl": {}}
    t0 = time.time()
    div = {m: Divergence() for m in modes}
    base = Divergence()
    with tqdm(total=len(windows), desc="eval", unit="window", disable=quiet, file=sys.stderr) as bar:
        for w in windows:  # window-major: the float model's log-probs of one window are held at a time
            f = base.add(float_llm.score(w, 0, "pdmix"), w, None) if float_llm is not None else None
            for mode in modes:
                div[mode].add(llm.score(w, prefill_rows(mode, len(w), prefill_frac),
                                        "dynamic" if mode == "dynamic" else "pdmix"), w, f)
            bar.update()
    result["ppl"] = {m: d.ppl() for m, d in div.items()}
    if float_llm is not None:
        result["compare"] = {"float_model": str(compare), "float_ppl": base.ppl(),
                             "delta": {m: p / base.ppl() - 1 for m, p in result["ppl"].items()},
                             "kl": {m: d.kl / d.tokens for m, d in div.items()},
                             "top1": {m: d.top1 / d.tokens for m, d in div.items()}}
        if agreement_prompts:
            result["compare"]["greedy_agreement"] = greedy_agreement(llm, float_llm, agreement_prompts,
                                                                     agreement_tokens)
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True)
    p.add_argument("--data", required=True, help="a text file (e.g. WikiText-2 valid.txt)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    p.add_argument("--max_windows", type=int, default=None)
    p.add_argument("--data_range", default="0:1", help="START:END fractions of the data's tokens, e.g. 0.25:1")
    p.add_argument("--quant_mode", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--prefill_frac", type=float, default=0.5, help="pdmix mode: share of a window run as prefill")
    p.add_argument("--compare", default=None, metavar="FLOAT_PATH", help="the float model to compare with")
    p.add_argument("--agreement_prompts", type=int, default=20)
    p.add_argument("--agreement_tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm_head", default="float", choices=LM_HEADS, help=LM_HEAD_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP + "; for both models")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--output", default=None, help="also write the JSON here")


def run(args) -> int:
    whole("--ctx", args.ctx, 2)
    number("--prefill_frac", args.prefill_frac, 0, 1, lo_open=True, hi_open=True)
    if args.max_windows is not None:
        whole("--max_windows", args.max_windows, 1)
    whole("--agreement_prompts", args.agreement_prompts, 0, len(CHAT_PROMPTS))
    whole("--agreement_tokens", args.agreement_tokens, 1)
    if args.output:
        check_output_file(args.output)  # now, not after the whole run
    if args.compare and Path(args.compare).resolve() == Path(args.model_path).resolve():
        raise PdmixError(f"--compare {args.compare} is --model_path itself")
    res = evaluate(args.model_path, args.data, args.ctx, args.max_windows, args.quant_mode, args.prefill_frac,
                   args.compare, parse_range(args.data_range), args.agreement_prompts, args.agreement_tokens,
                   args.device, quiet=args.json, lm_head=args.lm_head, dtype=args.dtype)
    text = json.dumps(res, indent=2)
    if args.output:
        write_results(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        for mode, ppl in res["ppl"].items():
            delta = res.get("compare", {}).get("delta", {}).get(mode)
            line = f"{mode:8s} ppl {ppl:9.4f}"
            if delta is not None:
                c = res["compare"]
                line += f"  ({delta:+.2%} vs float; KL {c['kl'][mode]:.5f} nats/token, top-1 {c['top1'][mode]:.2%})"
            print(line)
        if "compare" in res:
            c = res["compare"]
            print(f"float    ppl {c['float_ppl']:9.4f}")
            if "greedy_agreement" in c:
                g = c["greedy_agreement"]
                print(f"greedy agreement {g['rate']:.1%} of {g['tokens']} tokens over {g['prompts']} prompts")
        print(f"{res['windows']} windows x {res['ctx']} tokens of {res['data']} [{args.data_range}], "
              f"{res['dtype']} activations, {res['wall_s']}s")
    return 0

"""The accuracy table of docs/accuracy.md, end to end: anyone can rerun it.

SmolLM2-135M-Instruct (fetched by pdmix), WikiText-2 valid: calibrate on the first quarter of its
tokens, evaluate perplexity on the rest (ctx 512, non-overlapping windows) through the pdmix
runtime, for float and each recipe in {none, smooth, m4} x {minmax, mse} x {L0, L10, auto} x
{minmax, gptq weight rounding} (--w_methods) x {ratio, error rollback score} (--rollback_scores) x {all, decode
static-range tokens} (--static_tokens) x {none, quarot rotation} (--rotations), per path (dynamic, static, pdmix). Greedy-token agreement with float (20 chat prompts, 64 new tokens)
for the recipes named by --agreement.

    python scripts/accuracy_table.py --out out/accuracy --windows 20
"""

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
ANTI = ("none", "smooth", "m4")
OBSERVERS = ("minmax", "mse")
LEVELS = ("L0", "L10", "auto:1")
W_METHODS = ("minmax",)


def write_calibration(tokenizer, data: Path, path: Path, samples: int, tokens: int) -> None:
    """`samples` prompts of `tokens` tokens, evenly spaced over the first quarter of the data's tokens."""
    ids = tokenizer(data.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    quarter = ids[: len(ids) // 4]
    step = max(tokens, (len(quarter) - tokens) // max(samples - 1, 1))
    with open(path, "w") as f:
        for start in range(0, len(quarter) - tokens + 1, step)[:samples]:
            f.write(json.dumps({"inputs_pretokenized": tokenizer.decode(quarter[start:start + tokens])}) + "\n")


def recipe_name(anti, observer, level, w_method="minmax", score="ratio", static_tokens="all", rotation="none") -> str:
    return (f"{anti}-{observer}-{level.replace(':', '')}" + ("" if w_method == "minmax" else f"-{w_method}")
            + ("" if score == "ratio" else f"-{score}") + ("" if static_tokens == "all" else f"-{static_tokens}")
            + ("" if rotation == "none" else f"-{rotation}"))


def recipe_parts(name: str) -> tuple[str, str, str, str, str, str, str]:
    """recipe_name's (anti, observer, level, w_method, rollback score, static tokens, rotation)."""
    anti, observer, level, *rest = name.split("-")
    from pdmix.quant.calib_forward import STATIC_TOKENS
    from pdmix.quant.gptq import W_METHODS as methods
    from pdmix.quant.rollback import ROLLBACK_SCORES
    from pdmix.quant.rotate import ROTATIONS
    w_method = next((r for r in rest if r in methods), "minmax")
    score = next((r for r in rest if r in ROLLBACK_SCORES), "ratio")
    static_tokens = next((r for r in rest if r in STATIC_TOKENS), "all")
    rotation = next((r for r in rest if r in ROTATIONS and r != "none"), "none")
    return anti, observer, level, w_method, score, static_tokens, rotation


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "accuracy"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib_samples", type=int, default=32)
    ap.add_argument("--calib_tokens", type=int, default=256)
    ap.add_argument("--anti", nargs="+", default=list(ANTI))
    ap.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    ap.add_argument("--levels", nargs="+", default=list(LEVELS))
    ap.add_argument("--w_methods", nargs="+", default=list(W_METHODS), help="weight rounding: minmax, gptq")
    ap.add_argument("--rollback_scores", nargs="+", default=["ratio"], help="rollback ranking: ratio, error")
    ap.add_argument("--static_tokens", nargs="+", default=["all"], help="static-range tokens: all, decode")
    ap.add_argument("--rotations", nargs="+", default=["none"], help="rotation before quantizing: none, quarot")
    from pdmix.params import DTYPES
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="activations of both models in eval (pdmix eval --dtype): auto = bf16, as run and serve")
    ap.add_argument("--agreement", nargs="*", default=[], help="recipe names to measure greedy agreement for")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "accuracy.md"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from pdmix.evaluate import evaluate
    from pdmix.fetch import fetch_model
    from pdmix.models.config import load_config, with_dtype
    from pdmix.quant.config import QuantConfig
    from pdmix.quant.pipeline import quantize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = fetch_model("smollm2", quiet=True)
    calib = out / "calib.jsonl"
    if not calib.exists():
        write_calibration(AutoTokenizer.from_pretrained(model), Path(args.data), calib, args.calib_samples,
                          args.calib_tokens)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    common = dict(data=args.data, ctx=args.ctx, max_windows=args.windows, data_range=(0.25, 1.0), quiet=True,
                  dtype=args.dtype)
    # results measured in another dtype (older ones, without the field, were bf16) are measured again
    want = str(with_dtype(load_config(model), args.dtype).dtype).removeprefix("torch.")
    results = {n: r for n, r in results.items() if r.get("dtype", "bfloat16") == want}

    if "float" not in results:
        results["float"] = evaluate(model, **common)
        results_path.write_text(json.dumps(results, indent=1))
    for anti, observer, level, w_method, score, tokens, rotation in itertools.product(
            args.anti, args.observers, args.levels, args.w_methods, args.rollback_scores, args.static_tokens,
            args.rotations):
        name = recipe_name(anti, observer, level, w_method, score, tokens, rotation)
        if name in results and (name not in args.agreement or "greedy_agreement" in results[name].get("compare", {})):
            continue
        ckpt = out / name
        t0 = time.time()
        if not (ckpt / "quant_model_description.json").exists():
            quantize(model, ckpt, QuantConfig(anti_method=anti, observer=observer, disable_level=level, w_method=w_method,
                                              rollback_score=score, static_tokens=tokens, rotation=rotation,
                                              calib_file=str(calib), calib_max_samples=args.calib_samples,
                                              calib_max_len=args.calib_tokens, quiet=True), overwrite=True)
        quant_s = time.time() - t0
        res = evaluate(ckpt, compare=model, agreement_prompts=20 if name in args.agreement else 0, **common)
        res["quantize_s"] = round(quant_s, 1)
        res["float_linears"] = count_float_linears(ckpt)
        results[name] = res
        results_path.write_text(json.dumps(results, indent=1))
        d = res["compare"]["delta"]
        print(f"{name:24s} dyn {d['dynamic']:+.2%} sta {d['static']:+.2%} pdmix {d['pdmix']:+.2%} "
              f"({res['float_linears']} float linears, quant {quant_s:.0f}s)", file=sys.stderr, flush=True)
    write_doc(results, args, Path(args.doc), model)
    return 0


def count_float_linears(ckpt: Path) -> int:
    desc = json.loads((ckpt / "quant_model_description.json").read_text())
    return sum(1 for k, v in desc.items() if v == "FLOAT" and ".layers." in k and k.endswith("_proj.weight"))


def kl_cell(compare: dict) -> str:
    """KL(float || quantized) per token, in thousandths of a nat, of each path (absent in older results)."""
    kl = compare.get("kl")
    return " / ".join(f"{kl[m] * 1000:.2f}" for m in ("dynamic", "static", "pdmix")) if kl else ""


def agreement(g: dict | None) -> str:
    return f"{g['rate']:.1%} of {g['tokens']}" if g else ""


def write_doc(results: dict, args, doc: Path, model: Path) -> None:
    f = results["float"]
    base = f["ppl"]["float"]
    lines = [
        "# Accuracy: W8A8 PD-mix on SmolLM2-135M-Instruct",
        "",
        f"Made by `python scripts/accuracy_table.py --windows {args.windows}"
        f"{'' if f.get('dtype', 'bfloat16') == 'bfloat16' else ' --dtype float32'}` "
        f"({platform.machine()}, {os.cpu_count()} cores, CPU, torch, {f.get('dtype', 'bfloat16')} activations).",
        f"Model: SmolLM2-135M-Instruct (`pdmix fetch smollm2`). Data: WikiText-2 valid (`{Path(args.data).name}`): "
        f"calibration = {args.calib_samples} prompts of {args.calib_tokens} tokens evenly spaced over the first "
        f"quarter of its tokens; evaluation = {f['windows']} non-overlapping windows of {f['ctx']} tokens from the "
        f"rest ({f['tokens']} predicted tokens). Perplexity through the pdmix runtime; `pdmix` mode = first half "
        f"of each window prefill (dynamic per token), second half teacher-forced through the decode path (static); "
        f"`static` = every token after each window's first (which is prefill, as a decode step always has one "
        f"before it) through the decode path.",
        "",
        f"**Float perplexity: {base:.4f}**",
        "",
        "| anti-outlier | observer | rollback | weights | float linears | dynamic ppl | static ppl | pdmix ppl | "
        "Δ dynamic | Δ static | Δ pdmix | KL dynamic / static / pdmix | greedy agreement | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "float":
            continue
        anti, observer, level, w_method, score, tokens, rotation = recipe_parts(name)
        p, d = r["ppl"], r["compare"]["delta"]
        g = r["compare"].get("greedy_agreement")
        lines.append(f"| {anti if rotation == 'none' else rotation + ' + ' + anti} | {observer}{'' if tokens == 'all' else ', ' + tokens} | {level} ({score}) | {w_method} | {r.get('float_linears', '')} | {p['dynamic']:.4f} | "
                     f"{p['static']:.4f} | {p['pdmix']:.4f} | {d['dynamic']:+.2%} | {d['static']:+.2%} | "
                     f"{d['pdmix']:+.2%} | {kl_cell(r['compare'])} | {agreement(g)} | {r.get('quantize_s') or ''} |")
    best = pick_best(results)
    lines += [
        "",
        f"Targets: dynamic <= +{TARGETS['dynamic']:.1%}, static <= +{TARGETS['static']:.1%}, pdmix <= "
        f"+{TARGETS['pdmix']:.1%} ppl vs float. Recipes meeting all three, fewest float linears first: "
        + (", ".join(f"`{n}`" for n in best) if best else "none") + ".",
        "",
        "- `auto1` = `--disable_level auto:1`: the fewest most-sensitive linear groups "
        "kept float that bring the static path within 1% of the float model's perplexity on the "
        "calibration prompts. `L10` = the 10 most sensitive linears, msModelSlim's rollback. `(ratio)`: ranked by "
        "msModelSlim's max|x|/std; `(error)`: by the measured static W8A8 error of each group's layer output "
        "(`--rollback_score error`). `minmax, decode`: static ranges from every calibration token but each "
        "prompt's first (`--static_tokens decode`). `quarot + m4`: the float model rotated by Hadamard "
        "matrices first (`--rotation quarot`), then smoothed.",
        "- The seed's recipe (`--model_type Qwen3-14B`: m4, alpha 0.5, L10, minmax) is the `m4 | minmax | L10` row.",
        "- KL: the mean KL(float || quantized) of the next-token distributions over the same windows, in "
        "thousandths of a nat per token (`pdmix eval --compare`). A perplexity delta also carries which way "
        "the errors happen to move the text's likelihood, by some tenths of a percent either way between "
        "runs that KL ranks the same; KL measures the error alone.",
        "- Greedy agreement: the float model's greedy continuation (64 tokens, 20 chat prompts of "
        "`pdmix.evaluate.CHAT_PROMPTS`, chat template applied) teacher-forced through the quantized model in "
        "PD-mix (prompt as prefill, continuation as decode rows); the share of positions whose top-1 token "
        "matches.",
        "- Every checkpoint above passes `pdmix inspect`; the runtime's perplexity equals that of an "
        "independent SPEC §5 reference forward (`tests/test_recipes.py`).",
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")


TARGETS = {"dynamic": 0.005, "static": 0.02, "pdmix": 0.01}


def pick_best(results: dict) -> list[str]:
    ok = [n for n, r in results.items() if n != "float"
          and all(r["compare"]["delta"][m] <= t for m, t in TARGETS.items())]
    return sorted(ok, key=lambda n: (results[n].get("float_linears", 0), results[n]["compare"]["delta"]["pdmix"]))


if __name__ == "__main__":
    raise SystemExit(main())

"""`pdmix bench` settings: the list-valued flags' parsers, the flags' checks and their defaults by
device, the command line rebuilt from the flags, and the model's dimensions."""

import argparse
import shlex

import torch

from pdmix.errors import PdmixError
from pdmix.params import whole
from pdmix.paths import check_writable_dir
from pdmix.synth import SHAPES

DEFAULT_M = [1, 16, 64, 256, 1024, 2048, 4096, 8192]
# Flags left unset take these, by device type. CPU keeps M and the iterations small: one large-M
# GEMM of a real shape takes seconds there.
DEFAULTS = {
    "cuda": dict(iters=50, warmup=10, max_m=8192, prompt_lens=[128, 2048], batch_sizes=[1, 32]),
    "cpu": dict(iters=5, warmup=1, max_m=1024, prompt_lens=[128, 2048], batch_sizes=[1, 32]),
}
BIG_HIDDEN = 4096          # qwen3-8b and larger: CPU prefill defaults to short prompts only


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

"""`pdmix quant`: msModelSlim's command line, so the seed's command runs with `pdmix` in its place."""

import signal

from pdmix.errors import PdmixError
from pdmix.quant.config import make_config


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise PdmixError(f"--trust_remote_code {v}: expected True or False")


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True, help="float Hugging Face model folder")
    p.add_argument("--save_path", required=True, help="output W8A8_MIX folder")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--model_type", default=None, help="recipe, e.g. Qwen3-14B (unknown: the default recipe)")
    p.add_argument("--quant_type", default="w8a8", help="w8a8 (W8A8 with PD-mix activations)")
    p.add_argument("--trust_remote_code", default="False", help="True|False (accepted for msModelSlim compatibility)")
    p.add_argument("--calib_file", default=None, help="jsonl, one prompt a line (inputs_pretokenized or text)")
    p.add_argument("--calib_max_samples", type=int, default=None)
    p.add_argument("--calib_max_len", type=int, default=None)
    p.add_argument("--anti_method", default=None, help="outlier suppression: none | smooth | m4")
    p.add_argument("--alpha", type=float, default=None, help="smoothing strength (default 0.5)")
    p.add_argument("--observer", default=None, help="static range observer: minmax | percentile | mse")
    p.add_argument("--w_method", default=None, help="weight rounding: minmax (nearest, default) | gptq")
    p.add_argument("--disable_level", default=None, help="L0..Ln: keep the n most sensitive linears float")
    p.add_argument("--rollback_score", default=None,
                   help="how --disable_level ranks linears: ratio (max|x|/std, msModelSlim's; default) | error "
                        "(measured static W8A8 error of each layer's output; pdmix's)")
    p.add_argument("--static_tokens", default=None,
                   help="calibration tokens that set the static (decode) ranges: all (msModelSlim's; default) | "
                        "decode (all but each prompt's first, which only prefill computes)")
    p.add_argument("--rotation", default=None,
                   help="none (default) | quarot: rotate the float model by Hadamard matrices first (msModelSlim's "
                        "quarot processor, offline): outliers spread over every channel; a tied lm_head is untied")
    p.add_argument("--disable_names", nargs="*", default=None, help="linears to keep float, by full name")
    p.add_argument("--part_file_size", type=float, default=None, help="shard size in GB (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path")
    p.add_argument("--quiet", action="store_true", help="no progress or log output")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so the temporary output folder is removed on SIGTERM too


def run(args) -> int:
    from pdmix.quant.pipeline import quantize

    if args.quant_type.lower() != "w8a8":
        raise PdmixError(f"--quant_type {args.quant_type}: pdmix writes w8a8 (W8A8_MIX) only")
    _bool(args.trust_remote_code)
    overrides = {k: getattr(args, k) for k in ("device", "calib_file", "calib_max_samples", "calib_max_len",
                                                "anti_method", "alpha", "observer", "w_method", "disable_level",
                                                "rollback_score", "static_tokens", "rotation", "part_file_size")}
    if args.w_method is not None:  # msModelSlim spells it 'GPTQ' (QuantConfig) and 'gptq' (YAML)
        overrides["w_method"] = args.w_method.lower()
    overrides["disable_names"] = tuple(args.disable_names) if args.disable_names else None
    overrides["quiet"] = args.quiet
    config, known = make_config(args.model_type, overrides)
    if not known and not args.quiet:
        print(f"[pdmix quant] notice: no recipe for --model_type {args.model_type}; using the default recipe")
    signal.signal(signal.SIGTERM, _interrupt)
    quantize(args.model_path, args.save_path, config, overwrite=args.overwrite)
    return 0

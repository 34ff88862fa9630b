"""`pdmix bench`: speed of float vs W8A8 PD-mix on one device, in one process.

(a) Linear level: the four fused linear shapes of a decoder layer, bf16 F.linear against the
    W8A8_MIX linear on its dynamic (prefill) and static (decode) paths, activation quantization
    included. The W8A8 linear is a W8A8MixLinear built by the quantizer's arithmetic and run with
    the kernel backend the runtime picks for the device, so it times the code the runtime runs.
(b) End to end: prefill and decode throughput, TTFT, TPOT and peak memory of the runtime (LLM) on
    the float model and on its pdmix quantization (made here with a short calibration).

The model is a float Hugging Face folder (--model_path) or a named shape with random weights
(--shape); everything built goes to a temporary folder that is removed at the end.

The package, by what it measures: settings (flags, their defaults, the model's dimensions), machine
(device facts, timing, memory), linear (a), e2e (b), peaks (--peaks), report (the table), common
(the progress log and number rounding). This module holds the command's flags and its run.
"""

import json
import os
import sys

import torch

from pdmix import kernels
from pdmix.bench.common import log
from pdmix.bench.e2e import bench_e2e
from pdmix.bench.linear import W8A8_PATHS, backends_for, bench_linears
from pdmix.bench.machine import device_name, load_average, triton_version
from pdmix.bench.peaks import bound, machine_peaks
from pdmix.bench.report import format_table
from pdmix.bench.settings import (DEFAULT_M, check_args, command_line, int_list, model_dims, name_list,
                                  resolve_settings)
from pdmix.params import LM_HEADS
from pdmix.paths import check_output_file, write_results
from pdmix.synth import SHAPES


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_path", help="float Hugging Face folder (quantized here with a short calibration)")
    src.add_argument("--shape", choices=list(SHAPES), help="random Qwen3 (or, *-a3b and tiny-moe, Qwen3-MoE) weights of this shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of --shape (default: all of the shape)")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--m", type=int_list, default=None, help=f"linear rows M (default {','.join(map(str, DEFAULT_M))})")
    p.add_argument("--max_m", type=int, default=None, help="skip larger M (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per linear (default 50 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10 CUDA, 1 CPU)")
    p.add_argument("--prompt_lens", type=int_list, default=None,
                   help="prefill prompt lengths (default 128,2048; 128 on CPU for 8B-size shapes)")
    p.add_argument("--batch_sizes", type=int_list, default=None, help="decode batch sizes (default 1,32)")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens generated per sequence when decoding")
    p.add_argument("--decode_prompt_len", type=int, default=128, help="prompt length of the decode sequences")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per point; the median is kept")
    p.add_argument("--calib_max_samples", type=int, default=8, help="calibration prompts of the quantization")
    p.add_argument("--skip_linear", action="store_true", help="no linear-level microbenchmark")
    p.add_argument("--skip_e2e", action="store_true", help="no end-to-end benchmark")
    p.add_argument("--tmp_dir", default=None, help="where the temporary model folders go (default: the system's)")
    p.add_argument("--quant_path", default=None,
                   help="an existing W8A8_MIX folder of --model_path to run end to end (default: quantize here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--hf", action="store_true",
                   help="also time transformers' bf16 generate (prefill, and decode at batch 1) on the float model")
    p.add_argument("--peaks", action="store_true",
                   help="also measure the machine's GEMM and copy peaks and say what bounds each linear timing")
    p.add_argument("--kernels", type=name_list, default=None,
                   help="W8A8 kernel backends timed at linear level (default: all that run on the device)")
    p.add_argument("--kernel", default=None, help="force this kernel backend end to end (default: the device's first)")
    p.add_argument("--compile", action="store_true",
                   help="also run both pdmix engines with their decoder stack compiled (float_compiled, pdmix_compiled)")
    p.add_argument("--lm_head", default="float", choices=LM_HEADS,
                   help="int8: also run the pdmix engine with the int8 lm_head (pdmix_int8_head)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="JSON to stdout (the table goes to stderr)")
    p.add_argument("--output", default=None, help="write the JSON to this file")


def run(args) -> int:
    from pdmix.device import resolve_device

    check_args(args)
    if args.output:
        check_output_file(args.output)  # now, not after the whole run
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(args)
    device = resolve_device(args.device)
    dims = model_dims(args)
    s = resolve_settings(args, device, dims)
    dtype = getattr(torch, dims["dtype"])
    backends = backends_for(device, args.kernels)
    kernels.check_name(args.kernel)
    result = {
        "command": command, "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version(),
        "kernel_backends": backends, "e2e_kernel": args.kernel or kernels.choose(device).name,
        "shape": args.shape, "model_path": args.model_path, "layers": dims["layers"], "dtype": dims["dtype"],
        "dims": {k: v for k, v in dims.items() if k not in ("layers", "dtype")},
        "settings": s,
        "peak_mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_start": load_average(),
    }
    if not args.skip_linear:
        result["linear"], result["linear_skipped"] = bench_linears(dims, s, device, dtype, args.seed, backends)
        if args.peaks:
            log("measuring the machine's peaks (GEMM throughput, copy bandwidth)")
            result["peaks"] = peaks = machine_peaks(device, dtype)
            for row in result["linear"]:
                flop, k_n = 2 * row["m"] * row["n"] * row["k"], row["n"] * row["k"]
                row["bf16"]["bound"] = bound(row["bf16"], flop, dtype.itemsize * k_n, peaks, int8=False)
                for name in backends:
                    for path in W8A8_PATHS:
                        row[name][path]["bound"] = bound(row[name][path], flop, k_n, peaks, int8=True)
    if not args.skip_e2e:
        result["e2e"] = bench_e2e(args, dims, s, device)
    result["load_avg_end"] = load_average()
    text = json.dumps(result, indent=2)
    if args.output:
        write_results(args.output, text + "\n")
    table = format_table(result)
    if args.json:
        print(text)
        print(table, file=sys.stderr)
    else:
        print(table)
    return 0

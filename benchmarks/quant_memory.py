"""Peak RSS of `pdmix quant` on a random Qwen3-shaped model of several GB (issue 3, acceptance 3).

Builds the model once (cached in --workdir), quantizes it under `/usr/bin/time -v`, and prints
JSON: model size on disk, peak RSS, their ratio, wall time. Layer-by-layer streaming should keep
the peak far below the model's size.

    python benchmarks/quant_memory.py --shape qwen3-8b --layers 8 --workdir /tmp/pdmix-mem
"""

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/pdmix-mem")
    ap.add_argument("--calib_max_samples", type=int, default=16)
    ap.add_argument("--target", type=float, default=0.40, help="peak RSS / model size must stay below this")
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / f"{args.shape}-L{args.layers}"
    if not (src / "config.json").exists():
        from pdmix.synth import make_random_model, shape_arch
        print(f"building {src} ...", file=sys.stderr)
        shutil.rmtree(src, ignore_errors=True)
        make_random_model(src, shape_arch(args.shape), args.shape, layers=args.layers, tokenizer=True)
    out = work / "out"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pdmix", "quant", "--model_path", str(src), "--save_path",
           str(out), "--device", "cpu", "--overwrite", "--quiet", "--calib_max_samples", str(args.calib_max_samples)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    size = folder_size(src)
    result = {
        "benchmark": "quant_peak_rss", "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "model": f"random {args.shape} shape, {args.layers} layers", "calib_samples": args.calib_max_samples,
        "model_bytes": size, "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "peak_rss_bytes": peak_kb * 1024, "peak_rss_over_model": round(peak_kb * 1024 / size, 4),
        "peak_rss_over_output": round(peak_kb * 1024 / sum(f.stat().st_size for f in out.glob("*.safetensors")), 4),
        "target": args.target, "wall_s": round(wall, 1), "command": " ".join(cmd[2:]),
    }
    result["pass"] = result["peak_rss_over_model"] < args.target
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

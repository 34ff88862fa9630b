"""How fast the decode kernels read their weights, against what one thread can read at all.

Each kernel runs at M = 1 (the int8 decoder GEMM and linear also at each of --rows) over a model's
worth of distinct weights in turn (cold: they do not fit in cache), alternating with `torch.sum`
over the same number of bytes (the read bandwidth), medians of --rounds after a warm-up. Prints JSON: GB/s per kernel and its fraction of the read bandwidth.

Weights lie as the runtime holds them, 64-byte aligned on transparent huge pages (kernels/arena.py),
and so does the tensor `torch.sum` reads: on 4 KiB pages it reads about 15% slower (26.1 against 31.0
GB/s, one thread, Zen 4), a lower bar. "hot_gops" is each int8 GEMM again on one layer's weights (in
L2/L3), repeated: the arithmetic's own rate, which bounds the kernel where it is below the bytes'.

  python benchmarks/gemv_bandwidth.py --threads 1 --rows 1,8,16

The int8 decoder GEMM runs on the weights as the runtime holds them (s8gemm.Int8Weight: VNNI-packed
on CPUs with AVX-512 VNNI) and, where that differs, on the checkpoint's row-major layout too
("..._row_major"), alternating in the same run; "w8a8_linear_decoder..." is the whole W8A8_MIX
linear on bf16 rows (quantization, GEMM and epilogue in one C call, as the runtime calls it).

Weights: SmolLM2-135M's decoder (30 layers of q/k/v 960x576, o 576x576, gate/up 3072x576, down
576x1536; about 106 MB int8) and its 49152x576 lm_head (int8 Q8_0; bf16 in pdmix's C GEMM, which the
runtime uses, and in torch), or --layers of them.
"""

import argparse
import json
import platform
import time

import torch

from pdmix.kernels import arena, cpu_float, s8gemm

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--rows", default="1",
                   help="comma-separated rows of x for the int8 decoder GEMM and linear (decode batch sizes)")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    if s8gemm.library()[0] is None:
        raise SystemExit(f"pdmix: error: {s8gemm.library()[1]}")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-127, 128, s, dtype=torch.int8, generator=g) for s in SHAPES * args.layers]
    held = arena.Arena(4 * sum(w.numel() for w in weights) + (2 * 4 + 2 * 4 * 2) * 49152 * 576 + (64 << 20))
    with arena.using(held):
        weights = [arena.place(w) for w in weights]
        packed = [s8gemm.Int8Weight(w) for w in weights]
    one = torch.ones(())
    linears = [s8gemm.W8A8Linear(w, one / 50, one * 3, torch.rand(w.shape[0], generator=g) / 1e4,
                                 torch.randint(-999, 999, (w.shape[0],), dtype=torch.int32, generator=g),
                                 torch.rand(w.shape[0], generator=g) / 1e3, torch.randn(w.shape[0], generator=g),
                                 torch.bfloat16) for w in packed]
    xs = {(m, k): torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g) for k in {s[1] for s in SHAPES}
          for m in rows}
    rows16 = {(m, k): torch.randn(m, k, generator=g).bfloat16() for m, k in xs}
    heads = 4  # lm_heads in turn, so that they come from memory
    with arena.using(held):
        head8 = [arena.place(torch.randint(-127, 128, (49152, 576), dtype=torch.int8, generator=g)) for _ in range(heads)]
        head_scales = torch.rand(49152, 576 // 32, generator=g)
        head16 = [arena.place(torch.randn(49152, 576, generator=g).bfloat16()) for _ in range(heads)]
    h8, h8_scales = torch.randint(-127, 128, (1, 576), dtype=torch.int8, generator=g), torch.rand(1, 576 // 32)
    h16 = torch.randn(1, 576, generator=g).bfloat16()
    decoder_bytes = sum(w.numel() for w in weights)
    kernels = {}
    for m in rows:
        suffix = "" if m == 1 else f"_m{m}"
        kernels["int8_gemm_decoder" + suffix] = (lambda m=m: [s8gemm.gemm(xs[m, w.shape[1]], w) for w in packed],
                                                 decoder_bytes,
                                                 lambda m=m: [s8gemm.gemm(xs[m, w.shape[1]], w)
                                                              for _ in range(args.layers) for w in packed[:len(SHAPES)]])
        kernels["w8a8_linear_decoder" + suffix] = (lambda m=m: [lin(rows16[m, lin.k], 0) for lin in linears],
                                                   decoder_bytes)
        if packed[0].packed:
            kernels[f"int8_gemm_decoder{suffix}_row_major"] = (
                lambda m=m: [s8gemm.gemm(xs[m, w.shape[1]], w) for w in weights], decoder_bytes)
    kernels |= {
        "q8_0_lm_head": (lambda: [s8gemm.q8_0_gemm(h8, h8_scales, w, head_scales) for w in head8],
                         heads * (head8[0].numel() + head_scales.numel() * 4)),
        "bf16_lm_head_c": (lambda: [cpu_float.linear(h16, w) for w in head16], heads * head16[0].numel() * 2),
        "bf16_lm_head_torch": (lambda: [torch.nn.functional.linear(h16, w) for w in head16],
                               heads * head16[0].numel() * 2),
    }
    result = {"command": "python benchmarks/gemv_bandwidth.py --threads %d --layers %d --rounds %d --rows %s"
              % (args.threads, args.layers, args.rounds, args.rows), "time": time.strftime("%Y-%m-%d %H:%M"),
              "machine": platform.processor() or platform.machine(), "isa": s8gemm.isa(), "float_isa": cpu_float.isa(),
              "threads": args.threads, "kernels": {}}
    for name, (fn, nbytes, *hot) in kernels.items():
        with arena.opened(nbytes):
            plain = arena.empty((nbytes // 4,), torch.float32).uniform_()
        fn(), plain.sum()  # warm-up
        times = {"kernel": [], "sum": [], "hot": []}
        for _ in range(args.rounds):  # alternating
            times["kernel"].append(seconds(fn))
            times["sum"].append(seconds(plain.sum))
            if hot:
                times["hot"].append(seconds(hot[0]))
        k, r = (sorted(v)[len(v) // 2] for v in (times["kernel"], times["sum"]))
        entry = {"megabytes": round(nbytes / 1e6, 1), "ms": round(k * 1e3, 2), "gb_per_s": round(nbytes / k / 1e9, 2),
                 "read_gb_per_s": round(nbytes / r / 1e9, 2), "fraction_of_read": round(r / k, 3)}
        if hot:  # the same GEMMs on weights in cache: the arithmetic alone
            h, m = sorted(times["hot"])[len(times["hot"]) // 2], int(name.rpartition("_m")[2]) if "_m" in name else 1
            entry |= {"hot_ms": round(h * 1e3, 2), "hot_gops": round(2 * m * nbytes / h / 1e9, 1),
                      "fraction_of_bound": round(max(r, h) / k, 3)}
        result["kernels"][name] = entry
        del plain
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

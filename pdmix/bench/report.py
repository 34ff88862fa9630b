"""`pdmix bench`'s report: the text table of a result (its header line and load warning, the
linear-level table, the end-to-end table)."""


def linear_table(rows: list, skipped: list, backends: list[str]) -> list[str]:
    head = f"{'layer':<10}{'M':>6}{'N':>7}{'K':>7} |{'bf16 ms':>9}{'TFLOP/s':>9}"
    for b in backends:
        head += f" |{b[:8] + ' dyn':>13}{'x':>7}{'err':>7}{'sta ms':>9}{'x':>7}{'err':>7}"
    lines = ["linear level (W8A8 includes activation quantization; x = speed-up vs bf16; err = rel. error vs bf16)",
             head, "-" * len(head)]
    for r in rows:
        line = f"{r['layer']:<10}{r['m']:>6}{r['n']:>7}{r['k']:>7} | {r['bf16']['ms']:>8.4g} {r['bf16']['tflops']:>8.3g}"
        for b in backends:
            d, st = r[b]["dynamic"], r[b]["static"]
            line += (f" | {d['ms']:>12.4g} {d['speedup']:>5.2f}x {d['rel_err']:>6.1%}"
                     f" {st['ms']:>8.4g} {st['speedup']:>5.2f}x {st['rel_err']:>6.1%}")
        lines.append(line)
    lines += [f"skipped {x['layer']} M={x['m']}: {x['reason']}" for x in skipped]
    return lines


SPEEDUPS = ("pdmix", "pdmix_int8_head", "pdmix_compiled")  # the engines whose speed-up columns are printed


def e2e_table(e2e: dict, mem_kind: str) -> list[str]:
    names = [n for n in ("float", "pdmix", "pdmix_int8_head", "float_compiled", "pdmix_compiled", "transformers")
             if any(n in p for p in e2e["prefill"] + e2e["decode"])]
    lines = ["end to end (prompt rows W8A8 dynamic, decode rows static); tok/s and tokens per CPU-second; "
             "x = pdmix (then pdmix_int8_head) over float, then pdmix_compiled over float_compiled",
             f"{'':<16}" + "".join(f"{n[:12] + ' tok/s':>19}{'/cpu-s':>9}" for n in names)
             + f"{'x':>7}{'x cpu':>7}" * sum(n in names for n in SPEEDUPS)]
    for part, key in (("prefill", "prompt_len"), ("decode", "batch_size")):
        for point in e2e[part]:
            label = f"{part} {'L' if part == 'prefill' else 'B'}={point[key]}"
            cells = "".join(f"{point[n]['tokens_per_s']:>19.1f}{point[n]['tokens_per_cpu_s']:>9.1f}" if n in point
                            else f"{'-':>19}{'-':>9}" for n in names)
            ratios = "".join(f"{point[n]['speedup']:>6.2f}x{point[n]['cpu_speedup']:>6.2f}x"
                             for n in SPEEDUPS if n in point)
            lines.append(f"{label:<16}{cells}{ratios}")
    for name, eng in e2e["engines"].items():
        lines.append(f"{name} engine: load {eng['load_s']:.1f} s, warm-up {eng['warmup_s']:.1f} s, RSS {eng['load_rss_bytes'] / 2**30:+.2f} GiB for "
                     f"{eng['tensor_bytes'] / 2**30:.2f} GiB of tensors and a {eng['kv_cache_bytes'] / 2**30:.2f} GiB KV cache")
    lines.append(f"peak {mem_kind}: {e2e['peak_mem_bytes'] / 2**30:.2f} GiB")
    return lines


def format_table(result: dict) -> str:
    lines = [f"pdmix bench: {result['shape'] or result['model_path']}, {result['layers']} layers, {result['dtype']}, "
             f"{result['device_name']}, {result['torch_threads']} threads, torch {result['torch']}, "
             f"kernels {', '.join(result['kernel_backends'])} (end to end: {result['e2e_kernel']})"]
    load, cores = result["load_avg_start"], result["cpu_count"]
    if result["device"] == "cpu" and load is not None and load + result["torch_threads"] > cores + 0.5:
        lines.append(f"warning: load average {load} before the run, {result['torch_threads']} torch threads on "
                     f"{cores} cores: timings include waits for a CPU")
    if "linear" in result:
        lines += [""] + linear_table(result["linear"], result["linear_skipped"], result["kernel_backends"])
    if "e2e" in result:
        mem = "GPU mem" if result["device"] == "cuda" else "RSS"
        quant_s = result["e2e"]["quantize_s"]
        lines += ["", f"quantization: {quant_s:.1f} s" if quant_s else f"checkpoint: {result['e2e']['pdmix_path']}"]
        lines += e2e_table(result["e2e"], mem)
    return "\n".join(lines)

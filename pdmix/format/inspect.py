"""`pdmix inspect PATH`: validate a W8A8_MIX directory (ours or msModelSlim's) against the SPEC and
summarise it.

Validation stops at the first violation with a PdmixError whose message names the file and the
tensor. Tensors are read one at a time through SafetensorsFolder, so memory stays bounded by the
largest single tensor however big the checkpoint is.
"""

import json
import math
import re
from pathlib import Path

import torch

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_json_object
from pdmix.format.description import read_description
from pdmix.format.names import (DESCRIPTION_FILE, DYNAMIC_TYPE, FLOAT, INDEX_FILE, QUANT_TYPE, SCHEME_TENSORS,
                                WEIGHT_FILE)
from pdmix.format.reader import SafetensorsFolder
from pdmix.models.arch import INPUT_GROUPS, LINEAR_NAMES, ROUTER
from pdmix.schemes import w8a8_dynamic, w8a8_mix
from pdmix.schemes.w8a8_mix import decode_deq_scale

TENSOR_SPECS = {QUANT_TYPE: w8a8_mix.TENSOR_SPEC, DYNAMIC_TYPE: w8a8_dynamic.TENSOR_SPEC}

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEQ_RTOL = 1e-2  # other writers compute deq_scale in another precision; 1% accepts them, catches real errors
CHUNK = 1 << 24  # elements per slice when scanning a tensor, so a scan allocates little beyond the tensor
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# ---------------------------------------------------------------- the checks


def _check_config(folder: Path) -> torch.dtype | None:
    """config.json must exist and parse; returns the model dtype it declares, if any."""
    config = read_json_object(folder / "config.json")
    return CONFIG_DTYPES.get(config.get("dtype") or config.get("torch_dtype"))


def _check_description(folder: Path) -> tuple[dict, dict[str, str]]:
    header, types = read_description(folder)
    path = folder / DESCRIPTION_FILE
    if "version" not in header:
        raise PdmixError(f"{path}: no \"version\"")
    if header.get("model_quant_type") != QUANT_TYPE:
        raise PdmixError(f"{path}: model_quant_type is {header.get('model_quant_type')!r}, expected {QUANT_TYPE!r}")
    return header, types


def _open_weights(folder: Path) -> SafetensorsFolder:
    """The weight files; the reader checks the index against the shards, here stray files are refused too."""
    st = SafetensorsFolder(folder, quantized=True)
    used = set(st.files)
    for path in sorted(folder.glob(WEIGHT_FILE.removesuffix(".safetensors") + "*.safetensors")):
        if path not in used:
            where = f"not listed in {st.index_path}" if st.index_path else f"beside {WEIGHT_FILE} without {INDEX_FILE}"
            raise PdmixError(f"{path}: weight file {where}")
    return st


def _check_coverage(folder: Path, st: SafetensorsFolder, types: dict[str, str]) -> None:
    """The description names every tensor of the files and nothing else."""
    for name in st.names():
        if name not in types:
            raise PdmixError(f"{folder / DESCRIPTION_FILE}: tensor {name} (in {st.file_of(name).name}) not described")
    for name in types:
        if name not in st:
            raise PdmixError(f"{folder / DESCRIPTION_FILE}: tensor {name} is described but in no weight file")


def _fail(st: SafetensorsFolder, name: str, problem: str) -> PdmixError:
    return PdmixError(f"{st.file_of(name)}: tensor {name}: {problem}")


def _expect_meta(st: SafetensorsFolder, name: str, dtypes: tuple[str, ...], shape: list[int]) -> None:
    dtype, actual = st.meta(name)
    if dtype not in dtypes:
        raise _fail(st, name, f"dtype {dtype}, expected {' or '.join(dtypes)}")
    if actual != shape:
        raise _fail(st, name, f"shape {actual}, expected {shape}")


def _check_layout(folder: Path, st: SafetensorsFolder, types: dict[str, str], prefix: str, kind: str) -> None:
    """All tensors of a quantized linear of scheme `kind` (the seven of SPEC §3 for W8A8_MIX, three for
    W8A8_DYNAMIC), each labelled with it, with legal dtypes and shapes."""
    if prefix.endswith("." + ROUTER):
        raise PdmixError(f"{folder / DESCRIPTION_FILE}: router {prefix} is labelled {kind}; a MoE router stays {FLOAT}")
    for suffix in SCHEME_TENSORS[kind]:
        name = f"{prefix}.{suffix}"
        if name not in st:
            raise PdmixError(f"{folder}: quantized linear {prefix} lacks tensor {name}")
        if types[name] != kind:
            raise PdmixError(f"{folder / DESCRIPTION_FILE}: tensor {name} of quantized linear {prefix} "
                             f"is labelled {types[name]}, expected {kind}")
    dtype, shape = st.meta(f"{prefix}.weight")
    if dtype != "I8" or len(shape) != 2:
        raise _fail(st, f"{prefix}.weight", f"dtype {dtype} shape {shape}, expected I8 [n, k]")
    n = shape[0]
    for suffix, (dtypes, shape) in TENSOR_SPECS[kind].items():
        _expect_meta(st, f"{prefix}.{suffix}", dtypes, shape(n))
    bias = f"{prefix}.bias"
    if bias in st:
        if types[bias] != FLOAT:
            raise PdmixError(f"{folder / DESCRIPTION_FILE}: tensor {bias} is labelled {types[bias]}, expected {FLOAT}")
        _expect_meta(st, bias, FLOAT_DTYPES, [n])


def _any(t: torch.Tensor, predicate) -> bool:
    """predicate(slice).any() over the flattened tensor, a slice at a time."""
    flat = t.reshape(-1)
    return any(bool(predicate(flat[i:i + CHUNK]).any()) for i in range(0, flat.numel(), CHUNK))


# float dtype -> (same-size integer dtype, exponent mask): NaN and inf are exactly the values whose
# exponent bits are all ones. Testing the bits is several times faster than torch.isfinite on bf16.
EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                 torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def has_nonfinite(t: torch.Tensor) -> bool:
    """Any NaN or inf in a float tensor, a slice at a time."""
    int_dtype, mask = EXPONENT_BITS[t.dtype]
    return _any(t.reshape(-1).view(int_dtype), lambda x: (x & mask).max() == mask)


def check_finite(st: SafetensorsFolder, name: str) -> None:
    if st.meta(name)[0] in FLOAT_DTYPES and has_nonfinite(st.get(name)):
        raise _fail(st, name, "contains NaN or inf")


def check_all_finite(st: SafetensorsFolder) -> None:
    """No NaN or inf in any float tensor: read one at a time, each file unmapped once scanned."""
    for name in releasing(st, st.names()):
        check_finite(st, name)
    st.release()


def _check_weight_values(st: SafetensorsFolder, prefix: str) -> torch.Tensor:
    """Both schemes' weight: symmetric int8, zero offsets, positive scales. Returns weight_scale."""
    def get(suffix):
        return st.get(f"{prefix}.{suffix}")

    if _any(get("weight"), lambda x: x.min() == -128):
        raise _fail(st, f"{prefix}.weight", "contains -128, outside the symmetric range [-127, 127]")
    if _any(get("weight_offset"), lambda x: x != 0):
        raise _fail(st, f"{prefix}.weight_offset", "not all zero (weights are symmetric)")
    weight_scale = get("weight_scale")
    if _any(weight_scale, lambda x: ~(x > 0)):
        i = int((~(weight_scale.reshape(-1) > 0)).nonzero()[0])
        raise _fail(st, f"{prefix}.weight_scale", f"channel {i} is {float(weight_scale.reshape(-1)[i])}, not positive")
    return weight_scale


def _check_values(st: SafetensorsFolder, prefix: str, model_dtype: torch.dtype | None) -> None:
    """SPEC §3-§4 on the values: symmetric int8 weight, legal activation parameters, consistent deq_scale."""
    def get(suffix):
        return st.get(f"{prefix}.{suffix}")

    weight_scale = _check_weight_values(st, prefix)
    input_scale = get("input_scale")
    if not 0 < input_scale.item() < math.inf:
        raise _fail(st, f"{prefix}.input_scale", f"{input_scale.item()} is not a positive finite number")
    offset = get("input_offset").double().item()
    if not math.isfinite(offset) or offset != round(offset) or not -128 <= offset <= 127:
        raise _fail(st, f"{prefix}.input_offset", f"{offset} is not an integer in [-128, 127]")
    deq = decode_deq_scale(get("deq_scale"))
    if _any(deq, lambda x: ~((x > 0) & torch.isfinite(x))):
        i = int((~((deq > 0) & torch.isfinite(deq))).nonzero()[0])
        raise _fail(st, f"{prefix}.deq_scale", f"channel {i} is {float(deq[i])}, not a positive finite number")
    if _any(get("quant_bias"), lambda x: (x == INT32_MIN) | (x == INT32_MAX)):
        raise _fail(st, f"{prefix}.quant_bias", "reaches the int32 limit: the bias overflowed when it was quantized")
    _check_deq_scale(st, prefix, input_scale, weight_scale, deq, model_dtype)


def _check_deq_scale(st, prefix, input_scale, weight_scale, deq, model_dtype) -> None:
    # SPEC §4 computes the product in the model dtype; fp32 writers compute it in fp32. Accept either.
    dtypes = {model_dtype or weight_scale.dtype, torch.float32}
    ok = torch.zeros_like(deq, dtype=torch.bool)
    for dtype in dtypes:
        expected = (input_scale.to(dtype) * weight_scale.to(dtype)).reshape(-1).to(torch.float32)
        ok |= torch.isclose(deq, expected, rtol=DEQ_RTOL, atol=0)
    if not ok.all():
        i = int((~ok).nonzero()[0])
        expected = float(input_scale.float() * weight_scale.reshape(-1)[i].float())
        raise _fail(st, f"{prefix}.deq_scale", f"channel {i} is {float(deq[i]):.6g}, "
                                               f"but input_scale * weight_scale = {expected:.6g}")


def _check_input_groups(st: SafetensorsFolder, quantized: list[str]) -> None:
    """Linears reading the same input (q/k/v, gate/up) share input_scale and input_offset (SPEC §7)."""
    qset = set(quantized)
    for prefix in quantized:
        base, _, leaf = prefix.rpartition(".")
        for group in INPUT_GROUPS:
            members = [f"{base}.{m}" for m in group]
            if len(group) < 2 or leaf != group[0] or not all(m in qset for m in members):
                continue
            for suffix in ("input_scale", "input_offset"):
                ref = st.get(f"{members[0]}.{suffix}").double()
                for m in members[1:]:
                    if not torch.equal(st.get(f"{m}.{suffix}").double(), ref):
                        raise _fail(st, f"{m}.{suffix}", f"differs from {members[0]}.{suffix}; linears "
                                                         f"{'/'.join(group)} share one input and must share it")


# ---------------------------------------------------------------- the summary


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _by_type(prefixes: list[str]) -> dict[str, dict]:
    """Linears grouped by their last name component: {'q_proj': {'count': 28, 'layers': '0-27'}}."""
    groups: dict[str, dict] = {}
    for p in prefixes:
        g = groups.setdefault(p.rpartition(".")[2], {"count": 0, "layers": []})
        g["count"] += 1
        if m := LAYER_RE.search(p + "."):
            g["layers"].append(int(m.group(1)))
    order = LINEAR_NAMES
    leaves = sorted(groups, key=lambda leaf: (order.index(leaf) if leaf in order else len(order), leaf))
    return {leaf: {"count": groups[leaf]["count"], "layers": _layer_ranges(groups[leaf]["layers"])} for leaf in leaves}


def _float_linears(st: SafetensorsFolder, types: dict[str, str], quantized: set[str]) -> list[str]:
    """Decoder-layer linears kept in float (rolled back): FLOAT 2-D weights inside model layers (routers aside)."""
    out = []
    for name in st.names():
        prefix, _, suffix = name.rpartition(".")
        if (suffix == "weight" and types[name] == FLOAT and prefix not in quantized and not prefix.endswith("." + ROUTER)
                and LAYER_RE.search(name) and len(st.meta(name)[1]) == 2):
            out.append(prefix)
    return out


def _summary(folder, header, types, st, quantized, dynamic, model_dtype) -> dict:
    float_linears = _float_linears(st, types, set(quantized) | set(dynamic))
    shards = [{"file": f.name, "bytes": f.stat().st_size,
               "tensors": sum(1 for n in st.names() if st.file_of(n) == f)} for f in st.files]
    n_quant = sum(1 for t in types.values() if t in (QUANT_TYPE, DYNAMIC_TYPE))
    return {
        "path": str(folder),
        "model_quant_type": header["model_quant_type"],
        "version": header["version"],
        "model_dtype": str(model_dtype).removeprefix("torch.") if model_dtype else None,
        "tensors": len(types),
        "quantized_tensors": n_quant,
        "float_tensors": len(types) - n_quant,
        "quantized_linears": len(quantized),
        "quantized_by_type": _by_type(quantized),
        "dynamic_linears": len(dynamic),
        "dynamic_by_type": _by_type(dynamic),
        "float_linears": len(float_linears),
        "float_by_type": _by_type(float_linears),
        "float_linear_names": float_linears,
        "total_bytes": sum(s["bytes"] for s in shards),
        "index": st.index_path.name if st.index_path else None,
        "shards": shards,
    }


RELEASE_BYTES = 256 << 20  # a scan unmaps at least this often, within one file too
ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}  # else 1


def releasing(st: SafetensorsFolder, names: list[str], suffix: str = ""):
    """Yield names, closing the memory maps whenever the scan moves to another file or has read
    RELEASE_BYTES since the last close: the pages scanned would otherwise stay counted against this
    process (all of a one-shard checkpoint, by the end)."""
    current, read = None, 0
    for name in names:
        path = st.file_of(name + suffix)
        if path != current or read >= RELEASE_BYTES:
            st.release()
            current, read = path, 0
        dtype, shape = st.meta(name + suffix)
        read += math.prod(shape) * ITEM_BYTES.get(dtype, 1)
        yield name


def inspect_checkpoint(path) -> dict:
    """Validate a W8A8_MIX directory; return its summary, or raise PdmixError at the first violation."""
    folder = Path(path)
    if not folder.is_dir():
        raise PdmixError(f"{folder}: not a directory")
    model_dtype = _check_config(folder)
    header, types = _check_description(folder)
    st = _open_weights(folder)
    _check_coverage(folder, st, types)
    linears = {kind: list(dict.fromkeys(n.rpartition(".")[0] for n in st.names() if types[n] == kind))
               for kind in SCHEME_TENSORS}
    for name in st.names():
        kind = types[name]
        if kind in SCHEME_TENSORS and name.rpartition(".")[2] not in SCHEME_TENSORS[kind]:
            raise PdmixError(f"{folder / DESCRIPTION_FILE}: tensor {name} is labelled {kind} "
                             f"but is none of the {len(SCHEME_TENSORS[kind])} tensors of a {kind} linear")
    for kind, prefixes in linears.items():
        for prefix in prefixes:
            _check_layout(folder, st, types, prefix, kind)
    check_all_finite(st)
    quantized, dynamic = linears[QUANT_TYPE], linears[DYNAMIC_TYPE]
    for prefix in releasing(st, quantized, suffix=".weight"):
        _check_values(st, prefix, model_dtype)
    for prefix in releasing(st, dynamic, suffix=".weight"):
        _check_weight_values(st, prefix)
    _check_input_groups(st, quantized)
    return _summary(folder, header, types, st, quantized, dynamic, model_dtype)


# ---------------------------------------------------------------- the command


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_summary(s: dict) -> str:
    lines = [f"{s['path']}: valid {s['model_quant_type']} checkpoint (version {s['version']}, "
             f"model dtype {s['model_dtype'] or 'unknown'})",
             f"  tensors: {s['tensors']} ({s['quantized_tensors']} quantized, {s['float_tensors']} {FLOAT}), "
             f"{_size(s['total_bytes'])} in {len(s['shards'])} file(s)"
             + (f", index {s['index']}" if s["index"] else "")]
    lines += [f"    {sh['file']}  {_size(sh['bytes'])}  {sh['tensors']} tensors" for sh in s["shards"]]
    for title, count, groups in (("quantized linears", s["quantized_linears"], s["quantized_by_type"]),
                                 (f"{DYNAMIC_TYPE} linears", s["dynamic_linears"], s["dynamic_by_type"]),
                                 ("float linears (rolled back)", s["float_linears"], s["float_by_type"])):
        if title.startswith(DYNAMIC_TYPE) and not count:
            continue
        lines.append(f"  {title}: {count}")
        lines += [f"    {leaf:<10} {g['count']:>4}" + (f"  layers {g['layers']}" if g["layers"] else "")
                  for leaf, g in groups.items()]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("path", help="W8A8_MIX checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    summary = inspect_checkpoint(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0

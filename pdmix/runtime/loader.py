"""Build a CausalLM from a checkpoint folder: a W8A8_MIX directory (pdmix's or msModelSlim's,
single file or sharded) or a plain bf16/fp16 Hugging Face folder, sharded for tensor parallelism.

Each linear is built by its scheme, as the description labels it: W8A8_MIX -> W8A8MixLinear,
FLOAT (or a float checkpoint) -> FloatLinear. Every bias the files carry is applied (SPEC §6).
"""

import sys
from contextlib import nullcontext

import torch
from torch import nn

from pdmix.format.description import is_quant_checkpoint, read_description
from pdmix.format.inspect import FLOAT_DTYPES, ITEM_BYTES
from pdmix.format.names import DYNAMIC_TYPE, QUANT_SUFFIXES, QUANT_TYPE
from pdmix.format.reader import SafetensorsFolder
from pdmix.kernels import arena, cpu_norm
from pdmix.models.arch import BY_NAME, layer_linears
from pdmix.models.config import ModelConfig
from pdmix.models.layers import RMSNorm, layer_norms
from pdmix.models.linear import FloatLinear, W8A8DynamicLinear, W8A8MixLinear, prepare_kernels
from pdmix.models.model import CausalLM
from pdmix.models.moe import decoder_layer
from pdmix.runtime import decode_block, tp as tpm
from pdmix.runtime.tp import TP
from pdmix.schemes import w8a8_dynamic, w8a8_mix


def load_model(cfg: ModelConfig, device: torch.device, tp: TP = TP(), kernel: str | None = None,
               lm_head: str = "float") -> CausalLM:
    """A folder that passed check_loadable (inspect's checks, shapes against config.json), built layer
    by layer. kernel: force one W8A8 kernel backend by name (default: the device's priority list).
    lm_head: "float" or "int8" (pdmix/models/lm_head.py)."""
    tpm.check_divisible(cfg, tp.size)
    quantized = is_quant_checkpoint(cfg.folder)
    reader = SafetensorsFolder(cfg.folder, quantized)
    types = read_description(cfg.folder)[1] if quantized else {}
    get = tensor_getter(reader, cfg.dtype)
    # on CPU every weight goes into one aligned, huge-page block, layer after layer (kernels/arena.py)
    with arena.opened(arena_bytes(reader, cfg, lm_head)) if torch.device(device).type == "cpu" else nullcontext():
        layers = []
        for i in range(cfg.num_layers):
            norms = layer_norms(cfg, i, get, reader.__contains__)
            make = lambda prefix: build_linear(cfg, get, reader, types, prefix, tp)
            layer = decoder_layer(cfg, i, make, get, norms, tp.size).fuse().to(device)
            prepare_kernels(layer, kernel)  # layer by layer: prepacking copies a weight, so one layer's copy at a time
            arena.place_parameters(layer)
            layers.append(layer)
        embed = arena.place(get("model.embed_tokens.weight").to(device))
        tied = cfg.tie_word_embeddings and "lm_head.weight" not in reader
        head = embed if tied else arena.place(get("lm_head.weight").to(device))
        norm_bias = get("model.norm.bias") if "model.norm.bias" in reader else None
        norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps, norm_bias).to(device)
        arena.place_parameters(norm)
        reader.release()  # every tensor is a copy now: unmap the files, so their pages stop counting as ours
        model = CausalLM(cfg, embed, layers, norm, head).to(device)
        if lm_head == "int8":
            model.use_int8_head()
    for m in model.modules():  # the runtime's norms in one C call each (the quantization pipeline keeps torch's)
        if isinstance(m, RMSNorm):
            m.in_c = cpu_norm.available()
    decode_block.attach(model)
    if tp.is_main:
        prefixes = [p for i in range(cfg.num_layers) for p, _ in layer_linears(cfg, i)]
        n_quant = sum(types.get(p + ".weight") in (QUANT_TYPE, DYNAMIC_TYPE) for p in prefixes)
        kind = f"W8A8_MIX, {n_quant} of {len(prefixes)} linears quantized" if quantized else "float"
        print(f"pdmix: loaded {cfg.arch} ({kind}) from {cfg.folder}" + (f", tensor parallel {tp.size}" if tp.size > 1 else ""),
              file=sys.stderr)
    return model


def arena_bytes(reader: SafetensorsFolder, cfg: ModelConfig, lm_head: str) -> int:
    """An upper bound on what the loader places in the arena: every stored tensor (float ones at the
    wider of their stored and the model's dtype), and the int8 lm_head's codes and block scales."""
    tensors = []
    for name in reader.names():
        dtype, shape = reader.meta(name)
        size = ITEM_BYTES.get(dtype, 1)
        if dtype in FLOAT_DTYPES:
            size = max(size, cfg.dtype.itemsize)
        tensors.append((torch.uint8, [size, *shape]))
    if lm_head == "int8":
        tensors.append((torch.uint8, [cfg.vocab_size, cfg.hidden_size + 32, 2]))  # codes, padded, and scales
    return arena.bytes_for(tensors)


def tensor_getter(reader: SafetensorsFolder, dtype: torch.dtype):
    """reader.get, except that float weights take the model dtype (as transformers loads them);
    biases keep theirs (m4 norm biases are fp32)."""
    def get(name: str) -> torch.Tensor:
        t = reader.get(name)
        return t.to(dtype) if name.endswith(".weight") and t.is_floating_point() else t
    return get


def build_linear(cfg: ModelConfig, get, reader: SafetensorsFolder, types: dict[str, str], prefix: str,
                 tp: TP) -> nn.Module:
    name = prefix.rpartition(".")[2]
    weight = get(prefix + ".weight")
    column = BY_NAME[name].parallel == "column"
    if types.get(prefix + ".weight") == QUANT_TYPE:
        t = {s: get(f"{prefix}.{s}") for s in QUANT_SUFFIXES[1:]}
        return w8a8_linear(cfg, dict(t, weight=weight), prefix, column, tp)
    if types.get(prefix + ".weight") == DYNAMIC_TYPE:
        t = {s: get(f"{prefix}.{s}") for s in w8a8_dynamic.TENSORS[1:]}
        bias = get(prefix + ".bias") if prefix + ".bias" in reader else None
        return dynamic_linear(cfg, dict(t, weight=weight), bias, prefix, column, tp)
    bias = get(prefix + ".bias") if prefix + ".bias" in reader else None
    return float_linear(weight, bias, prefix, column, tp)


def float_linear(weight, bias, prefix: str, column: bool, tp: TP) -> FloatLinear:
    """Under tensor parallelism the whole layer on every rank (see FloatLinear): column-parallel keeps
    this rank's output columns, row-parallel gathers its sharded input, so that the output bits do
    not depend on the number of ranks."""
    lin = FloatLinear(weight, bias)
    if tp.size > 1 and column:
        step = weight.shape[0] // tp.size
        lin.columns = slice(tp.rank * step, (tp.rank + 1) * step)
    elif tp.size > 1:
        lin.gather = tpm.all_gather_last
    return lin


def w8a8_linear(cfg: ModelConfig, t: dict[str, torch.Tensor], prefix: str, column: bool, tp: TP) -> W8A8MixLinear:
    """A stored float `bias` is not used: quant_bias already carries it, and the dynamic path
    recovers bias_float from quant_bias (which also holds the smoothing shift of SPEC §6)."""
    if tp.size > 1 and column:
        t = w8a8_mix.shard_column(t, tp.rank, tp.size)
    elif tp.size > 1:
        # pdmix all-reduces the int32 accumulator and applies the full epilogue on every rank, so
        # the parameters (bias_float included) are those of the whole layer; only the weight is sharded.
        full = w8a8_mix.params_from_tensors(t, prefix)
        full.weight = tpm.shard(t["weight"], 1, tp)
        lin = W8A8MixLinear(full, cfg.dtype, prefix)
        lin.reduce, lin.reduce_max = tpm.all_reduce_sum, tpm.all_reduce_max
        return lin
    return W8A8MixLinear.from_tensors(t, cfg.dtype, prefix)


def dynamic_linear(cfg: ModelConfig, t: dict[str, torch.Tensor], bias, prefix: str, column: bool,
                   tp: TP) -> W8A8DynamicLinear:
    """A W8A8_DYNAMIC linear, sharded as w8a8_linear shards (row-parallel: the whole layer's epilogue
    after the all-reduce of the int32 accumulator and the per-token absmax)."""
    if tp.size > 1 and column:
        t = w8a8_dynamic.shard_column(t, tp.rank, tp.size)
        bias = None if bias is None else tpm.shard(bias, 0, tp)
    elif tp.size > 1:
        full = w8a8_dynamic.params_from_tensors(t, prefix, bias)
        full.weight = tpm.shard(t["weight"], 1, tp)
        lin = W8A8DynamicLinear(full, cfg.dtype, prefix)
        lin.reduce, lin.reduce_max = tpm.all_reduce_sum, tpm.all_reduce_max
        return lin
    return W8A8DynamicLinear.from_tensors(t, cfg.dtype, prefix, bias)

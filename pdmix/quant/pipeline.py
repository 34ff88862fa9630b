"""Float Hugging Face checkpoint -> W8A8_MIX checkpoint, one decoder layer at a time.

Weights stream from the source safetensors a layer at a time; the calibration hidden states are
carried from layer to layer. Each layer's forward is msModelSlim's calibration forward
(calib_forward): its static linears fake-quantized with the input ranges observed so far, so every
linear is calibrated on the outputs of the quantized linears upstream of it, as in msModelSlim.
Peak memory is one layer, the calibration activations and the write buffers, never the model.

With outlier suppression or score-based rollback, a float analysis pass runs first: it collects
per-channel statistics, smooths each layer, and scores every linear's sensitivity.
"""

import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from pdmix.atomic import atomic_dir, check_target
from pdmix.format.inspect import inspect_checkpoint
from pdmix.format.validate import check_all_finite, check_not_quantized, check_tensors
from pdmix.paths import check_no_overlap
from pdmix.device import resolve_device
from pdmix.errors import PdmixError
from pdmix.format.names import DYNAMIC_TYPE, FLOAT, QUANT_TYPE
from pdmix.format.reader import SafetensorsFolder
from pdmix.format.writer import CheckpointWriter
from pdmix.jsonfile import read_json_object
from pdmix.models.arch import (BY_NAME, GROUPS, INPUT_GROUPS, LINEAR_NAMES, is_dynamic_linear, layer_linears,
                               linear_prefix, static_groups)
from pdmix.models.config import ModelConfig, load_config
from pdmix.models.layers import DecoderLayer, Rotary, layer_norms, packed_causal_attention
from pdmix.models.linear import FloatLinear, RowSplit, W8A8DynamicLinear, W8A8MixLinear
from pdmix.models.moe import decoder_layer
from pdmix.quant import calib, gptq, rollback, rotate
from pdmix.quant.anti_outlier import METHODS, ChannelStats, anti_outlier
from pdmix.quant.arithmetic import quantize_linear, quantize_weight, weight_scale
from pdmix.quant.calib_forward import STATIC_TOKENS, FakeQuantLinear, RunningInputQuant, fake_quant, fake_weight
from pdmix.quant.config import QuantConfig
from pdmix.quant.observer import OBSERVERS, MinMaxObserver, make_observer
from pdmix.schemes import w8a8_dynamic
from pdmix.tokenizer import load_tokenizer

GROUP_NAME = {g: name for name, g in GROUPS.items()}  # ("q_proj","k_proj","v_proj") -> "qkv"
# Files of the source folder that describe weights; everything else (config, tokenizer, ...) is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[pdmix quant] {msg}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="layer", disable=self.quiet, file=sys.stderr)


# ---------------------------------------------------------------- source checks and layer building

def layer_names(cfg: ModelConfig, i: int) -> list[str]:
    names = [f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    names += [linear_prefix(i, n) + ".weight" for n in LINEAR_NAMES]
    if cfg.qk_norm:
        names += [f"model.layers.{i}.self_attn.{n}.weight" for n in ("q_norm", "k_norm")]
    return names


def load_layer(st: SafetensorsFolder, i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    tensors = {n: st.get(n) for n in st.names() if n.startswith(prefix)}
    st.release()  # the tensors are copies; unmapping stops the file pages counting against this process
    return tensors


def build_layer(cfg: ModelConfig, i: int, t: dict[str, torch.Tensor], quantized: dict | None = None,
                device=None, modules: dict | None = None) -> DecoderLayer:
    """A decoder layer from float tensors; linears named in `quantized` become W8A8_MIX (or, a MoE
    model's MLP linears, W8A8_DYNAMIC); those in `modules` are the given modules."""
    def make(p):
        if modules and p in modules:
            return modules[p]
        if quantized and p in quantized:
            kind = W8A8DynamicLinear if is_dynamic_linear(cfg, p) else W8A8MixLinear
            return kind.from_tensors({k.rpartition(".")[2]: v for k, v in quantized[p].items()}, cfg.dtype, p,
                                     backend="reference")
        return FloatLinear(t[p + ".weight"], t.get(p + ".bias"))
    layer = decoder_layer(cfg, i, make, t.__getitem__, layer_norms(cfg, i, t.__getitem__, t.__contains__))
    for m in layer.modules():  # float layers as msModelSlim's forward computes them (torch's GEMM)
        if isinstance(m, FloatLinear):
            m.batch_invariant = False
    return layer.to(device) if device is not None else layer


def observe_inputs(layer: DecoderLayer, on_input, groups=INPUT_GROUPS):
    """Call on_input(group, x) with the input of each linear group of `groups` (those quantized W8A8_MIX:
    arch.static_groups) on every forward; returns hook handles."""
    handles = []
    for group in groups:
        first = group[0]
        lin = getattr(getattr(layer, BY_NAME[first].block), first)
        handles.append(lin.register_forward_pre_hook(lambda m, args, g=group: on_input(g, args[0])))
    return handles


ATTN_SCORE_BYTES = 1 << 28  # a prompt whose attention scores [H, T, T] would pass this takes a bounded path


def calibration_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one prompt (q [T,H,D], k/v [T,KV,D]) as transformers' default ('sdpa')
    forward computes it, which msModelSlim calibrates through: SDPA in the model dtype (the runtime's
    fp32 attention moves deeper layers' ranges by up to 2%). Memory linear in T: long prompts take a
    fused kernel (flash / memory-efficient, which never hold the [T, T] scores), else blocks of queries."""
    t, heads = q.shape[0], q.shape[1]
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
    if 4 * heads * t * t <= ATTN_SCORE_BYTES:
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    rep = heads // k.shape[1]
    k4, v4 = k4.repeat_interleave(rep, 1), v4.repeat_interleave(rep, 1)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)[0].transpose(0, 1)
    except RuntimeError:  # no fused kernel for this device or dtype
        return blocked_causal_attention(q4, k4, v4)[0].transpose(0, 1)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over [1, H, T, D] a block of queries at a time: scores stay under ATTN_SCORE_BYTES."""
    t = q.shape[2]
    block = max(1, ATTN_SCORE_BYTES // (4 * q.shape[1] * t))
    out = []
    for s in range(0, t, block):
        e = min(s + block, t)
        mask = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(diagonal=s)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=mask))
    return torch.cat(out, dim=2)


class Calibration:
    """The calibration hidden states of every prompt, carried through the layers.

    Prompts are packed row after row into chunks of up to `chunk_tokens` rows, so each linear runs
    one GEMM a chunk; attention stays within each prompt. `lengths` gives the prompts of a chunk.
    """

    def __init__(self, cfg: ModelConfig, st: SafetensorsFolder, ids: list[torch.Tensor], device,
                 chunk_tokens: int = 4096):
        self.cfg, self.st, self.ids, self.device = cfg, st, ids, device
        self.rotary = Rotary(cfg, device)
        self.chunks: list[list[int]] = [[]]  # prompt indices per chunk
        for i, t in enumerate(ids):
            if self.chunks[-1] and sum(len(ids[j]) for j in self.chunks[-1]) + len(t) > chunk_tokens:
                self.chunks.append([])
            self.chunks[-1].append(i)
        self.lengths = [[len(ids[j]) for j in c] for c in self.chunks]
        self.rope = [self.rotary(torch.cat([torch.arange(n) for n in ls]).to(device)) for ls in self.lengths]
        self.reset()

    def reset(self) -> None:
        """Hidden states = embeddings, read row by row so the table itself never sits in memory."""
        table = self.st.get_rows("model.embed_tokens.weight", torch.cat(self.ids).unique().tolist())
        self.hidden = [torch.cat([table[int(t)] for j in c for t in self.ids[j]]).to(self.device) for c in self.chunks]
        self.st.release()

    def prompts(self, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
        """Split a chunk's rows into its prompts."""
        return x.split(self.lengths[chunk])

    @torch.no_grad()
    def run(self, layer: DecoderLayer, split: RowSplit | None = None, keep: bool = True, on_chunk=None) -> None:
        """Forward every chunk through `layer`; keep=True replaces the hidden states by its outputs.
        on_chunk(i) is called before chunk i (observers use it to split rows into prompts)."""
        out = []
        for i, h in enumerate(self.hidden):
            if on_chunk:
                on_chunk(i)
            out.append(self.forward(layer, i, h, split))
        if keep:
            self.hidden = out

    def forward(self, layer: DecoderLayer, chunk: int, h: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        """`layer` over the rows h of chunk `chunk`."""
        cos, sin = self.rope[chunk]
        return layer(h, cos, sin, packed_causal_attention(self.lengths[chunk], calibration_attention), split)


# ---------------------------------------------------------------- the passes

def analysis_pass(cfg, st, cal: Calibration, config: QuantConfig, spill: Path, log: Log):
    """Float pass: smooth each layer (spilled to disk) and score each linear group's sensitivity."""
    from safetensors.torch import save_file
    scores = {}
    with log.bar(cfg.num_layers, "analyse") as bar:
        for i in range(cfg.num_layers):
            t = load_layer(st, i)
            if config.anti_method != "none":
                stats = {}
                layer = build_layer(cfg, i, t, device=cal.device)
                hooks = observe_inputs(layer, lambda g, x: stats.setdefault(
                    GROUP_NAME[g], ChannelStats.empty(x.shape[-1])).update(x.cpu()), static_groups(cfg))
                cal.run(layer, keep=False)
                for h in hooks:
                    h.remove()
                t = anti_outlier(config.anti_method, cfg, i, t, stats, config.alpha)
                save_file({k: v.contiguous() for k, v in t.items()}, str(spill / f"layer{i:05d}.safetensors"))
            how = config.rollback_score if config.rollback_count() != 0 else "ratio"  # error: only when it is used
            scores.update({(i, g): s for g, s in sensitivity(cfg, i, t, cal, how).items()})
            st.release()
            bar.update()
    return scores


def sensitivity(cfg, i: int, t: dict, cal: Calibration, how: str) -> dict:
    """Each static group's rollback score (rollback.py) from the float forward of layer i, which carries
    the calibration hidden states on to the next layer."""
    chunk = [0]
    ratio = {g: rollback.InputStats() for g in static_groups(cfg)}
    ranges = {g: MinMaxObserver() for g in static_groups(cfg)}

    def see(g, x):
        ratio[g].update(x)
        if how == "error":
            for rows in cal.prompts(x, chunk[0]):
                ranges[g].update(rows)
    layer = build_layer(cfg, i, t, device=cal.device)
    hooks = observe_inputs(layer, see, static_groups(cfg))
    inputs = cal.hidden
    cal.run(layer, on_chunk=lambda c: chunk.__setitem__(0, c))
    for h in hooks:
        h.remove()
    if how == "ratio":
        return {g: s.score() for g, s in ratio.items()}
    return {g: static_output_error(cfg, i, t, cal, g, inputs, ranges[g]) for g in static_groups(cfg)}


def static_output_error(cfg, i: int, t: dict, cal: Calibration, group, inputs: list, ranges: MinMaxObserver,
                        max_chunks: int = 1) -> float:
    """rollback's `error` score of one group: layer i with that group's linears static W8A8 (fake-quantized,
    minmax weights and range), the rest float, against its float outputs (cal.hidden), over the first
    `max_chunks` calibration chunks (up to 4096 tokens each: a mean over that many tokens ranks the groups)."""
    params = ranges.params(cfg.dtype)
    modules = {}
    for n in group:
        p = linear_prefix(i, n)
        w, bias = t[p + ".weight"], t.get(p + ".bias")
        modules[p] = FakeQuantLinear(fake_weight(w, weight_scale(w)).to(cal.device),
                                     None if bias is None else bias.to(cal.device), lambda x: fake_quant(x, *params))
    layer = build_layer(cfg, i, t, device=cal.device, modules=modules)
    err = rollback.OutputError()
    with torch.no_grad():
        for c, (h, ref) in enumerate(zip(inputs[:max_chunks], cal.hidden)):
            err.update(cal.forward(layer, c, h), ref)
    return err.score()


def calibrate_layer(cfg, i: int, t: dict, cal: Calibration, config: QuantConfig, weights: dict, dynamic: dict,
                    keep: bool, hessians: gptq.Hessians | None = None) -> dict:
    """msModelSlim's calibration forward of layer i over every prompt (calib_forward): static linears
    with the fake-quantized weights `weights` {prefix: tensor} and running input ranges, the MLP
    linears of a MoE model W8A8_DYNAMIC (`dynamic`), the rest float. keep=True carries its outputs to
    the next layer. Returns each static group's observer (with `hessians`, GPTQ's first pass, which
    only gathers Hessians, the running min-max alone: the configured observer's work would be discarded)."""
    chunk = [0]
    observers = {g: MinMaxObserver() if hessians is not None else make_observer(config.observer)
                 for g in static_groups(cfg)}
    modules = {}
    for g in static_groups(cfg):
        quant = RunningInputQuant(observers[g], cfg.dtype, lambda x: cal.prompts(x, chunk[0]),
                                  None if hessians is None else lambda x, g=g: hessians.update(g, x),
                                  skip_first=STATIC_TOKENS[config.static_tokens])
        for n in g:
            p = linear_prefix(i, n)
            if p in weights:
                bias = t.get(p + ".bias")
                modules[p] = FakeQuantLinear(weights[p].to(cal.device), None if bias is None else bias.to(cal.device),
                                             quant)
    layer = build_layer(cfg, i, t, dynamic, device=cal.device, modules=modules)
    cal.run(layer, keep=keep, on_chunk=lambda c: chunk.__setitem__(0, c))
    return observers


def quantize_pass(cfg, st, cal: Calibration, config: QuantConfig, float_linears: set[str], spill: Path | None,
                  writer: CheckpointWriter, log: Log) -> None:
    from safetensors.torch import load_file
    own_biases = {n for n in st.names() if n.endswith(".bias")}  # the source's, not smoothing's
    with log.bar(cfg.num_layers, "quantize") as bar:
        for i in range(cfg.num_layers):
            t = load_file(str(spill / f"layer{i:05d}.safetensors")) if spill else load_layer(st, i)
            static = {linear_prefix(i, n): g for g in static_groups(cfg) for n in g
                      if linear_prefix(i, n) not in float_linears}
            dynamic = {}
            for p, _ in layer_linears(cfg, i):
                if is_dynamic_linear(cfg, p) and p not in float_linears:  # quantized now, float copy dropped
                    dynamic[p] = {f"{p}.{k}": v for k, v in w8a8_dynamic.quantize(t.pop(p + ".weight")).items()}
            weights = {p: quantize_weight(t[p + ".weight"]) for p in static}
            fake = {p: fake_weight(t[p + ".weight"], weights[p][1]) for p in static}
            if config.w_method == "gptq" and static:
                # GPTQ needs each group's Hessian before it rounds: gathered in a first forward with minmax weights
                hessians = gptq.Hessians(set(static.values()))
                calibrate_layer(cfg, i, t, cal, config, fake, dynamic, keep=False, hessians=hessians)
                weights = {p: hessians.round(g, t[p + ".weight"]) for p, g in static.items()}
                fake = {p: q.to(s.dtype) * s for p, (q, s) in weights.items()}
                del hessians
            observers = calibrate_layer(cfg, i, t, cal, config, fake, dynamic, keep=True)
            del fake
            out, types = {}, {}
            for p in (p for p, _ in layer_linears(cfg, i) if p in float_linears):
                out.update({k: t[k] for k in (p + ".weight", p + ".bias") if k in t})
            params = {g: observers[g].params(cfg.dtype) for g in set(static.values())}
            for p, group in static.items():
                b = t.get(p + ".bias")
                q = quantize_linear(t.pop(p + ".weight"), b, *params[group], weights.pop(p)).tensors(p)
                out.update(q)
                types.update(dict.fromkeys(q, QUANT_TYPE))
                if p + ".bias" in own_biases:  # a bias of the source layer's own stays beside quant_bias
                    out[p + ".bias"] = b
            for p, q in dynamic.items():
                out.update(q)
                types.update(dict.fromkeys(q, DYNAMIC_TYPE))
                if p + ".bias" in t:
                    out[p + ".bias"] = t[p + ".bias"]
            for name, v in t.items():
                if name.rpartition(".")[0].rpartition(".")[2] not in LINEAR_NAMES:
                    out[name] = v  # norms, their SPEC §6 biases
            types.update({k: FLOAT for k in out if k not in types})
            if writer is not None:
                writer.add(out, types)
            st.release()
            bar.update()


def calib_nll(cfg, st, cal: Calibration) -> float:
    """Mean next-token NLL of the calibration prompts from the current (last-layer) hidden states."""
    from pdmix.models.layers import RMSNorm
    norm = RMSNorm(st.get("model.norm.weight"), cfg.rms_norm_eps).to(cal.device)
    head = st.get("lm_head.weight" if "lm_head.weight" in st else "model.embed_tokens.weight").to(cal.device)
    total, count = 0.0, 0
    with torch.no_grad():
        for c, hidden in enumerate(cal.hidden):
            for h, j in zip(cal.prompts(hidden, c), cal.chunks[c]):
                ids = cal.ids[j]
                if len(ids) < 2:
                    continue
                logits = (norm(h[:-1]) @ head.T).float()
                total += torch.nn.functional.cross_entropy(logits, ids[1:].to(cal.device), reduction="sum").item()
                count += len(ids) - 1
    st.release()
    return total / max(count, 1)


def budget_rollback(cfg, st, cal: Calibration, config: QuantConfig, spill, scores, float_nll: float, log: Log) -> set[str]:
    """auto:<pct>: the fewest most-sensitive groups kept float that bring the static path within pct of
    the float model's perplexity on the calibration prompts (binary search over the ranking)."""
    import math
    pct = float(config.disable_level.split(":")[1])
    ranked = [rollback.group_prefixes(i, g) for (i, g), _ in sorted(scores.items(), key=lambda kv: -kv[1])]
    target = math.exp(float_nll) * (1 + pct / 100)
    tried = {}

    def ppl_with(k: int) -> float:
        if k not in tried:
            cal.reset()
            chosen = {p for group in ranked[:k] for p in group}
            quantize_pass(cfg, st, cal, config, chosen, spill, None, Log(True))
            tried[k] = math.exp(calib_nll(cfg, st, cal))
            log(f"auto rollback: {k} groups float -> static ppl {tried[k]:.4f} (target {target:.4f})")
        return tried[k]

    lo, hi = 0, len(ranked)
    while lo < hi:
        mid = (lo + hi) // 2
        if ppl_with(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    cal.reset()
    return {p for group in ranked[:lo] for p in group}


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation_config.json, tokenizer and chat-template files, unchanged."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in SKIP_FILES:
            shutil.copy2(f, dst / f.name)


def untie_config(path: Path) -> None:
    """The rotated lm_head is a tensor of its own (rotate.py): config.json says so."""
    import json
    config = read_json_object(path)
    config["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2) + "\n")


def choose_float_linears(cfg, config: QuantConfig, scores, log: Log) -> set[str]:
    by_name = rollback.expand_names(config.disable_names, cfg.num_layers, cfg)
    for p in sorted(by_name):
        log(f"rollback {p} (--disable_names)")
    top = rollback.most_sensitive(scores, config.rollback_count() or 0)
    for p, s in top:
        log(f"rollback {p} ({'max|x|/std' if config.rollback_score == 'ratio' else 'output error'} {s:.3g})")
    return by_name | {p for p, _ in top}


def quantize(model_path: str | Path, save_path: str | Path, config: QuantConfig, overwrite: bool = False) -> Path:
    """Quantize the float model at model_path into a W8A8_MIX checkpoint at save_path."""
    log = Log(config.quiet)
    t0 = time.time()
    model_path = Path(model_path)
    config.validate()
    for flag, choices in (("anti_method", METHODS), ("observer", OBSERVERS), ("rollback_score", rollback.ROLLBACK_SCORES),
                          ("w_method", gptq.W_METHODS), ("static_tokens", STATIC_TOKENS),
                          ("rotation", rotate.ROTATIONS)):
        value = getattr(config, flag)
        if value not in choices:
            raise PdmixError(f"--{flag} {value}: expected one of {', '.join(choices)}")
    check_no_overlap(model_path, save_path)
    check_target(Path(save_path), overwrite)
    device = resolve_device(config.device)
    if model_path.is_dir():
        check_not_quantized(model_path)
    cfg = load_config(model_path)
    config.check_model(cfg)
    n_rollback = config.rollback_count()
    auto = n_rollback is None
    st = SafetensorsFolder(model_path, quantized=False)
    rotated = config.rotation == "quarot"
    source = rotate.RotatedSource(st, cfg) if rotated else st  # the float model quantized; checks its sizes
    check_tensors(cfg, st, dtype_exact=True)  # names, shapes, dtypes against config.json (headers only)
    rollback.expand_names(config.disable_names, cfg.num_layers, cfg)
    prompts = calib.read_prompts(config.calib_file, config.calib_max_samples)
    tokenizer = load_tokenizer(model_path)
    ids = calib.tokenize(tokenizer, prompts, config.calib_max_len)
    if STATIC_TOKENS[config.static_tokens] and max(len(t) for t in ids) < 2:
        raise PdmixError(f"--static_tokens {config.static_tokens}: every calibration prompt is one token long, "
                         "so no token after a prompt's first is left to set the static ranges")
    check_all_finite(st)  # last: it reads every tensor
    log(f"{cfg.arch}, {cfg.num_layers} layers, {cfg.dtype}; {len(ids)} calibration prompts, "
        f"{sum(len(t) for t in ids)} tokens; anti_method {config.anti_method}, observer {config.observer}, "
        f"w_method {config.w_method}, static_tokens {config.static_tokens}, rotation {config.rotation}, "
        f"rollback {config.disable_level}; device {device}")

    with atomic_dir(save_path, overwrite) as out:
        cal = Calibration(cfg, source, ids, device)
        spill, scores = None, {}
        if config.anti_method != "none" or n_rollback or auto:
            spill = out / ".smoothed" if config.anti_method != "none" else None
            if spill:
                spill.mkdir()
            scores = analysis_pass(cfg, source, cal, config, spill or out, log)
            float_nll = calib_nll(cfg, source, cal) if auto else None
            cal.reset()
        float_linears = choose_float_linears(cfg, config, scores, log)
        if auto:
            chosen = budget_rollback(cfg, source, cal, config, spill, scores, float_nll, log)
            for p in sorted(chosen):
                log(f"rollback {p} (auto budget)")
            float_linears |= chosen
        writer = CheckpointWriter(out, config.part_file_size)
        quantize_pass(cfg, source, cal, config, float_linears, spill, writer, log)
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if rotated and name in source:  # computed by the rotation
                writer.add({name: source.get(name)}, {name: FLOAT})
            elif name in st:
                dtype, shape = st.meta(name)
                writer.add_from_file(name, dtype, shape, st.file_of(name), FLOAT)
        files = writer.finish()
        if spill:
            shutil.rmtree(spill)
        copy_side_files(model_path, out)
        if rotated and cfg.tie_word_embeddings:
            untie_config(out / "config.json")
        check_output(out, save_path)
    n_quant = sum(len(layer_linears(cfg, i)) for i in range(cfg.num_layers)) - len(float_linears)
    log(f"wrote {save_path}: {n_quant} linears quantized, {len(float_linears)} float, {len(files)} file(s) "
        f"in {time.time() - t0:.1f}s")
    return Path(save_path)


def check_output(out: Path, save_path) -> None:
    """inspect's checks on the finished folder before it is renamed into place: a checkpoint that
    `pdmix inspect` would reject is never published."""
    try:
        inspect_checkpoint(out)
    except PdmixError as e:
        raise PdmixError(f"the quantized model fails inspect's checks, so nothing was written to --save_path "
                         f"{save_path}: {str(e).replace(str(out), str(save_path))}") from None

"""Hand-built W8A8_MIX checkpoints, straight from the SPEC, independent of the pdmix quantizer.

`build_w8a8_checkpoint` quantizes every decoder-layer linear of a float folder with made-up but
plausible static ranges, in pdmix's layout or in msModelSlim's (fp32 scales, int64 deq_scale for
fp16 models, sharded file names even for one shard), optionally with the float tensors that m4
outlier suppression leaves (SPEC §6): norm biases, and linear biases folded into quant_bias.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdmix.format.names import FLOAT, INDEX_FILE, QUANT_TYPE
from pdmix.models.arch import INPUT_GROUPS, linear_prefix
from pdmix.format.reader import SafetensorsFolder
from pdmix.models.config import load_config

FP32_EPS = torch.finfo(torch.float32).eps


def spec_quantize(w: torch.Tensor, bias_fp32: torch.Tensor, mn: float, mx: float) -> dict[str, torch.Tensor]:
    """SPEC §4 written out: the seven tensors of one linear from its weight, bias and input range."""
    dtype = w.dtype
    ws = torch.clamp(w.abs().amax(dim=1, keepdim=True) / 127, min=FP32_EPS)
    q = torch.clamp(torch.round(w / ws), -127, 127).to(torch.int8)
    mn_t = torch.tensor(min(mn, 0.0), dtype=dtype)
    mx_t = torch.tensor(max(mx, 0.0), dtype=dtype)
    scale = torch.clamp((mx_t - mn_t) / 255, min=FP32_EPS)
    offset = -128 - torch.round(mn_t / scale)
    deq = (scale * ws).reshape(-1).to(torch.float32)
    qb = torch.round(bias_fp32 / deq - q.to(torch.int64).sum(1).to(torch.float32) * offset.to(torch.float32))
    return {"weight": q, "weight_scale": ws, "weight_offset": torch.zeros_like(ws), "input_scale": scale.reshape(1),
            "input_offset": offset.reshape(1), "deq_scale": deq, "quant_bias": qb.to(torch.int32)}


def to_msmodelslim(t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The fp32 / int64 storage variants of SPEC §3."""
    t = dict(t)
    for k in ("input_scale", "input_offset", "weight_scale"):
        t[k] = t[k].to(torch.float32)
    if dtype == torch.float16:
        t["deq_scale"] = t["deq_scale"].view(torch.int32).to(torch.int64)
    return t


def build_w8a8_checkpoint(src_model_dir, out_dir, variant: str = "pdmix", m4_biases: bool = False, seed: int = 0,
                          float_layers=(), quant_label: str = QUANT_TYPE) -> Path:
    """float_layers: full linear names (model.layers.0.mlp.down_proj) to keep float. quant_label: the
    description's label of quantized tensors (older writers put "W8A8")."""
    src, out = Path(src_model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(src)
    st = SafetensorsFolder(src, quantized=False)
    g = torch.Generator().manual_seed(seed)
    tensors, types = {}, {}

    def put(name, t, kind=FLOAT):
        tensors[name] = t.contiguous()
        types[name] = kind

    for i in range(cfg.num_layers):
        for group in INPUT_GROUPS:
            # q/k/v (and gate/up) read one input, so they share one range (SPEC §7)
            mn = -float(torch.empty(()).uniform_(0.5, 4.0, generator=g))
            mx = float(torch.empty(()).uniform_(0.5, 4.0, generator=g))
            for n in group:
                p = linear_prefix(i, n)
                w = st.get(p + ".weight")
                own_bias = st.get(p + ".bias") if p + ".bias" in st else None
                bias = own_bias
                if m4_biases:
                    extra = (torch.randn(w.shape[0], generator=g) * 0.05).to(w.dtype)
                    bias = extra if bias is None else (bias.float() + extra.float()).to(w.dtype)
                if p in float_layers:
                    put(p + ".weight", w)
                    if bias is not None:
                        put(p + ".bias", bias)
                    continue
                b32 = torch.zeros(w.shape[0]) if bias is None else bias.to(torch.float32)
                q = spec_quantize(w, b32, mn, mx)
                if variant == "msmodelslim":
                    q = to_msmodelslim(q, cfg.dtype)
                for k, v in q.items():
                    put(f"{p}.{k}", v, quant_label)
                if own_bias is not None:
                    put(p + ".bias", bias)
        for n in ("input_layernorm", "post_attention_layernorm") + (("self_attn.q_norm", "self_attn.k_norm") if cfg.qk_norm else ()):
            p = f"model.layers.{i}.{n}"
            w = st.get(p + ".weight")
            put(p + ".weight", w)
            if m4_biases:
                put(p + ".bias", torch.randn(w.shape[0], generator=g) * 0.05)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in st:
            put(name, st.get(name))
    if m4_biases:
        put("model.norm.bias", torch.randn(cfg.hidden_size, generator=g) * 0.05)

    if variant == "msmodelslim":
        fname = "quant_model_weight_w8a8_mix-00001-of-00001.safetensors"
        save_file(tensors, str(out / fname))
        with open(out / INDEX_FILE, "w") as f:
            json.dump({"metadata": {}, "weight_map": dict.fromkeys(tensors, fname)}, f)
    else:
        save_file(tensors, str(out / "quant_model_weight_w8a8_mix.safetensors"))
    with open(out / "quant_model_description.json", "w") as f:
        json.dump({"model_quant_type": QUANT_TYPE, "version": "1.0.0", **types}, f, indent=1)
    for fpath in src.iterdir():
        if fpath.is_file() and not fpath.name.endswith(".safetensors") and fpath.name != "model.safetensors.index.json":
            shutil.copy2(fpath, out / fpath.name)
    return out

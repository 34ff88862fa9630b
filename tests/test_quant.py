"""The quantizer against SPEC §4 written out independently here, and its handling of bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmix.cli import main
from pdmix.format.reader import SafetensorsFolder
from pdmix.quant.config import QuantConfig
from pdmix.quant.pipeline import quantize

EPS = torch.finfo(torch.float32).eps
LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def quant(src, out, calib, **kw):
    cfg = QuantConfig(calib_file=str(calib), quiet=True, **kw)
    return quantize(src, out, cfg)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16),
                                        ("qwen3", torch.bfloat16), ("qwen3", torch.float16)])
def test_tensors_follow_spec_formulas(tiny_models, small_calib, tmp_path, arch, dtype):
    src = tiny_models(arch, dtype)
    out = quant(src, tmp_path / "out", small_calib)
    f = SafetensorsFolder(src, quantized=False)
    q = SafetensorsFolder(out, quantized=True)
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_MIX" and desc["version"] == "1.0.0"
    assert set(desc) - {"model_quant_type", "version"} == set(q.names())
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        for name, block in LINEARS.items():
            p = f"model.layers.{i}.{block}.{name}"
            w = f.get(p + ".weight")
            assert w.dtype == dtype
            # SPEC §4, in the model dtype
            ws = torch.clamp(w.abs().amax(dim=1, keepdim=True) / 127, min=EPS)
            wq = torch.clamp(torch.round(w / ws), -127, 127).to(torch.int8)
            s_in, o_in = q.get(p + ".input_scale"), q.get(p + ".input_offset")
            assert s_in.dtype == dtype and s_in.shape == (1,) and o_in.shape == (1,)
            assert float(o_in) == round(float(o_in)) and -128 <= float(o_in) <= 127
            deq = (s_in * ws).reshape(-1).to(torch.float32)
            bias = f.get(p + ".bias").to(torch.float32) if p + ".bias" in f else torch.zeros(w.shape[0])
            qb = torch.round(bias / deq - wq.to(torch.int64).sum(1).to(torch.float32) * o_in.to(torch.float32))
            assert torch.equal(q.get(p + ".weight"), wq), p
            assert torch.equal(q.get(p + ".weight_scale"), ws), p
            assert torch.equal(q.get(p + ".weight_offset"), torch.zeros_like(ws)), p
            stored_deq = q.get(p + ".deq_scale")
            if dtype == torch.float16:  # int64 holding the fp32 bits (SPEC §3)
                assert stored_deq.dtype == torch.int64
                stored_deq = stored_deq.to(torch.int32).view(torch.float32)
            assert stored_deq.dtype == torch.float32 and torch.equal(stored_deq, deq), p
            assert torch.equal(q.get(p + ".quant_bias"), qb.to(torch.int32)), p
            for k in ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale", "quant_bias"):
                assert desc[f"{p}.{k}"] == "W8A8_MIX"
            # a float bias stays only where the source layer had one
            assert (p + ".bias" in q) == (p + ".bias" in f)
        # shared inputs share activation parameters (SPEC §7)
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            ps = [f"model.layers.{i}.{LINEARS[n]}.{n}" for n in group]
            assert all(torch.equal(q.get(ps[0] + ".input_scale"), q.get(x + ".input_scale")) for x in ps)
            assert all(torch.equal(q.get(ps[0] + ".input_offset"), q.get(x + ".input_offset")) for x in ps)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(q.get(name), f.get(name)) and desc[name] == "FLOAT"
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()


@pytest.mark.parametrize("static_tokens,first", [("all", 0), ("decode", 1)])
def test_first_layer_static_range_matches_float_model(tiny_models, copy_model, tmp_path, static_tokens, first):
    """Layer 0's q/k/v input does not depend on upstream quantization: its range must come out exactly
    from the min/max of transformers' own forward, one calibration prompt at a time (SPEC §4); with
    --static_tokens decode, from each prompt's tokens after its first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = copy_model(tiny_models("qwen3"))
    tok = AutoTokenizer.from_pretrained(src)
    calib = tmp_path / "calib.jsonl"  # each prompt opens with a token found nowhere else
    calib.write_text("".join(json.dumps({"inputs_pretokenized": c + t}) + "\n" for c, t in
                             zip("~|^", ("hello, how are you today?", "rivers carve canyons.", "what is 2 + 3?"))))
    ids = [tok(json.loads(line)["inputs_pretokenized"])["input_ids"] for line in calib.read_text().splitlines()]
    heads = {t[0] for t in ids}
    assert not heads & {i for t in ids for i in t[1:]}
    # each prompt's first token an outlier, as an attention sink is: its embedding all in one channel
    f = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["model.embed_tokens.weight"]
    w = load_file(f)
    emb = w["model.embed_tokens.weight"]
    norm = SafetensorsFolder(src, quantized=False).get("model.layers.0.input_layernorm.weight")
    for t in heads:
        emb[t] = 0
        emb[t, norm.float().abs().argmax()] = 1
    save_file(w, f, metadata={"format": "pt"})
    out = quant(src, tmp_path / "out", calib, static_tokens=static_tokens)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    mins, maxs, firsts = [], [], []

    def record(module, args):
        x = args[0][0]
        mins.append(x[first:].min())
        maxs.append(x[first:].max())
        firsts.append((x[0].min(), x[0].max()))
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record)
    with torch.no_grad():
        for t in ids:
            model(torch.tensor([t]))
    hook.remove()
    # the first token sets some prompt's extreme: the two settings must differ
    assert any(a < mn or b > mx for (a, b), mn, mx in zip(firsts, mins, maxs)) == bool(first)
    mn = min(torch.stack(mins).mean(), torch.tensor(0.0, dtype=torch.bfloat16))
    mx = max(torch.stack(maxs).mean(), torch.tensor(0.0, dtype=torch.bfloat16))
    scale = torch.clamp((mx - mn) / 255, min=EPS)
    offset = -128 - torch.round(mn / scale)
    q = SafetensorsFolder(out, quantized=True)
    assert torch.equal(q.get("model.layers.0.self_attn.q_proj.input_scale"), scale.reshape(1))
    assert torch.equal(q.get("model.layers.0.self_attn.q_proj.input_offset"), offset.reshape(1))


def test_sharding_and_rollback(tiny_models, small_calib, tmp_path):
    src = tiny_models("llama")
    names = ["model.layers.1.self_attn.k_proj"]
    out = quant(src, tmp_path / "out", small_calib, part_file_size=0.0001, disable_names=tuple(names),
                disable_level="L3")
    index = json.loads((out / "quant_model_weight_w8a8_mix.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"quant_model_weight_w8a8_mix-00001-of-{len(shards):05d}.safetensors"
    for s in shards:
        assert (out / s).stat().st_size <= 0.0001 * 1024**3 + 200_000  # one tensor may overshoot a tiny limit
    desc = json.loads((out / "quant_model_description.json").read_text())
    floats = {k.rpartition(".")[0] for k, v in desc.items() if v == "FLOAT" and "_proj.weight" in k}
    # --disable_names rolls back the whole q/k/v group; L3 adds at least 3 more by sensitivity
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"} <= floats
    assert len(floats) >= 4
    for p in floats:
        assert desc[p + ".weight"] == "FLOAT" and p + ".weight_scale" not in desc


# ---------------------------------------------------------------- bad input

def run_cli(args, capsys):
    rc = main(["quant", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def assert_fails(args, capsys, save: Path, needle: str):
    rc, err = run_cli([*args, "--save_path", save, "--quiet"], capsys)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("pdmix: error:") and needle in err[0], err
    assert not save.exists() or not any(save.iterdir())
    assert not list(save.parent.glob(f".{save.name}.tmp-*"))


def test_missing_safetensors(tiny_models, copy_model, small_calib, tmp_path, capsys):
    m = copy_model(tiny_models("llama"))
    for f in m.glob("*.safetensors"):
        f.unlink()
    (m / "model.safetensors.index.json").unlink()
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o", "no model.safetensors")


def test_corrupt_safetensors(tiny_models, copy_model, small_calib, tmp_path, capsys):
    m = copy_model(tiny_models("llama"))
    shard = sorted(m.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o", shard.name)


def test_missing_config(tiny_models, copy_model, small_calib, tmp_path, capsys):
    m = copy_model(tiny_models("llama"))
    (m / "config.json").unlink()
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o", "config.json")


def test_unsupported_architecture(tiny_models, copy_model, small_calib, tmp_path, capsys):
    m = copy_model(tiny_models("llama"))
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o", "LlamaForCausalLM")


def test_wrong_dtype(tiny_models, copy_model, small_calib, tmp_path, capsys):
    m = copy_model(tiny_models("llama"))
    shard = sorted(m.glob("model-*.safetensors"))[0]
    t = load_file(str(shard))
    t = {k: v.float() for k, v in t.items()}
    save_file(t, str(shard))
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o", "is F32 (float32), expected BF16")
    cfg = json.loads((m / "config.json").read_text())
    cfg["dtype"] = "float32"
    (m / "config.json").write_text(json.dumps(cfg))
    assert_fails(["--model_path", m, "--calib_file", small_calib], capsys, tmp_path / "o2", "dtype float32")


def test_empty_calibration_file(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_fails(["--model_path", tiny_models("llama"), "--calib_file", empty], capsys, tmp_path / "o", "empty.jsonl")


def test_existing_save_path_needs_overwrite(tiny_models, small_calib, tmp_path, capsys):
    save = tmp_path / "o"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    rc, err = run_cli(["--model_path", tiny_models("llama"), "--calib_file", small_calib, "--save_path", save,
                       "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert (save / "keep.txt").read_text() == "mine"
    rc, _ = run_cli(["--model_path", tiny_models("llama"), "--calib_file", small_calib, "--save_path", save,
                     "--quiet", "--overwrite"], capsys)
    assert rc == 0 and not (save / "keep.txt").exists() and (save / "quant_model_description.json").exists()


def test_device_npu(tiny_models, small_calib, tmp_path, capsys):
    assert_fails(["--model_path", tiny_models("llama"), "--calib_file", small_calib, "--device", "npu"], capsys,
                 tmp_path / "o", "--device npu")


def test_interrupted_run_leaves_nothing(tiny_models, tmp_path):
    src = tiny_models("llama", layers=48)
    save = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "pdmix", "quant", "--model_path", str(src), "--save_path",
                             str(save), "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode != 0
    assert not save.exists() and not list(tmp_path.glob(".o.*"))
    assert "Traceback" not in proc.stderr.read()

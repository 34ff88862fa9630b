"""Bad input ends in one `pdmix: error: ...` line and exit status 2, before any generation."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from builders import build_w8a8_checkpoint
from pdmix import LLM
from pdmix.cli import main
from pdmix.errors import PdmixError

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weight_w8a8_mix.safetensors"


@pytest.fixture(scope="module")
def quant_ckpt(tiny_models, tmp_path_factory):
    return build_w8a8_checkpoint(tiny_models("qwen3"), tmp_path_factory.mktemp("err") / "ck")


@pytest.fixture
def broken(quant_ckpt, tmp_path):
    """A fresh copy of the checkpoint to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(quant_ckpt, dst)
    return dst


def fails(capsys, *args) -> str:
    rc = main(["run", "--device", "cpu", "--max_output_length", "2", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert err[-1].startswith("pdmix: error: ") and not any("Traceback" in l for l in err)
    return err[-1]


def edit_description(folder, change):
    desc = json.loads((folder / DESCRIPTION).read_text())
    change(desc)
    (folder / DESCRIPTION).write_text(json.dumps(desc))


def rewrite_weights(folder, change):
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def test_missing_files(capsys, tmp_path, broken):
    assert "not a directory" in fails(capsys, "--model_path", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "config.json: missing" in fails(capsys, "--model_path", tmp_path / "empty")
    (broken / WEIGHTS).unlink()
    assert "no quant_model_weight_w8a8_mix.safetensors" in fails(capsys, "--model_path", broken)


def test_description_naming_a_tensor_the_files_lack(capsys, broken):
    edit_description(broken, lambda d: d.__setitem__("model.layers.0.mlp.up_proj.smooth_scale", "FLOAT"))
    assert "tensor model.layers.0.mlp.up_proj.smooth_scale is described but in no weight file" in fails(capsys, "--model_path", broken)


def test_tensor_in_the_files_not_in_the_description(capsys, broken):
    edit_description(broken, lambda d: d.pop("model.layers.1.self_attn.k_proj.deq_scale"))
    assert "tensor model.layers.1.self_attn.k_proj.deq_scale (in quant_model_weight_w8a8_mix.safetensors) not described" in fails(capsys, "--model_path", broken)


def test_quantized_linear_without_all_seven_tensors(capsys, broken):
    name = "model.layers.0.mlp.down_proj.quant_bias"
    edit_description(broken, lambda d: d.pop(name))
    rewrite_weights(broken, lambda t: t.pop(name))
    assert "quantized linear model.layers.0.mlp.down_proj lacks tensor model.layers.0.mlp.down_proj.quant_bias" in fails(capsys, "--model_path", broken)


def test_int8_weight_labelled_float(capsys, broken):
    edit_description(broken, lambda d: d.__setitem__("model.layers.0.mlp.up_proj.weight", "FLOAT"))
    assert "tensor model.layers.0.mlp.up_proj.weight of quantized linear model.layers.0.mlp.up_proj is labelled FLOAT" in fails(capsys, "--model_path", broken)


def test_fused_inputs_with_different_static_parameters(capsys, broken):
    """q/k/v (and gate/up) read one input and the runtime quantizes it once: it must refuse a
    checkpoint in which their input_scale/input_offset differ (SPEC §7)."""
    def double_k_scale(t):  # deq_scale follows, so the linear alone is consistent
        for s in ("input_scale", "deq_scale"):
            t[f"model.layers.1.self_attn.k_proj.{s}"] = t[f"model.layers.1.self_attn.k_proj.{s}"] * 2
    rewrite_weights(broken, double_k_scale)
    err = fails(capsys, "--model_path", broken)
    assert "model.layers.1.self_attn.k_proj.input_scale: differs from model.layers.1.self_attn.q_proj.input_scale" in err


def test_weight_shape_disagreeing_with_config(capsys, broken):
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    assert "has shape [160, 64], expected [96, 64] from" in fails(capsys, "--model_path", broken)


def test_unsupported_architecture(capsys, broken):
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    assert "architecture MistralForCausalLM is not supported" in fails(capsys, "--model_path", broken)


def test_tensor_parallel_size_not_dividing_heads(quant_ckpt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node 3 would; refused before joining a group
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PdmixError, match="tensor parallel size 3 does not divide its 4 attention heads"):
        LLM(quant_ckpt)


def test_bad_prompts(capsys, quant_ckpt, tmp_path):
    assert "longer than max_input_length 4" in fails(capsys, "--model_path", quant_ckpt, "--max_input_length", 4,
                                                     "--input_texts", "far too long a prompt")
    assert "expected comma-separated integers" in fails(capsys, "--model_path", quant_ckpt, "--input_ids", "1,x")
    assert "outside the vocabulary" in fails(capsys, "--model_path", quant_ckpt, "--input_ids", "1,99999")
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"text": "no messages"}\n')
    assert "chats.jsonl:1: expected a list of {role, content} messages" in fails(capsys, "--model_path", quant_ckpt,
                                                                                 "--input_file", bad)


def test_untied_model_without_lm_head(capsys, broken):
    edit_description(broken, lambda d: d.pop("lm_head.weight"))
    rewrite_weights(broken, lambda t: t.pop("lm_head.weight"))
    assert "tensor lm_head.weight missing" in fails(capsys, "--model_path", broken)

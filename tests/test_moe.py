"""Qwen3-MoE (issue 19, docs/moe.md): msModelSlim's own checkpoint of a tiny Qwen3-MoE
(tests/fixtures/qwen3_moe_tiny, made by tests/fixtures/make_oracle.py) against pdmix's
quantizer, runtime, tensor parallelism and bad-input checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmix import LLM, SamplingParams
from pdmix.cli import main
from pdmix.format.inspect import inspect_checkpoint
from pdmix.quant.config import QuantConfig, make_config
from pdmix.quant.pipeline import quantize
from spec_reference import Reference, assert_close
from test_runtime_cli import one_and_two_ranks
from test_runtime_float import PROMPTS, assert_hf_greedy, hf_model

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_moe_tiny"
FLOAT, ORACLE = FIXTURE / "float", FIXTURE / "msmodelslim"
WEIGHTS = "quant_model_weight_w8a8_mix.safetensors"
DESC = "quant_model_description.json"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def labels(folder: Path) -> dict[str, str]:
    return json.loads((folder / DESC).read_text())


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    """pdmix's checkpoint of the oracle's float model: the default recipe (no smoothing, no rollback, as
    the oracle was made), the oracle's calibration prompts."""
    config = QuantConfig(calib_file=str(FLOAT / "calib.jsonl"), quiet=True)
    return quantize(FLOAT, tmp_path_factory.mktemp("moe") / "w8a8", config)


def test_oracle_inspects_with_the_layout_of_docs_moe():
    s = inspect_checkpoint(ORACLE)
    assert s["model_quant_type"] == "W8A8_MIX"
    assert s["quantized_linears"] == 4 * 3  # attention, W8A8_MIX
    assert s["dynamic_linears"] == 3 * 8 * 2 + 3  # experts of layers 0 and 2, layer 1's dense MLP
    assert s["float_linears"] == 0  # the routers are not counted as rolled-back linears
    d, t = labels(ORACLE), tensors(ORACLE)
    e = "model.layers.2.mlp.experts.5.down_proj"
    assert {k: (d[k], t[k].dtype, list(t[k].shape)) for k in t if k.startswith(e + ".")} == {
        e + ".weight": ("W8A8_DYNAMIC", torch.int8, [64, 32]),
        e + ".weight_scale": ("W8A8_DYNAMIC", torch.bfloat16, [64, 1]),
        e + ".weight_offset": ("W8A8_DYNAMIC", torch.bfloat16, [64, 1])}
    assert d["model.layers.0.mlp.gate.weight"] == "FLOAT" and t["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16


def test_quantizer_matches_msmodelslim(ours):
    """Same names, labels and dtypes; every weight, weight_scale and weight_offset (attention and
    experts) bit for bit; static activation parameters exact on layer 0 and within 2% deeper down.
    The calibration forward is msModelSlim's (calib_forward; the dense fixture of test_oracle.py
    matches bit for bit) but for the W8A8_DYNAMIC MLP linears, which run pdmix's per-token
    arithmetic; msModelSlim fake-quantizes them during calibration with running per-tensor ranges.
    Measured on this fixture: input_scale at most 0.4% apart (layer 2's o_proj), deq_scale 0.7%;
    2.2% and 2.7% with a float forward of the current layer."""
    assert labels(ours) == labels(ORACLE)
    a, b = tensors(ours), tensors(ORACLE)
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        if k.rpartition(".")[2] in ("weight", "weight_scale", "weight_offset") or ".layers.0." in k:
            assert torch.equal(a[k], b[k]), k
        elif k.endswith(("input_scale", "deq_scale")):
            assert ((a[k].double() - b[k].double()).abs() <= 0.02 * b[k].double().abs()).all(), k


def test_m4_smooths_attention_and_skips_every_mlp_linear(ours, tmp_path):
    config = QuantConfig(anti_method="m4", calib_file=str(FLOAT / "calib.jsonl"), quiet=True)
    m4, plain = tensors(quantize(FLOAT, tmp_path / "m4", config)), tensors(ours)
    mlp = [k for k in plain if ".mlp." in k]
    assert len(mlp) == 3 * 8 * 2 * 3 + 9 + 2  # expert and dense MLP tensors, two routers
    assert all(torch.equal(m4[k], plain[k]) for k in mlp)
    assert all(torch.equal(m4[f"model.layers.{i}.post_attention_layernorm.weight"],
                           plain[f"model.layers.{i}.post_attention_layernorm.weight"]) for i in range(3))
    assert "model.layers.0.input_layernorm.bias" in m4 and not torch.equal(
        m4["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])


def test_recipe_and_rollback_count_attention_only(tmp_path):
    config, known = make_config("Qwen3-30B-A3B", {})
    assert known and config.anti_method == "m4" and config.disable_level == "L0"
    # L5 on 3 layers: groups by score until >= 5 linears: attention only (q/k/v = 3, o = 1)
    config = QuantConfig(disable_level="L5", calib_file=str(FLOAT / "calib.jsonl"), quiet=True,
                         disable_names=("model.layers.2.mlp.experts.3.up_proj",))
    s = inspect_checkpoint(quantize(FLOAT, tmp_path / "l5", config))
    names = set(s["float_linear_names"])
    experts = {f"model.layers.2.mlp.experts.3.{n}" for n in ("gate_proj", "up_proj")}
    assert experts <= names and all(".self_attn." in n for n in names - experts) and len(names - experts) >= 5
    assert s["dynamic_linears"] == 51 - 2
    # a float expert among quantized ones runs (and fuses nothing it should not)
    assert len(LLM(tmp_path / "l5").generate([PROMPTS[0]], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3


def test_float_greedy_tokens_equal_transformers():
    outs = LLM(FLOAT, block_size=4, max_batch_size=3).generate(PROMPTS, SamplingParams(max_tokens=12))
    model = hf_model(FLOAT)
    for prompt, out in zip(PROMPTS, outs):
        assert_hf_greedy(model, prompt, out.outputs[0].token_ids)


@pytest.mark.parametrize("mode", ["pdmix", "static"])
def test_quantized_logits_match_the_spec_reference(mode):
    """Attention W8A8_MIX (prefill rows dynamic, decode rows static; or all static), experts and the
    dense MLP W8A8_DYNAMIC on every row, router float: against tests/spec_reference.py's token-by-token
    forward. Reference kernel: this machine's oneDNN (AVX2, no VNNI) is not exact."""
    llm = LLM(ORACLE, block_size=4, kernel="reference", quant_mode=mode)
    prompt = PROMPTS[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True, return_logits=True))[0].outputs[0]
    ids = prompt + out.token_ids[:-1]
    ref = Reference(ORACLE).forward(ids, n_dynamic=len(prompt) if mode == "pdmix" else 0)[len(prompt) - 1:]
    assert_close(out.logits, ref)


def test_batched_rows_give_each_prompt_its_solo_tokens():
    llm = LLM(ORACLE, block_size=4, max_batch_size=3, kernel="reference")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert together == [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]


def test_run_and_eval_commands(tmp_path, capsys):
    assert main(["run", "--model_path", str(ORACLE), "--device", "cpu", "--max_output_length", "4",
                 "--input_texts", "Hello", "--block_size", "4"]) == 0
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    capsys.readouterr()
    assert main(["eval", "--model_path", str(ORACLE), "--data", str(data), "--ctx", "64", "--max_windows", "2",
                 "--compare", str(FLOAT), "--agreement_prompts", "2", "--agreement_tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result  # per-path perplexities were computed


def test_serve_answers_as_llm():
    from servers import serve
    llm = LLM(ORACLE, block_size=4)
    prompts = [[72, 101, 108, 108, 111], [40, 50, 60]]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
    with serve(ORACLE, "--device", "cpu", "--block_size", 4, "--max_batch_size", 2) as s:
        status, body = s.raw("POST", "/v1/completions", {"model": "msmodelslim", "prompt": prompts, "max_tokens": 6,
                                                         "temperature": 0, "ignore_eos": True, "logprobs": 1})
    assert status == 200, body
    got = sorted(body["choices"], key=lambda c: c["index"])
    assert [len(c["logprobs"]["tokens"]) for c in got] == [6, 6]
    assert [c["text"] for c in got] == [llm.tokenizer.decode(ids, skip_special_tokens=True) for ids in want]


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_tokens_of_one_process():
    args = ["-m", "pdmix.run_pa", "--model_path", str(ORACLE), "--device", "cpu", "--ignore_eos", "--max_output_length",
            "8", "--print_ids", "--block_size", "4", "--max_batch_size", "2", "--kernel", "reference",
            "--input_texts", "Hello world", "What's deep learning?"]
    one, two = one_and_two_ranks(args)
    ids = [line for line in one.stdout.splitlines() if "token ids" in line]
    assert len(ids) == 2 and ids == [line for line in two.stdout.splitlines() if "token ids" in line]


# ---------------------------------------------------------------- bad input


def damaged(tmp_path: Path, src: Path, change=None, desc=None, config=None) -> Path:
    out = tmp_path / src.name
    shutil.copytree(src, out)
    index = out / "model.safetensors.index.json"
    for f in sorted(out.glob("*.safetensors")):
        if change:
            t = change(load_file(str(f)))
            save_file({k: v.contiguous() for k, v in t.items()}, str(f))
            if index.exists():  # the index follows renamed and removed tensors
                data = json.loads(index.read_text())
                data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != f.name} | dict.fromkeys(t, f.name)
                index.write_text(json.dumps(data))
    if desc:
        d = labels(out)
        desc(d)
        (out / DESC).write_text(json.dumps(d))
    if config:
        c = json.loads((out / "config.json").read_text())
        c.update(config)
        (out / "config.json").write_text(json.dumps(c))
    return out


def renamed(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def dropped(name: str):
    return lambda t: {k: v for k, v in t.items() if k != name}


def sliced(name: str):
    return lambda t: {k: v[:16] if k == name else v for k, v in t.items()}


E7 = "model.layers.0.mlp.experts.7."


@pytest.mark.parametrize("case,needle", [
    ("extra_expert", "beyond num_experts 8"),
    ("missing_expert", "model.layers.0.mlp.experts.7.up_proj.weight missing"),
    ("expert_shape", "model.layers.0.mlp.experts.7.gate_proj.weight has shape [16, 64], expected [32, 64]"),
    ("quantized_router", "router model.layers.0.mlp.gate is labelled W8A8_DYNAMIC"),
    ("top_k", "num_experts_per_tok is 9, more than the model's 8 experts"),
    ("fewer_experts_in_config", "beyond num_experts 7"),
])
def test_bad_moe_input_is_one_line(tmp_path, capsys, case, needle):
    def float_source(**kw):
        return damaged(tmp_path, FLOAT, **kw)

    if case == "extra_expert":
        folder, cmd = float_source(change=renamed(E7, "model.layers.0.mlp.experts.8.")), "run"
    elif case == "missing_expert":
        folder, cmd = float_source(change=dropped(E7 + "up_proj.weight")), "run"
    elif case == "expert_shape":
        folder, cmd = float_source(change=sliced(E7 + "gate_proj.weight")), "quant"
    elif case == "quantized_router":
        def relabel(d):
            d["model.layers.0.mlp.gate.weight"] = "W8A8_DYNAMIC"
        folder, cmd = damaged(tmp_path, ORACLE, desc=relabel), "inspect"
    elif case == "top_k":
        folder, cmd = float_source(config={"num_experts_per_tok": 9}), "run"
    else:
        folder, cmd = damaged(tmp_path, ORACLE, config={"num_experts": 7}), "run"
    args = {"run": ["run", "--model_path", str(folder), "--device", "cpu", "--max_output_length", "2"],
            "inspect": ["inspect", str(folder)],
            "quant": ["quant", "--model_path", str(folder), "--save_path", str(tmp_path / "out"), "--quiet",
                      "--calib_file", str(FLOAT / "calib.jsonl")]}[cmd]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pdmix: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()

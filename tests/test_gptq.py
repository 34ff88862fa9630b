"""`--w_method gptq` (issue 20): GPTQ-rounded weights in the same W8A8_MIX tensors, judged against the
float model's own linear outputs (transformers' forward) and SPEC §5 arithmetic written out here."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdmix import LLM, SamplingParams
from pdmix.cli import main
from pdmix.format.inspect import inspect_checkpoint
from pdmix.format.reader import SafetensorsFolder
from pdmix.quant.config import RECIPES, QuantConfig
from pdmix.quant.gptq import gptq_round
from pdmix.quant.pipeline import quantize
from spec_reference import Reference, assert_close
from test_recipes import IDS, ppl

EPS = torch.finfo(torch.float32).eps


def float_linear_inputs(src, calib) -> dict[str, torch.Tensor]:
    """The input rows of every decoder linear in transformers' float forward over the calibration prompts."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for line in calib.read_text().splitlines():
            model(torch.tensor([tok(json.loads(line)["inputs_pretokenized"])["input_ids"]]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs).float() for n, xs in seen.items()}


def output_errors(src, out, inputs) -> dict[str, tuple[float, float]]:
    """Per linear: squared error of (dynamic, static) int8 arithmetic (SPEC §5) against the float
    layer's output x W^T on the same inputs."""
    f, q = SafetensorsFolder(src, quantized=False), SafetensorsFolder(out, quantized=True)
    errs = {}
    for p, x in inputs.items():
        ref = x @ f.get(p + ".weight").float().T
        w = q.get(p + ".weight").float() * q.get(p + ".weight_scale").float()
        s_t = x.abs().amax(-1, keepdim=True) / 127  # per-token symmetric
        x_dyn = torch.round(x / s_t).clamp(-127, 127) * s_t
        scale, offset = q.get(p + ".input_scale").float(), q.get(p + ".input_offset").float()
        x_sta = (torch.round(x / scale + offset).clamp(-128, 127) - offset) * scale
        errs[p] = tuple(float((xi @ w.T - ref).pow(2).sum()) for xi in (x_dyn, x_sta))
    return errs


def test_gptq_lowers_linear_output_error(tiny_models, small_calib, tmp_path):
    src = tiny_models("qwen3")
    inputs = float_linear_inputs(src, small_calib)
    errs = {}
    for method in ("minmax", "gptq"):
        out = quantize(src, tmp_path / method, QuantConfig(calib_file=str(small_calib), w_method=method, quiet=True))
        errs[method] = output_errors(src, out, inputs)
    total = {m: [sum(e[mode] for e in errs[m].values()) for mode in (0, 1)] for m in errs}
    # dynamic rows: the weight rounding is most of the error, and GPTQ cuts it
    assert total["gptq"][0] < 0.9 * total["minmax"][0], total
    # layer 0 sees exactly the float model's inputs: every one of its linears improves
    for p in (p for p in inputs if ".layers.0." in p):
        assert errs["gptq"][p][0] < errs["minmax"][p][0], (p, errs["gptq"][p], errs["minmax"][p])
    # static rows: the per-tensor input quantizer dominates; GPTQ must not add to it
    assert total["gptq"][1] <= total["minmax"][1], total


def test_gptq_with_diagonal_hessian_is_nearest_rounding():
    """Uncorrelated inputs leave no other column to move an error to: GPTQ = round to nearest."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=EPS)
    h = torch.diag(torch.rand(40, generator=g) + 0.5)
    assert torch.equal(gptq_round(w, h, scale, block=16), torch.round(w / scale).clamp(-127, 127).to(torch.int8))


def test_gptq_checkpoint_inspects_and_runs_as_reference(tiny_models, small_calib, tmp_path):
    """The `best` recipe (GPTQ, m4 smoothing, an auto rollback budget over the measured-error ranking),
    at a 5% budget: the output is an ordinary W8A8_MIX checkpoint that inspect accepts and the runtime
    computes as SPEC §5 does."""
    out = quantize(tiny_models("qwen2"), tmp_path / "out",
                   QuantConfig(**dict(RECIPES["best"], disable_level="auto:5"), calib_file=str(small_calib), quiet=True))
    assert inspect_checkpoint(out)["quantized_linears"] > 0
    llm, ref = LLM(out), Reference(out)
    for mode, n_dynamic in (("pdmix", 24), ("dynamic", len(IDS)), ("static", 0)):
        got, want = llm.score(IDS, n_dynamic, mode), ref.forward(IDS, n_dynamic)
        assert_close(got, want)
        assert abs(ppl(got, IDS) / ppl(want, IDS) - 1) < 2e-3, mode


@pytest.mark.parametrize("given", ["GPTQ", "gptq"])
def test_cli_w_method(tiny_models, small_calib, tmp_path, capsys, given):
    """msModelSlim spells it w_method='GPTQ' (QuantConfig) and method: gptq (YAML): both are accepted."""
    rc = main(["quant", "--model_path", str(tiny_models("llama")), "--save_path", str(tmp_path / "o"),
               "--calib_file", str(small_calib), "--w_method", given, "--quiet"])
    assert rc == 0 and inspect_checkpoint(tmp_path / "o")["quantized_linears"] > 0


def test_cli_unknown_w_method(tiny_models, small_calib, tmp_path, capsys):
    save = tmp_path / "o"
    rc = main(["quant", "--model_path", str(tiny_models("llama")), "--save_path", str(save),
               "--calib_file", str(small_calib), "--w_method", "hqq", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pdmix: error: --w_method hqq"), err
    assert not save.exists()


@pytest.fixture(scope="module")
def gptq_checkpoint(tiny_models, small_calib, tmp_path_factory):
    """m4 smoothing (norm biases), a rolled-back linear and GPTQ-rounded weights."""
    return quantize(tiny_models("qwen3"), tmp_path_factory.mktemp("gptq") / "tiny-gptq",
                    QuantConfig(anti_method="m4", disable_level="L1", w_method="gptq", calib_file=str(small_calib),
                                quiet=True))


def test_gptq_checkpoint_in_run_pa_gives_the_engines_tokens(gptq_checkpoint):
    from test_runtime_cli import generated_ids
    prompts = ["Hello world", "What's deep learning?"]
    r = subprocess.run([sys.executable, "-m", "pdmix.run_pa", "--model_path", str(gptq_checkpoint), "--device", "cpu",
                        "--ignore_eos", "--max_output_length", "8", "--print_ids", "--block_size", "4",
                        "--input_texts", *prompts], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = LLM(gptq_checkpoint, block_size=4).generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert generated_ids(r.stdout) == [w.outputs[0].token_ids for w in want]


def test_gptq_checkpoint_served_logprobs_are_the_engines(gptq_checkpoint):
    """The openai client's completion logprobs from `pdmix serve`, against pdmix.LLM's logits."""
    from servers import serve
    llm = LLM(gptq_checkpoint, block_size=4)
    ids = AutoTokenizer.from_pretrained(str(gptq_checkpoint))("Hi there")["input_ids"]
    logits = llm.generate([ids], SamplingParams(max_tokens=6, return_logits=True))[0].outputs[0].logits
    best = logits.double().log_softmax(-1).max(-1).values.tolist()
    with serve(gptq_checkpoint, "--block_size", 4, "--max_output_length", 16) as s:
        r = s.client().completions.create(model=gptq_checkpoint.name, prompt="Hi there", max_tokens=6, temperature=0,
                                          logprobs=1)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(best, abs=1e-4)

"""`--dtype float32` (LLM(dtype="float32"), run/serve/eval): activations in fp32, float weights widened
exactly, the W8A8 arithmetic otherwise SPEC §5's. References: SPEC §5 written out (spec_reference) and
transformers' forward, both computing in fp32."""

from pathlib import Path

import pytest
import torch

from pdmix.errors import PdmixError
from pdmix.evaluate import evaluate
from pdmix.runtime.llm import LLM
from pdmix.runtime.sampling import SamplingParams
from spec_reference import Reference
from test_oracle import FLOAT, ORACLE

MOE = Path(__file__).parent / "fixtures" / "qwen3_moe_tiny" / "msmodelslim"  # W8A8_MIX + W8A8_DYNAMIC experts

IDS = list(range(5, 60))
SPLITS = ((len(IDS), "dynamic"), (1, "pdmix"), (20, "pdmix"))  # all prefill, all decode but the first, mixed


@pytest.mark.parametrize("folder", [ORACLE, MOE], ids=["qwen3", "qwen3_moe"])
def test_quantized_model_in_float32_is_spec_arithmetic_in_float32(folder):
    ref = Reference(folder, dtype=torch.float32)
    fp32, bf16 = LLM(folder, max_input_length=128, dtype="float32"), LLM(folder, max_input_length=128)
    for n_dynamic, path in SPLITS:
        want = ref.forward(IDS, n_dynamic)
        got = fp32.score(IDS, n_dynamic, path)
        assert got.dtype == torch.float32
        # exact int8 codes and accumulators; only fp32 summation order differs
        assert (got - want).abs().max() < 1e-5 * want.abs().max()
        # the bf16 runtime is off by its own rounding, thousands of times more
        assert (bf16.score(IDS, n_dynamic, path) - want).abs().max() > 1e-3 * want.abs().max()


def test_float_model_in_float32_is_transformers_in_float32():
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(FLOAT, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    got = LLM(FLOAT, max_input_length=128, dtype="float32").score(IDS, 0, "pdmix")
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert (LLM(FLOAT, max_input_length=128).score(IDS, 0, "pdmix") - want).abs().max() > 1e-3 * want.abs().max()


def test_float32_outputs_do_not_depend_on_backend_or_batch():
    prompts = [IDS[:30], IDS[10:], [7, 8, 9]]
    params = SamplingParams(max_tokens=12, ignore_eos=True, return_logits=True)
    runs = {}
    for kernel in ("reference", None):
        llm = LLM(ORACLE, max_input_length=128, max_batch_size=4, kernel=kernel, dtype="float32")
        runs[kernel, "batch"] = [o.outputs[0] for o in llm.generate(prompts, params)]
        runs[kernel, "alone"] = [llm.generate([p], params)[0].outputs[0] for p in prompts]
    want = runs["reference", "alone"]
    for key, outs in runs.items():
        for o, w in zip(outs, want):
            assert o.token_ids == w.token_ids, key
            assert torch.equal(o.logits, w.logits), key
            assert o.logits.dtype == torch.float32


def test_eval_runs_both_models_in_float32(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 30)
    common = dict(ctx=48, max_windows=2, compare=FLOAT, agreement_prompts=0, quiet=True)
    fp32, auto = evaluate(ORACLE, data, dtype="float32", **common), evaluate(ORACLE, data, **common)
    assert (fp32["dtype"], auto["dtype"]) == ("float32", "bfloat16")
    # the float model's perplexity is transformers' fp32 one on the same windows
    from transformers import AutoModelForCausalLM
    from pdmix.evaluate import token_windows
    hf = AutoModelForCausalLM.from_pretrained(FLOAT, dtype=torch.float32)
    nll = n = 0
    for w in token_windows(LLM(FLOAT, max_input_length=128).tokenizer, data, 48, 2):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1].float(), -1)
        nll -= lp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
        n += len(w) - 1
    assert fp32["compare"]["float_ppl"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)
    assert fp32["compare"]["float_ppl"] != auto["compare"]["float_ppl"]


def test_run_flag(capsys):
    from pdmix.cli import main
    rc = main(["run", "--device", "cpu", "--model_path", str(ORACLE), "--input_ids", "5,6,7,8", "9,10",
               "--max_batch_size", "2", "--max_output_length", "6", "--ignore_eos", "--print_ids", "--dtype", "float32"])
    out = capsys.readouterr().out
    want = LLM(ORACLE, dtype="float32").generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert rc == 0
    for i, w in enumerate(want):
        assert f"Generate[{i}] token ids: {w.outputs[0].token_ids}" in out
    assert "float32 activations" in out.strip().splitlines()[-1]


def test_bad_dtype_is_an_error():  # the CLI's --dtype: tests/test_hostile.py
    with pytest.raises(PdmixError, match="dtype 'float16': choose from auto, float32"):
        LLM(ORACLE, dtype="float16")
    with pytest.raises(PdmixError, match="dtype 'fp64': choose from auto, float32"):
        evaluate(ORACLE, "unused.txt", dtype="fp64")

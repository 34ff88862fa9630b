"""The compiled decoder stack (`LLM(compile=True)`) against the eager engine: same tokens and the same
logits bit for bit, on W8A8_MIX (with norm biases, a float-kept layer and qk-norm) and float models,
over batches whose steps mix prompt and decode rows."""

import pytest
import torch

from builders import build_w8a8_checkpoint
from pdmix import LLM, SamplingParams
from pdmix.errors import PdmixError
from pdmix.kernels.onednn import available

pytestmark = pytest.mark.skipif(not available(), reason="needs PyTorch's oneDNN int8 linear")

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [27, 18, 28], [16, 18, 3, 39, 88, 7, 49, 50, 28, 84, 19, 71]]


def outputs(path, compile: bool):
    llm = LLM(path, max_batch_size=2, max_input_length=16, max_output_length=12, compile=compile)
    params = SamplingParams(max_tokens=10, ignore_eos=True, return_logits=True)
    # one sequence first, so the graph is built on a one-row step and must still serve larger ones; then
    # two sequences at a time: the third waits, so later steps mix its prompt rows with decode rows
    outs = llm.generate(PROMPTS[:1], params) + llm.generate(PROMPTS, params)
    return llm, [(o.outputs[0].token_ids, o.outputs[0].logits) for o in outs]


@pytest.mark.parametrize("arch,quantized", [("llama", True), ("qwen3", False)])
def test_compiled_stack_is_bit_identical_to_eager(tiny_models, tmp_path, arch, quantized):
    path = tiny_models(arch)
    if quantized:
        path = build_w8a8_checkpoint(path, tmp_path / "w8a8", m4_biases=True,
                                     float_layers=("model.layers.1.mlp.down_proj",))
    _, eager = outputs(path, compile=False)
    llm, compiled = outputs(path, compile=True)
    assert llm.model.decoder.compiled  # decode steps ran through the graph
    for (ids, logits), (ids_c, logits_c) in zip(eager, compiled):
        assert len(ids) == 10 and ids == ids_c
        assert torch.equal(logits, logits_c)


def test_compile_needs_a_kernel_with_a_graph_form(tiny_models, tmp_path):
    path = build_w8a8_checkpoint(tiny_models("llama"), tmp_path / "w8a8")
    with pytest.raises(PdmixError, match="--compile.*reference kernel"):
        LLM(path, kernel="reference", compile=True)


def test_smollm2_compiled_greedy_tokens_and_logits_identical(smollm2_w8a8):
    """The real model, where an Inductor-ordered RMSNorm sum once flipped roundings from layer 15 on."""
    prompt = "What's deep learning? Explain it to a student."
    outs = []
    for compile in (False, True):
        llm = LLM(smollm2_w8a8, max_batch_size=1, compile=compile)
        out = llm.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True, return_logits=True))[0].outputs[0]
        outs.append((out.token_ids, out.logits))
    assert len(outs[0][0]) == 64 and outs[0][0] == outs[1][0]
    assert torch.equal(outs[0][1], outs[1][1])


def test_compiled_norm_after_an_epilogue_keeps_eager_sums():
    """Residual + W8A8 epilogue + RMSNorm fused by Inductor: its own summation order for the mean of
    squares differs from eager torch's by an ulp now and then (a few rows in thousands here, enough to
    flip tokens later); pdmix keeps that sum an eager op inside the graph."""
    from pdmix.kernels import reference
    from pdmix.models.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    k, m = 576, 8192
    norm = RMSNorm((torch.rand(k, generator=g) + 0.5).bfloat16(), 1e-5, torch.randn(k, generator=g) * 0.1)
    acc = torch.randint(-20000, 20000, (m, k), generator=g).float()
    s, ws = torch.rand(m, 1, generator=g) * 0.01, torch.rand(k, generator=g) * 0.01
    x = (torch.randn(m, k, generator=g) * 4).bfloat16()

    def f(acc, s, x):
        return norm(x + reference.epilogue_dynamic(acc, s, ws, None, torch.bfloat16))
    compiled = torch.compile(f, dynamic=True, options={"emulate_precision_casts": True})
    assert torch.equal(compiled(acc, s, x), f(acc, s, x))

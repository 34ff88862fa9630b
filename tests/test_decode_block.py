"""A decode-only step in C calls (runtime/decode_block.py, kernels/cpu_block.py): the attention half,
and the MLP's linears where gate/up fuse, against the layer's Python form (DecoderLayer without it):
the same tokens and logits bit for bit, for batches of sequences of different lengths, on every
quantization path, with rolled-back float layers, m4 biases and Qwen3's q/k norms; where every layer
fits, the whole stack in one call gives the same bits again; layers it does not fit (fp16 models)
keep the Python form."""

import pytest
import torch

from builders import build_w8a8_checkpoint
from pdmix import LLM, SamplingParams
from pdmix.kernels import cpu_block
from pdmix.kernels.clib import library
from pdmix.runtime import decode_block

pytestmark = pytest.mark.skipif(library()[0] is None, reason="no C compiler for pdmix's kernels")

PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [119, 111, 114], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def run(llm: LLM, fused: bool, monkeypatch, stack: bool = True) -> tuple[list, int]:
    """Generate with the C forms (fused; the one-call stack too unless stack is False) or without; the
    outputs and how many layer calls (AttentionBlock calls, or layers run by Stack calls) ran."""
    calls = []
    real, real_stack = cpu_block.AttentionBlock.__call__, cpu_block.Stack.__call__
    monkeypatch.setattr(cpu_block.AttentionBlock, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(cpu_block.Stack, "__call__",
                        lambda self, *a: calls.extend([1] * len(self.blocks)) or real_stack(self, *a))
    blocks, whole = [layer.decode_block for layer in llm.model.layers], llm.model.decode_stack
    if not fused:
        for layer in llm.model.layers:
            layer.decode_block = None
    if not (fused and stack):
        llm.model.decode_stack = None
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True, return_logits=True))
    finally:
        for layer, block in zip(llm.model.layers, blocks):
            layer.decode_block = block
        llm.model.decode_stack = whole
    return [(o.outputs[0].token_ids, o.outputs[0].logits) for o in outs], len(calls)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["pdmix", "dynamic", "static"])
def test_decode_block_gives_the_layers_bits(tiny_models, tmp_path, arch, mode, monkeypatch):
    ck = build_w8a8_checkpoint(tiny_models(arch), tmp_path / "w8a8", m4_biases=True,
                               float_layers=("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                             "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                                             "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"))
    llm = LLM(ck, quant_mode=mode, block_size=4, max_batch_size=3)
    blocks = [layer.decode_block for layer in llm.model.layers]
    assert all(b is not None for b in blocks)
    # layer 0's gate/up are two linears (one float, one int8): its MLP stays Python; layer 1's runs in C,
    # with its float down projection
    assert blocks[0].block.down_struct is None and blocks[1].block.down_struct is not None
    assert llm.model.decode_stack is None  # not every layer's MLP is in C
    fused, calls = run(llm, True, monkeypatch)
    apart, no_calls = run(llm, False, monkeypatch)
    assert calls >= 7 * len(llm.model.layers) and no_calls == 0  # decode steps of the batch ran through it
    for (ids, logits), (ids2, logits2) in zip(fused, apart):
        assert ids == ids2 and torch.equal(logits, logits2)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["pdmix", "static"])
def test_the_whole_stack_in_one_call_gives_the_layers_bits(tiny_models, tmp_path, arch, mode, monkeypatch):
    """Every layer's MLP in C (a rolled-back float down_proj and q/k/v among them): the model's decode
    steps run as one call, silu(gate) * up by decode_block.silu_table (the tiny model's 160-wide MLP
    is not a multiple of torch's vector loop, so rows also reach its element-by-element loop), with
    the bits of the per-layer calls and of the Python form."""
    ck = build_w8a8_checkpoint(tiny_models(arch), tmp_path / "w8a8", m4_biases=True,
                               float_layers=("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                             "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"))
    llm = LLM(ck, quant_mode=mode, block_size=4, max_batch_size=3)
    if decode_block.silu_table() is None:
        assert llm.model.decode_stack is None
        pytest.skip("torch's bf16 silu differs between its vectorized and scalar loops here")
    assert llm.model.decode_stack is not None
    stacked, calls = run(llm, True, monkeypatch)
    layered, _ = run(llm, True, monkeypatch, stack=False)
    apart, no_calls = run(llm, False, monkeypatch)
    assert calls >= 7 * len(llm.model.layers) and no_calls == 0
    for (ids, logits), (ids2, logits2), (ids3, logits3) in zip(stacked, layered, apart):
        assert ids == ids2 == ids3 and torch.equal(logits, logits2) and torch.equal(logits, logits3)


def test_silu_table_is_torchs_silu_of_every_bf16():
    table = decode_block.silu_table()
    if table is None:
        pytest.skip("torch's bf16 silu differs between its vectorized and scalar loops here")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 1536, generator=g) * 4).bfloat16()
    x[0, :4] = torch.tensor([0.0, -0.0, 88.0, -100.0])
    looked_up = table[x.view(torch.int16).long() & 0xFFFF].view(torch.bfloat16)
    assert torch.equal(looked_up, torch.nn.functional.silu(x))


def test_layers_it_does_not_fit_keep_their_python_form(tiny_models):
    """An fp16 model: no C block (bf16 only); the engine runs the layers' Python form."""
    llm = LLM(tiny_models("llama", dtype=torch.float16), block_size=4)
    assert all(layer.decode_block is None for layer in llm.model.layers)
    assert len(llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3

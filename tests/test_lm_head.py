"""`--lm_head int8` (pdmix/models/lm_head.py): weight and activations in int8 blocks of 32 (llama.cpp's
Q8_0), against that arithmetic written out here; rows independent of their batch; one error line for a
bad choice. The default float lm_head is the exact path every other test covers."""

import pytest
import torch

from pdmix import LLM, SamplingParams
from pdmix.errors import PdmixError
from pdmix.models.lm_head import Int8Head, blocks_matmul, quantize_blocks
from pdmix.quant.config import QuantConfig
from pdmix.quant.pipeline import quantize


@pytest.fixture(scope="module")
def tiny_w8a8(tiny_models, small_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmh") / "w8a8"
    return quantize(tiny_models("qwen3"), out, QuantConfig(calib_file=str(small_calib), quiet=True))


def written_out_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 along the hidden dimension, weight and activation alike: codes round(v / s) with
    s = max|v| / 127 per block, integer block dot products, each scaled by both blocks' scales, summed
    in float64."""
    def blocks(v):
        b = v.double().reshape(v.shape[0], -1, 32)
        s = (b.abs().amax(-1, keepdim=True).float() / 127).double()  # the scale is an fp32 number
        return torch.round((b.float() / s.float())).clamp(-127, 127).long(), s
    x_q, x_s = blocks(hidden)
    w_q, w_s = blocks(weight)
    dots = torch.einsum("mbi,nbi->mnb", x_q, w_q)  # exact integers
    return (dots.double() * x_s[:, None, :, 0] * w_s[None, :, :, 0]).sum(-1)


def test_int8_logits_equal_the_arithmetic_written_out(tiny_w8a8):
    llm = LLM(tiny_w8a8, lm_head="int8")
    float_llm = LLM(tiny_w8a8)
    weight = float_llm.model.lm_head.detach()
    hidden = (torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0)) * 3).to(weight.dtype)
    hidden[:, 7] *= 40  # an outlier channel, as final hidden states have
    got = llm.model.logits(hidden)
    assert got.dtype == torch.float32 and got.shape == (5, weight.shape[0])
    want = written_out_logits(hidden, weight)
    # fp32 sums of the scaled blocks vs float64 here: within a few fp32 ulps of the row's magnitudes
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # and close to the float lm_head it stands in for
    ref = float_llm.model.logits(hidden)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("k", [64, 80])  # 80: padded to whole blocks
def test_torch_fallback_computes_the_c_kernel_sum(k):
    """Where the C library is missing (no compiler, or a GPU) the head sums in torch: the same value."""
    g = torch.Generator().manual_seed(k)
    weight = (torch.randn(300, k, generator=g) * 0.05).to(torch.bfloat16)
    hidden = torch.randn(3, k, generator=g).to(torch.bfloat16)
    head = Int8Head(weight)
    x_q, x_s = quantize_blocks(head.padded(hidden))
    got = blocks_matmul(x_q, x_s, head.weight, head.scales)
    assert torch.allclose(got, head(hidden), rtol=1e-5, atol=1e-6)
    want = written_out_logits(head.padded(hidden), head.padded(weight))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int8_head_tokens_do_not_depend_on_batch_or_backend(tiny_w8a8):
    prompts = [[5, 17, 99, 3], [8] * 30, [1, 2, 3, 4, 5, 6, 7]]
    params = SamplingParams(max_tokens=12, ignore_eos=True, return_logits=True)
    outs = {}
    for kernel in ("reference", None):
        llm = LLM(tiny_w8a8, lm_head="int8", max_batch_size=4, kernel=kernel)
        batch = llm.generate(prompts, params)
        alone = [llm.generate([p], params)[0] for p in prompts]
        for b, a in zip(batch, alone):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            assert torch.equal(b.outputs[0].logits, a.outputs[0].logits)
        outs[kernel] = batch
    for r, f in zip(outs["reference"], outs[None]):
        assert r.outputs[0].token_ids == f.outputs[0].token_ids and torch.equal(r.outputs[0].logits, f.outputs[0].logits)


def test_untied_float_head_is_let_go_and_a_tied_one_kept(tiny_models):
    llm = LLM(tiny_models("llama"), lm_head="int8")
    assert llm.model.lm_head is None and llm.model.head_int8 is not None
    tied = LLM(tiny_models("qwen3", tie=True), lm_head="int8")
    assert tied.model.lm_head is tied.model.embed_tokens  # still the embedding table


def test_bad_choice_names_the_option(tiny_w8a8):
    # (the CLI flags' one-line errors are in test_hostile.py)
    with pytest.raises(PdmixError, match="lm_head 'int4': choose from float, int8"):
        LLM(tiny_w8a8, lm_head="int4")

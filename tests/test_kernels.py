"""Kernel backends against the reference backend (the SPEC §5 oracle) on the same layer and rows."""

import pytest
import torch

from pdmix import kernels
from pdmix.errors import PdmixError
from pdmix.kernels.reference import ReferenceKernel
from pdmix.quant.arithmetic import quantize_linear, static_activation_params
from pdmix.schemes import w8a8_mix

CPU = torch.device("cpu")
FAST_CPU = [n for n in kernels.PRIORITY["cpu"] if n != "reference"]
ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def layer(n: int, k: int, seed: int, dtype=torch.bfloat16, bias: bool = True, device=CPU) -> w8a8_mix.W8A8Params:
    """A quantized layer with outlier channels, a bias and a static range from a sample of its input."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    x = activations(256, k, seed + 1, dtype)
    scale, offset = static_activation_params(x.amin(dim=1), x.amax(dim=1), dtype)
    return w8a8_mix.params_from_tensors(vars(quantize_linear(w, b, scale, offset))).to(device)


def activations(m: int, k: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) + 0.3
    x[:, :3] *= 8  # outlier channels, as real activations have
    return x.to(dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (both bf16)."""
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    # map the sign-magnitude bit patterns onto a monotonic integer line
    ia, ib = torch.where(ia < 0, -32768 - ia, ia), torch.where(ib < 0, -32768 - ib, ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("name", FAST_CPU)
@pytest.mark.parametrize("n,k,m,n_dynamic", [(96, 64, 1, 0), (192, 576, 8, 0), (192, 576, 300, 300),
                                             (320, 128, 37, 20), (128, 1536, 16, 0), (128, 1536, 512, 512)])
def test_cpu_backend_matches_reference(name, n, k, m, n_dynamic):
    p = layer(n, k, seed=n + k)
    x = activations(m, k, seed=m)
    ref = ReferenceKernel(p, torch.bfloat16).apply(x, n_dynamic)
    got = kernels.build(p, torch.bfloat16, name).apply(x, n_dynamic)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    ulps = ulps_apart(got, ref)
    # the int32 accumulation is exact; only the fp32 epilogue's rounding order differs
    assert (ulps <= 1).float().mean() >= 0.99, ulps.float().mean()
    assert ulps.max() <= 2


@pytest.mark.parametrize("name", FAST_CPU)
def test_cpu_backend_static_rows_equal_spec_formula(name):
    """Static rows against SPEC §5 written out: deq_scale * (x_q @ W^T + quant_bias), x_q computed here."""
    p = layer(64, 96, seed=5, bias=False)
    x = activations(4, 96, seed=9)
    x_q = torch.clamp(torch.round(x.float() / p.input_scale + p.input_offset), -128, 127)
    spec = (p.deq_scale * (x_q.double() @ p.weight.double().t() + p.quant_bias).float()).to(torch.bfloat16)
    got = kernels.build(p, torch.bfloat16, name).apply(x, 0)
    assert (ulps_apart(got, spec) <= 1).all()


def test_empty_rows():
    p = layer(32, 64, seed=1)
    for name in kernels.PRIORITY["cpu"]:
        assert kernels.build(p, torch.bfloat16, name).apply(torch.empty(0, 64, dtype=torch.bfloat16), 0).shape == (0, 32)


def test_priority_list_and_forcing():
    assert kernels.choose(CPU).name == kernels.PRIORITY["cpu"][0] == "onednn"
    # a row-parallel shard needs the exact int32 all-reduce: only the reference exposes its accumulator
    assert kernels.choose(CPU, row_parallel=True).name == "reference"
    assert kernels.choose(CPU, name="reference").name == "reference"
    with pytest.raises(PdmixError, match="--kernel bogus: unknown kernel backend"):
        kernels.choose(CPU, name="bogus")
    with pytest.raises(PdmixError, match="--kernel cuda: cannot run this layer on cpu"):
        kernels.choose(CPU, name="cuda")
    with pytest.raises(PdmixError, match="--kernel onednn: cannot run this layer on cpu: a row-parallel"):
        kernels.choose(CPU, row_parallel=True, name="onednn")


@ON_CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("m,n_dynamic", [(1, 0), (16, 0), (17, 17), (300, 100)])
def test_cuda_backend_accumulators_and_outputs(m, n_dynamic):
    cuda = torch.device("cuda")
    p = layer(256, 512, seed=3, device=cuda)
    x = activations(m, 512, seed=4).to(cuda)
    ref, got = ReferenceKernel(p, torch.bfloat16), kernels.build(p, torch.bfloat16, "cuda")
    assert torch.equal(got.accumulate(x, n_dynamic)[0], ref.accumulate(x, n_dynamic)[0])
    assert (ulps_apart(got.apply(x, n_dynamic), ref.apply(x, n_dynamic)) <= 1).float().mean() >= 0.99


@pytest.mark.real
def test_smollm2_greedy_tokens_identical_across_backends(smollm2_w8a8):
    from pdmix import LLM, SamplingParams

    prompt = "What's deep learning? Explain it to a student."
    outs = {}
    for name in kernels.PRIORITY["cpu"]:
        llm = LLM(smollm2_w8a8, max_batch_size=1, kernel=name)
        outs[name] = llm.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True))[0].outputs[0].token_ids
    assert len(outs["reference"]) == 64
    assert all(ids == outs["reference"] for ids in outs.values())

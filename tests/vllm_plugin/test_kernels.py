"""The plugin's int8 kernels (pdmix/vllm/kernels.py) against SPEC §5 written out in float64, on
int8 codes over their whole range: where a GEMM's int16 pair sums saturate (oneDNN on CPUs
without VNNI, as on this project's AVX2 CI machine) outputs are off by thousands of steps.
Inputs are exact multiples of a power-of-two scale, so quantization is exact and only the GEMM
and the epilogue are under test. The CUDA kernel runs where a GPU is (skipped elsewhere)."""

import pytest
import torch
import vllm._custom_ops  # noqa: F401  (loads vLLM's torch.ops._C)

from pdmix.schemes import w8a8_mix
from pdmix.vllm.kernels import CPUKernel, CUDAKernel

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or not hasattr(torch.ops._C, "cutlass_scaled_mm_azp"),
    reason="needs an NVIDIA GPU and vLLM's CUDA build"))]
N, K, M = 96, 1024, 9  # multiples of 16 (CUTLASS)
SCALE = 2.0 ** -6      # input_scale, and every dynamic row's s_t


def params(g: torch.Generator) -> w8a8_mix.W8A8Params:
    weight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    weight[:, :2] = 127  # a saturating pair in every row
    weight_scale = (torch.rand(N, 1, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    t = {"weight": weight, "weight_scale": weight_scale, "weight_offset": torch.zeros(N, 1),
         "input_scale": torch.tensor([SCALE]), "input_offset": torch.tensor([-7.0]),
         "deq_scale": (SCALE * weight_scale.float()).to(torch.bfloat16).float().reshape(-1),
         "quant_bias": torch.randint(-300000, 300000, (N,), generator=g, dtype=torch.int32)}
    return w8a8_mix.params_from_tensors(t, "layer")


def codes(g: torch.Generator, low: int) -> torch.Tensor:
    q = torch.randint(low, 128, (M, K), generator=g)
    q[:, :2] = 127  # with the weight's 127s: 2 * 255 * 127 > 32767 once shifted to uint8
    return q


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor):
    """The model-dtype rounding of an fp32 epilogue: one ulp of the result, plus fp32 steps of the
    terms it sums (|terms| up to `want`'s largest)."""
    got, want = got.double().cpu(), want.double()
    tol = want.abs() * torch.finfo(torch.bfloat16).eps + 1e-5 * want.abs().max()
    assert ((got - want).abs() <= tol).all(), (got - want).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_static_path_is_spec(device):
    g = torch.Generator().manual_seed(0)
    p = params(g)
    q = codes(g, -128)
    x = ((q + 7) * SCALE).to(torch.bfloat16)  # x / input_scale + input_offset = q exactly
    assert torch.equal(torch.round(x.double() / SCALE - 7), q.double())
    kernel = (CPUKernel if device == "cpu" else CUDAKernel)(p.to(device), torch.bfloat16)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=device)
    kernel.static(x.to(device), out)
    acc = q.double() @ p.weight.double().T
    assert_within_rounding(out, p.deq_scale.double() * (acc + p.quant_bias.double()))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_path_is_spec(device):
    g = torch.Generator().manual_seed(1)
    p = params(g)
    q = codes(g, -127)
    x = (q * SCALE).to(torch.bfloat16)  # every row's max |x| is 127 * SCALE, so s_t = SCALE
    kernel = (CPUKernel if device == "cpu" else CUDAKernel)(p.to(device), torch.bfloat16)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=device)
    kernel.dynamic(x.to(device), out)
    acc = q.double() @ p.weight.double().T
    want = acc * SCALE * p.weight_scale.double() + p.bias_float.double()
    if device == "cuda":  # CUTLASS takes the bias in the model dtype
        want = acc * SCALE * p.weight_scale.double() + p.bias_float.to(torch.bfloat16).double()
    assert_within_rounding(out, want)

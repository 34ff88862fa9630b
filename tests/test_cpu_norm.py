"""The runtime's RMSNorm in C (pdmix/kernels/cpu_norm.py) against its arithmetic written out here in
torch's fp32 ops, bit for bit: the sum of squares in 16 lanes then a fixed tree, every other step
rounded as torch's RMSNorm rounds it; the same bits for a row alone and in a batch, on any thread
count, and on the plain C path of CPUs without AVX-512."""

import os
import subprocess
import sys

import pytest
import torch

from pdmix.kernels import cpu_norm
from pdmix.models.layers import RMSNorm

pytestmark = pytest.mark.skipif(not cpu_norm.available(), reason="no C compiler for pdmix's kernels")


def written_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """csrc/norm.c's arithmetic, step by step, in fp32 (each op rounds once, as the C code does)."""
    x32 = x.float()
    m, k = x32.shape
    sq = torch.nn.functional.pad(x32 * x32, (0, -k % 16)).view(m, -1, 16)
    lanes = torch.zeros(m, 16)
    for c in range(sq.shape[1]):  # element p into lane p % 16, in order of p
        lanes = lanes + sq[:, c]
    for s in (8, 4, 2, 1):  # lane l + lane l + s
        lanes = lanes[:, :s] + lanes[:, s:2 * s]
    # divisions by full tensors (torch divides by a scalar as a multiplication by its reciprocal); the square
    # root correctly rounded, as C's sqrtf (fp64's of an fp32 value, rounded to fp32; torch's fp32 one is not)
    inv = torch.ones_like(lanes) / torch.sqrt((lanes / torch.full_like(lanes, k) + eps).double()).float()
    y = weight * (x32 * inv).to(x.dtype)
    return y if bias is None else (y.float() + bias).to(x.dtype)


def case(dtype, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, k, generator=g) * 4).to(dtype)
    x[0, :3] *= 50  # an outlier row
    weight = (torch.rand(k, generator=g) + 0.5).to(dtype)
    bias = torch.randn(k, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [576, 100, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_c_norm_is_its_arithmetic_bit_for_bit(dtype, k, with_bias):
    x, weight, bias = case(dtype, k, seed=k)
    bias = bias if with_bias else None
    want = written_out(x, weight, bias, 1e-5)
    assert torch.equal(cpu_norm.rms_norm(x, weight, bias, 1e-5), want)
    norm = RMSNorm(weight, 1e-5, bias)
    torch_ops = norm(x)
    norm.in_c = True
    assert torch.equal(norm(x), want)
    # torch's own sum order differs from the C file's only in the last bits of the scale
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # (absolute too: a bias can cancel the normed value)
    assert torch.allclose(torch_ops.float(), want.float(), rtol=tol, atol=tol)


def test_c_norm_row_does_not_depend_on_the_batch_or_threads():
    x, weight, bias = case(torch.bfloat16, 576, seed=3)
    x = torch.cat([x] * 8)  # 72 rows: split over threads
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpu_norm.rms_norm(x, weight, bias, 1e-6))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(cpu_norm.rms_norm(x[5:6], weight, bias, 1e-6), outs[0][5:6])


def test_c_norm_plain_path_computes_the_same_bits(tmp_path):
    """CPUs without AVX-512 run the plain loop (forced here in a child process): the same bits."""
    x, weight, bias = case(torch.bfloat16, 100, seed=4)
    torch.save((x, weight, bias), tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import cpu_norm, s8gemm; x, w, b = torch.load(sys.argv[1]); "
            "assert s8gemm.isa() == 'plain'; torch.save(cpu_norm.rms_norm(x, w, b, 1e-5), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   env={**os.environ, "PDMIX_S8GEMM_ISA": "plain"})
    assert torch.equal(torch.load(tmp_path / "out.pt"), cpu_norm.rms_norm(x, weight, bias, 1e-5))

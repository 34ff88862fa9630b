"""The runtime's rotary embedding in C (pdmix/kernels/cpu_rotary.py), in place on a view of a fused
q/k/v output, against layers.apply_rotary (torch's ops) bit for bit: bf16 and fp32, head sizes the
AVX-512 path takes and ones it leaves to the plain loop, a row alone and 600 rows on two threads, and
the plain C path of CPUs without AVX-512."""

import os
import subprocess
import sys

import pytest
import torch

from pdmix.kernels import cpu_rotary
from pdmix.kernels.clib import library
from pdmix.models.layers import apply_rotary

pytestmark = pytest.mark.skipif(library()[0] is None, reason="no C compiler for pdmix's kernels")

SHAPES = [(1, 12, 64), (7, 5, 128), (3, 2, 6), (33, 4, 32), (600, 12, 64), (2, 3, 80)]


def cases(dtype):
    g = torch.Generator().manual_seed(0)
    for t, heads, d in SHAPES:
        for scale in (1.0, 40.0, 1e-3):
            fused = (torch.randn(t, heads + 2, d, generator=g) * scale).to(dtype)  # q/k, then v's heads after them
            angle = torch.randn(t, d // 2, generator=g) * 300  # positions far out: cos and sin of every sign
            emb = torch.cat([angle, angle], -1)
            yield fused, heads, emb.cos().to(dtype), emb.sin().to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_in_c_gives_apply_rotarys_bits_in_place(dtype):
    torch.set_num_threads(2)
    for fused, heads, cos, sin in cases(dtype):
        qk = fused[:, :heads]
        assert cpu_rotary.usable(qk, cos)
        expected, rest = apply_rotary(qk, cos, sin), fused[:, heads:].clone()
        out = cpu_rotary.rotate_(qk, cos, sin)
        assert out.data_ptr() == fused.data_ptr()  # in place
        assert torch.equal(bits(out), bits(expected)), (fused.shape, dtype)
        assert torch.equal(bits(fused[:, heads:]), bits(rest))  # the heads after q/k untouched


def test_rotary_plain_c_path_gives_the_same_bits(tmp_path):
    torch.save(list(cases(torch.bfloat16)), tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import clib, cpu_rotary; c = torch.load(sys.argv[1]); "
            "assert clib.isa() == 'plain'; "
            "torch.save([cpu_rotary.rotate_(f[:, :h], cos, sin).clone() for f, h, cos, sin in c], sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   env={**os.environ, "PDMIX_S8GEMM_ISA": "plain"})
    for (fused, heads, cos, sin), out in zip(cases(torch.bfloat16), torch.load(tmp_path / "out.pt")):
        assert torch.equal(bits(out), bits(apply_rotary(fused[:, :heads], cos, sin)))

"""Kernel backends against the reference backend (the SPEC §5 oracle) on the same layer and rows."""

import os
import subprocess
import sys

import pytest
import torch

from pdmix import kernels
from pdmix.errors import PdmixError
from pdmix.kernels import clib, fusion, onednn, reference, s8gemm
from pdmix.kernels.reference import ReferenceKernel
from pdmix.quant.arithmetic import quantize_linear, static_activation_params
from pdmix.schemes import w8a8_mix

CPU = torch.device("cpu")
FAST_CPU = [n for n in kernels.priority("cpu") if n != "reference" and kernels.BACKENDS[n].unsupported(CPU, False) is None]
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


@pytest.mark.parametrize("name", FAST_CPU)
@pytest.mark.parametrize("n,k,m,n_dynamic", [(96, 64, 1, 0), (192, 576, 8, 0), (192, 576, 300, 300),
                                             (320, 128, 37, 20), (128, 1536, 16, 0), (128, 1536, 512, 512),
                                             (1536, 576, 64, 0)])
def test_cpu_backend_matches_reference_bit_for_bit(name, n, k, m, n_dynamic):
    """Same int32 accumulators and, since the epilogues run in the reference's order, the same output
    bits: an int8 model re-quantizes every output, so 1 ulp would flip codes downstream."""
    p = layer(n, k, seed=n + k)
    x = activations(m, k, seed=m)
    ref, got = ReferenceKernel(p, torch.bfloat16), kernels.build(p, torch.bfloat16, name)
    acc, s = got.accumulate(x, n_dynamic)
    acc_ref, s_ref = ref.accumulate(x, n_dynamic)
    assert torch.equal(acc, acc_ref) and torch.equal(s, s_ref)
    y, y_ref = got.apply(x, n_dynamic), ref.apply(x, n_dynamic)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)


@pytest.mark.parametrize("name", FAST_CPU)
def test_cpu_backend_static_rows_equal_spec_formula(name):
    """Static rows against SPEC §5 written out: deq_scale * (x_q @ W^T + quant_bias), x_q computed here."""
    p = layer(64, 96, seed=5, bias=False)
    x = activations(4, 96, seed=9)
    x_q = torch.clamp(torch.round(x.float() / p.input_scale + p.input_offset), -128, 127)
    spec = (p.deq_scale * (x_q.double() @ p.weight.double().t() + p.quant_bias).float()).to(torch.bfloat16)
    assert torch.equal(kernels.build(p, torch.bfloat16, name).apply(x, 0), spec)


def test_empty_rows():
    p = layer(32, 64, seed=1)
    for name in FAST_CPU + ["reference"]:
        assert kernels.build(p, torch.bfloat16, name).apply(torch.empty(0, 64, dtype=torch.bfloat16), 0).shape == (0, 32)


def test_onednn_accumulators_are_exact_at_the_ends_of_the_code_range():
    """On x86 CPUs without VNNI oneDNN's u8s8 GEMM saturates int16 pair sums; there the kernel splits
    the codes (kernels/onednn.py). Either way the accumulators of the extreme codes are exact."""
    if "onednn" not in FAST_CPU:
        pytest.skip("no oneDNN int8 linear in this torch build")
    k = 576
    g = torch.Generator().manual_seed(0)
    p = layer(64, k, seed=2)
    p.weight = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=g)
    p.weight[0], p.weight[1] = 127, -127
    x_u8 = torch.randint(0, 256, (9, k), dtype=torch.uint8, generator=g)
    x_u8[0], x_u8[1], x_u8[2] = 255, 0, 1
    want = ((x_u8.int() - onednn.U8_SHIFT) @ p.weight.int().T).float()
    assert torch.equal(kernels.build(p, torch.bfloat16, "onednn").gemm(x_u8, None), want)
    assert onednn.needs_split() in (False, True)


def test_priority_list_and_forcing():
    # pdmix's own GEMM first where it has a vector path, or where oneDNN needs twice the arithmetic
    first = "cpu_int8" if s8gemm.isa() not in (None, "plain") or onednn.needs_split() else "onednn"
    assert kernels.choose(CPU).name == kernels.priority("cpu")[0] == first
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
    assert torch.equal(got.apply(x, n_dynamic), ref.apply(x, n_dynamic))


@pytest.mark.real
def test_smollm2_greedy_tokens_identical_across_backends(smollm2_w8a8):
    from pdmix import LLM, SamplingParams

    prompt = "What's deep learning? Explain it to a student."
    outs = {}
    for name in FAST_CPU + ["reference"]:
        llm = LLM(smollm2_w8a8, max_batch_size=1, kernel=name)
        outs[name] = llm.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True))[0].outputs[0].token_ids
    assert len(outs["reference"]) == 64
    assert all(ids == outs["reference"] for ids in outs.values())


def test_compiled_fusions_are_bit_identical_to_eager():
    x = activations(300, 576, seed=2)  # above COMPILE_MIN_ELEMENTS: the fused path
    assert x.numel() >= fusion.COMPILE_MIN_ELEMENTS
    scale, offset = torch.tensor(0.037), torch.tensor(3.0)
    assert torch.equal(fusion.fused(onednn.quantize_static_u8, x, scale, offset),
                       onednn.quantize_static_u8(x, scale, offset))
    (q, s), (q_ref, s_ref) = fusion.fused(onednn.quantize_dynamic_u8, x), onednn.quantize_dynamic_u8(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    acc, w_scale, b = torch.randint(-99999, 99999, (300, 192)).float(), torch.rand(192) / 100, torch.randn(192)
    assert torch.equal(fusion.fused(reference.epilogue_dynamic, acc, s, w_scale, b, torch.bfloat16),
                       reference.epilogue_dynamic(acc.to(torch.int32), s, w_scale, b, torch.bfloat16))
    assert torch.equal(fusion.fused(onednn.epilogue_static, acc, w_scale, torch.bfloat16),
                       onednn.epilogue_static(acc, w_scale, torch.bfloat16))


@pytest.mark.parametrize("name", FAST_CPU)
@pytest.mark.parametrize("m,n_dynamic", [(1, 0), (9, 0), (37, 20), (64, 64)])
def test_masked_rows_equal_split_rows(name, m, n_dynamic):
    """apply_masked (the compiled graph's form: both quantizations, rows picked by a mask) computes
    what apply computes with the row split as a count."""
    p = layer(320, 128, seed=5)
    x = activations(m, 128, seed=m)
    k = kernels.build(p, torch.bfloat16, name)
    mask = (torch.arange(m) < n_dynamic)[:, None]
    assert torch.equal(k.apply_masked(x, mask), k.apply(x, n_dynamic))


@pytest.mark.parametrize("m,n,k", [(1, 7, 32), (2, 96, 576), (3, 13, 40), (65, 130, 64), (17, 4, 16), (130, 37, 1536),
                                   (7, 9, 100), (8, 10, 200), (8, 6, 4160)])
def test_s8gemm_is_exact_for_every_code_and_shape(m, n, k):
    """pdmix's C GEMM against int64 products summed here: the ends of the int8 range (-128 too, which
    msModelSlim's static codes reach), ragged n and k (tails off the AVX2 path), more rows than a block,
    8 rows on each side of the VNNI path's tile/stream choice (TILE_K_VNNI)."""
    if s8gemm.library()[0] is None:
        pytest.skip(s8gemm.library()[1])
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x[0], w[0] = -128, -128
    x[-1], w[-1] = 127, -128
    want = (x.long() @ w.long().T).int()
    assert torch.equal(s8gemm.gemm(x, w), want)
    threads = torch.get_num_threads()
    try:  # columns split over threads: the same integers
        torch.set_num_threads(2)
        assert torch.equal(s8gemm.gemm(x, w), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,k", [(16, 4), (32, 576), (48, 1536), (80, 100), (960, 576)])
def test_packed_weight_is_exact_and_keeps_one_copy(n, k):
    """The VNNI-packed weight (CPUs with AVX-512 VNNI): the same integers as int64 products summed here
    for every row count around the 8-row tile (1-17) and beyond a 64-row block, column blocks left over
    by the 3-block tile (n = 16, 32, 80), columns split over threads; in_place packs into the given
    tensor's own storage, and either way the data holds exactly n * k codes, where the layout puts them."""
    if not s8gemm.packs(n, k):
        pytest.skip(f"an [{n}, {k}] weight stays row-major on this CPU ({s8gemm.isa()})")
    g = torch.Generator().manual_seed(n + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w[0], w[-1, :4] = -128, 127
    packed, own = s8gemm.Int8Weight(w), w.clone()
    placed = s8gemm.Int8Weight(own, in_place=True)
    assert packed.packed and packed.data.numel() == n * k
    # the layout as csrc/s8gemm.c documents it: w + 128, groups of 3 blocks of 16 columns, each group its
    # blocks' 64-byte chunks (4 codes of 16 columns) interleaved chunk by chunk
    j, q = torch.arange(n)[:, None], torch.arange(k)[None, :]
    block, group = j // 16, j // 48
    t = torch.clamp(n // 16 - group * 3, max=3)
    at = group * 48 * k + ((q // 4) * t + block - group * 3) * 64 + (j % 16) * 4 + q % 4
    assert torch.equal(packed.data.view(torch.uint8).reshape(-1)[at], (w.int() + 128).to(torch.uint8))
    assert placed.data.data_ptr() == own.data_ptr() and torch.equal(placed.data, packed.data)
    threads = torch.get_num_threads()
    try:
        for m in (*range(1, 18), 64, 67):
            x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
            x[0] = -128
            want = (x.long() @ w.long().T).int()
            for t in (1, 2):
                torch.set_num_threads(t)
                assert torch.equal(s8gemm.gemm(x, packed), want), (m, t)
    finally:
        torch.set_num_threads(threads)


def tie_layer(n: int, k: int, seed: int) -> tuple[w8a8_mix.W8A8Params, torch.Tensor]:
    """A layer and rows whose quantization lands on .5 ties on both paths: input_scale 0.5 and
    activations in quarters (static), and each row's max |x| 63.5, so s_t = 0.5 (dynamic)."""
    p = layer(n, k, seed)
    p.input_scale, p.input_offset = torch.tensor(0.5), torch.tensor(3.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-254, 255, (9, k), generator=g).float() / 4
    x[:, 0] = 63.5
    return p, x


@pytest.mark.parametrize("cap", ["plain", "avx2"])
def test_s8gemm_slower_paths_compute_what_this_cpus_path_does(tmp_path, cap):
    """The portable loops (CPUs without AVX2) and the AVX2 path (CPUs without AVX-512 VNNI), forced in
    a child process: the same integers, and the same blocked sums up to fp32 order."""
    if s8gemm.library()[0] is None:
        pytest.skip(s8gemm.library()[1])
    order = list(clib.ISAS.values())[::-1]  # plain, avx2, avx512_vnni
    if order.index(cap) >= order.index(s8gemm.isa()):
        pytest.skip(f"this CPU runs the {s8gemm.isa()} path itself")
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (3, 64), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (70, 64), dtype=torch.int8, generator=g)
    dx, dw = torch.rand(3, 2, generator=g), torch.rand(70, 2, generator=g)
    p, rows = tie_layer(96, 64, seed=3)
    spec = layer(99, 64, seed=3)  # scales as SPEC §4 makes them: held compactly (the test above)
    args = [(q.weight, q.input_scale, q.input_offset, q.deq_scale, q.quant_bias, q.weight_scale, q.bias_float)
            for q in (p, spec)]
    torch.save((x, w, dx, dw, args, rows), tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import s8gemm; x, w, dx, dw, args, rows = torch.load(sys.argv[1]); "
            f"assert s8gemm.isa() == {cap!r}; ys = [s8gemm.W8A8Linear(*a, torch.bfloat16)(rows.bfloat16(), 4) for a in args]; "
            "torch.save((s8gemm.gemm(x, w), s8gemm.q8_0_gemm(x, dx, w, dw), ys), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   env={**os.environ, "PDMIX_S8GEMM_ISA": cap})
    acc, blocks, ys = torch.load(tmp_path / "out.pt")
    assert torch.equal(acc, s8gemm.gemm(x, w))
    assert torch.allclose(blocks, s8gemm.q8_0_gemm(x, dx, w, dw), rtol=1e-5, atol=1e-3)
    for a, y in zip(args, ys):
        assert torch.equal(y, s8gemm.W8A8Linear(*a, torch.bfloat16)(rows.bfloat16(), 4))


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("k", [64, 40])
def test_whole_linear_in_c_matches_reference_on_ties(x_dtype, out_dtype, k):
    """pdmix_w8a8_linear (quantize + GEMM + epilogue in one C call) against the reference on rows
    built to hit round-half-to-even ties, both paths and both row-selection forms, a k off the AVX2
    path (40), fp32 and bf16 in and out."""
    if s8gemm.library()[0] is None:
        pytest.skip(s8gemm.library()[1])
    p, x = tie_layer(96, k, seed=k)
    x = x.to(x_dtype)
    assert (x.float() / p.input_scale).frac().abs().eq(0.5).any()  # ties are there
    ref = ReferenceKernel(p, out_dtype)
    lin = s8gemm.W8A8Linear(p.weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias, p.weight_scale,
                            p.bias_float, out_dtype)
    for n_dynamic in (0, 4, 9):
        want = ref.apply(x, n_dynamic)
        assert torch.equal(lin(x, n_dynamic), want)
        assert torch.equal(lin(x, dynamic=torch.arange(9) < n_dynamic), want)
    out = torch.full((9, 96), 7.0, dtype=out_dtype)
    lin(x, 0, out=out)
    assert torch.equal(out, ref.apply(x, 0))


def test_whole_linear_in_c_keeps_infinities():
    """Infinite scales (a broken checkpoint) come out as the reference writes them, on both paths and in
    every lane of the vector loops: the bf16 rounding carries nothing into an infinity's exponent."""
    if s8gemm.library()[0] is None:
        pytest.skip(s8gemm.library()[1])
    p, x = tie_layer(96, 64, seed=5)
    for t in (p.deq_scale, p.weight_scale):
        t[::7] = float("inf")
    ref = ReferenceKernel(p, torch.bfloat16)
    lin = s8gemm.W8A8Linear(p.weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias, p.weight_scale,
                            p.bias_float, torch.bfloat16)
    for n_dynamic in (0, 9):
        want = ref.apply(x.bfloat16(), n_dynamic)
        assert want.isinf().any()
        assert torch.equal(lin(x.bfloat16(), n_dynamic), want)


def test_whole_linear_in_c_holds_spec_scales_in_two_bytes_a_channel():
    """A layer quantized as SPEC §4 says keeps its weight_scale as bf16 and no deq_scale (the epilogue
    recomputes bf16(input_scale * weight_scale)), and a zero bias as the one shared zero vector, with
    the reference's bits on both paths; a deq_scale that is not that product (one channel one fp32
    ulp off) keeps the fp32 vectors, again with the reference's bits."""
    if s8gemm.library()[0] is None:
        pytest.skip(s8gemm.library()[1])
    x = activations(9, 576, seed=3)
    for bias in (False, True):  # False first: the shared zeros are made under bf16 defaults
        p = layer(203, 576, seed=11, bias=bias)  # 203: 16-, 8- and 1-wide epilogue loops
        spec_deq = (p.input_scale * p.weight_scale).bfloat16().float()  # SPEC §4, written out
        assert torch.equal(p.deq_scale, spec_deq)
        torch.set_default_dtype(torch.bfloat16)  # as vLLM's workers run: the shared zeros stay fp32
        try:
            lin = s8gemm.W8A8Linear(p.weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias,
                                    p.weight_scale, p.bias_float, torch.bfloat16)
        finally:
            torch.set_default_dtype(torch.float32)
        deq, _, ws, bias_float = lin.vectors
        assert deq is None and ws.dtype == torch.bfloat16 and torch.equal(ws.float(), p.weight_scale)
        assert (bias_float is s8gemm._zeros(203)) == (not bias) and bias_float.dtype == torch.float32
        for n_dynamic in (0, 4, 8, 9):  # 8: one static row, whose deq_scale is derived in the epilogue itself
            assert torch.equal(lin(x, n_dynamic), ReferenceKernel(p, torch.bfloat16).apply(x, n_dynamic))
    p.deq_scale[5] = torch.nextafter(p.deq_scale[5], torch.tensor(1.0))
    lin = s8gemm.W8A8Linear(p.weight, p.input_scale, p.input_offset, p.deq_scale, p.quant_bias, p.weight_scale,
                            p.bias_float, torch.bfloat16)
    assert lin.vectors[0] is not None and lin.vectors[2].dtype == torch.float32
    assert torch.equal(lin(x, 0), ReferenceKernel(p, torch.bfloat16).apply(x, 0))


def test_backend_choice_works_under_another_default_dtype():
    """vLLM's workers import pdmix while bf16 is torch's default dtype: the CPU check must not care."""
    code = ("import torch; torch.set_default_dtype(torch.bfloat16); from pdmix import kernels; "
            "print(kernels.choose(torch.device('cpu')).name)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out[-1] == kernels.choose(CPU).name

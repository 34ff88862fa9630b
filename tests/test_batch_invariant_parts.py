"""The parts of a step whose output for one sequence could depend on the others in the batch (issue 18):
decode attention over the paged cache, and the float linears (rolled-back layers, lm_head). Each row
computed in a batch must equal, bit for bit, the same row computed alone."""

import os
import random
import subprocess
import sys

import pytest
import torch

from pdmix.kernels import cpu_attention, cpu_float
from pdmix.models.linear import FloatLinear
from pdmix.runtime.attention import SeqRows, decode_attention, decode_group
from pdmix.runtime.kv_cache import KVCache, Slots, cache_dtype, token_slots


def softmax_attention(q, k, v):
    """One query row's attention written out in float64: q [H, D], k/v [L, KV, D] -> [H, D]."""
    h, kv = q.shape[0], k.shape[1]
    k, v = (t.double().repeat_interleave(h // kv, dim=1) for t in (k, v))   # [L, H, D]
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), k) * q.shape[1] ** -0.5, -1)
    return torch.einsum("hl,lhd->hd", p, v)


@pytest.fixture(params=["c", "torch"])
def attention_form(request, monkeypatch):
    """Both forms of decode attention and the cache write: C (kernels/cpu_attention.py) and torch."""
    if request.param == "c" and not cpu_attention.usable(torch.zeros(1), torch.zeros(1)):
        pytest.skip("pdmix's C kernels are unavailable here")
    if request.param == "torch":
        monkeypatch.setattr(cpu_attention, "usable", lambda *a: False)
    return request.param


def random_cache(lengths, block=16, kv=2, d=32, seed=0):
    """A cache holding random k/v for sequences of the given lengths on shuffled blocks, with their rows
    (as decode rows) and their k/v."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    cache = KVCache(1, 96, block, kv, d, torch.float32, torch.device("cpu"))
    free = list(range(96))
    rng.shuffle(free)
    seqs, keys, values = [], [], []
    for length in lengths:
        table = [free.pop() for _ in range(-(-length // block))]
        k = torch.randn(length, kv, d, generator=g)
        v = torch.randn(length, kv, d, generator=g)
        cache.write(0, Slots.of(torch.tensor(token_slots(table, block, 0, length)), block), k, v)
        seqs.append(SeqRows(len(seqs), 1, length - 1, table))
        keys.append(k)
        values.append(v)
    return cache, seqs, keys, values


def test_decode_attention_of_a_sequence_is_the_same_alone_or_beside_longer_ones(attention_form):
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    block, heads, d = 16, 6, 32
    # 1 to 21 blocks: padding to the longest varies a lot
    cache, seqs, keys, values = random_cache((1, 5, 16, 17, 40, 100, 250, 333), block, 2, d)
    q = torch.randn(len(seqs), heads, d, generator=g).bfloat16()
    alone = [decode_attention(q[i:i + 1], cache, 0, decode_group([s], block, "cpu"))[0] for i, s in enumerate(seqs)]
    for trial in range(20):
        chosen = rng.sample(range(len(seqs)), rng.randint(2, len(seqs)))
        out = decode_attention(q[chosen], cache, 0, decode_group([seqs[i] for i in chosen], block, "cpu"))
        for row, i in enumerate(chosen):
            assert torch.equal(out[row], alone[i]), f"trial {trial}: sequence {i} beside {chosen}"
    for i in range(len(seqs)):  # and it is attention: against the formula in float64
        want = softmax_attention(q[i].float(), keys[i], values[i])
        assert (alone[i].double() - want).abs().max() < 1e-2 * want.abs().max()


def test_float_linear_rows_do_not_depend_on_how_many_rows_share_the_gemm():
    torch.manual_seed(0)
    # SmolLM2's lm_head and its rolled-back MLP linears, with as many rows as decode and prefill steps hold
    for n, k, rows in ((49152, 576, 33), (576, 1536, 300), (1536, 576, 300)):
        layer = FloatLinear(torch.randn(n, k).bfloat16())
        x = torch.randn(rows, k).bfloat16()
        alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
        exact = x.double() @ layer.weight.double().T
        assert ((alone.double() - exact).abs() <= 0.01 * exact.abs() + 0.05).all()
        for m in (2, 3, 7, 16, 17, 33, 64, 129, 300):
            if m <= rows:
                assert torch.equal(layer(x[:m]), alone[:m]), (n, k, m)


def test_c_attention_and_cache_write_agree_with_the_torch_forms(monkeypatch, tmp_path):
    """The C cache write stores exactly what torch's indexing stores (bf16 rows, and strided views
    as a fused q/k/v output gives); C decode attention equals the torch form within fp32 rounding,
    does not depend on the thread count, and its portable C path (CPUs without AVX2) gives the
    AVX2 path's bits."""
    if not cpu_attention.usable(torch.zeros(1), torch.zeros(1)):
        pytest.skip("pdmix's C kernels are unavailable here")
    block, kv, d = 16, 2, 32
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(40, 3, kv, d, generator=g).bfloat16()
    k, v = fused[:, 1], fused[:, 2]  # views with a row stride of 3 * kv * d
    slots = Slots.of(torch.randperm(96 * block, generator=g)[:40], block)
    c = KVCache(1, 96, block, kv, d, torch.float32, torch.device("cpu"))
    c.write(0, slots, k, v)
    with monkeypatch.context() as m:
        m.setattr(cpu_attention, "usable", lambda *a: False)
        t = KVCache(1, 96, block, kv, d, torch.float32, torch.device("cpu"))
        t.write(0, slots, k, v)
    assert torch.equal(c.k[0], t.k[0]) and torch.equal(c.v[0], t.v[0]) and c.k[0].abs().sum() > 0

    cache, seqs, _, _ = random_cache((1, 17, 250, 333), block, kv, d, seed=2)
    q = torch.randn(len(seqs), 6, d, generator=g).bfloat16()
    group = decode_group(seqs, block, "cpu")
    fast = decode_attention(q, cache, 0, group)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(decode_attention(q, cache, 0, group), fast)
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as m:
        m.setattr(cpu_attention, "usable", lambda *a: False)
        slow = decode_attention(q, cache, 0, group)
    assert fast.dtype == slow.dtype == torch.bfloat16
    assert (fast.float() - slow.float()).abs().max() <= 2 ** -7 * slow.float().abs().max()

    args = (q.float(), cache.k[0], cache.v[0], group.block_tables, group.lengths, 32 ** -0.5)
    torch.save(args, tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import clib, cpu_attention; a = torch.load(sys.argv[1]); "
            "assert clib.isa() == 'plain'; torch.save(cpu_attention.decode(*a), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   env={**os.environ, "PDMIX_S8GEMM_ISA": "plain"})
    assert torch.equal(torch.load(tmp_path / "out.pt"), cpu_attention.decode(*args))


def test_c_attention_vector_paths_give_the_portable_paths_bits(tmp_path):
    """Decode attention on each of its paths (AVX2, and AVX-512 where this CPU has it; forced in child
    processes) gives its portable C path's bits: head shapes that reach every tile and tail (1-8 query
    heads per kv head, head_dim 16-128 and not a multiple of 8 or 16), blocks of 16 and 128 in shuffled
    order with lengths ending mid-tile, fp32 and bf16 caches and rows."""
    if cpu_attention.library()[0] is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(7)
    cases = []
    for kv, group, d, block, dtype in ((3, 3, 64, 128, torch.bfloat16), (2, 1, 128, 16, torch.bfloat16),
                                       (1, 8, 64, 16, torch.float32), (2, 5, 40, 16, torch.bfloat16),
                                       (4, 2, 128, 128, torch.float32), (1, 7, 16, 16, torch.bfloat16),
                                       (2, 4, 72, 128, torch.bfloat16)):
        lengths = torch.tensor([1, 31, 33, 200, 161])
        width = -(-int(lengths.max()) // block)
        tables = torch.randperm(len(lengths) * width, generator=g).view(len(lengths), width)
        kc = torch.randn(tables.numel(), kv, d, block, generator=g).to(dtype)
        vc = torch.randn(tables.numel(), kv, block, d, generator=g).to(dtype)
        q = torch.randn(len(lengths), kv * group, d, generator=g).to(dtype)
        cases.append((q, kc, vc, tables, lengths, d ** -0.5))
    torch.save(cases, tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import clib, cpu_attention; c = torch.load(sys.argv[1]); "
            "torch.save((clib.isa(), [cpu_attention.decode(*a) for a in c]), sys.argv[2])")
    out = {}
    for cap in ("plain", "avx2", None):
        env = {**os.environ, "PDMIX_S8GEMM_ISA": cap} if cap else os.environ
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / f"{cap}.pt")],
                       check=True, env=env)
        out[cap] = torch.load(tmp_path / f"{cap}.pt")
    assert out["plain"][0] == "plain"
    for cap in ("avx2", None):
        for i, (a, b) in enumerate(zip(out[cap][1], out["plain"][1])):
            assert torch.equal(a, b), (out[cap][0], i)
    for a, (q, kc, vc, tables, lengths, scale) in zip(out["plain"][1], cases):  # and it is attention
        b = int(lengths[3])
        keys = kc[tables[3]].permute(0, 3, 1, 2).reshape(-1, kc.shape[1], kc.shape[2])[:b]
        values = vc[tables[3]].permute(0, 2, 1, 3).reshape(-1, vc.shape[1], vc.shape[3])[:b]
        want = softmax_attention(q[3].float(), keys.float(), values.float())
        assert (a[3].double() - want).abs().max() < 1e-2 * want.abs().max()


@pytest.mark.parametrize("cap", ["plain", "avx2", None])
def test_c_float_linear_every_path_is_row_invariant_and_close_to_float64(tmp_path, cap):
    """The C bf16 linear on each of its paths (forced below this CPU's in a child process): a row's
    output is the same alone, in any batch and on any thread count, and is the float64 product with
    bias rounded once to bf16 (up to fp32 summation)."""
    if cpu_float.isa() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(37, 100, generator=g).bfloat16(), torch.randn(37, generator=g).bfloat16()
    x = torch.randn(70, 100, generator=g).bfloat16()
    torch.save((x, w, b), tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import cpu_float; x, w, b = torch.load(sys.argv[1]); "
            "alone = torch.cat([cpu_float.linear(x[i:i + 1], w, b) for i in range(len(x))]); "
            "parts = [cpu_float.linear(x[:m], w, b) for m in (2, 5, 17, 70)]; torch.set_num_threads(2); "
            "torch.save((cpu_float.isa(), alone, parts, cpu_float.linear(x, w, b)), sys.argv[2])")
    env = {**os.environ, "PDMIX_S8GEMM_ISA": cap} if cap else os.environ
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True, env=env)
    isa, alone, parts, threaded = torch.load(tmp_path / "out.pt")
    assert cap is None or isa == cap or (cap == "avx2" and isa == "plain")  # a CPU without AVX2 runs plain
    for part in parts:
        assert torch.equal(part, alone[:len(part)])
    assert torch.equal(threaded, alone)
    exact = (x.double() @ w.double().T + b.double()).bfloat16().double()
    assert ((alone.double() - exact).abs() <= 2 ** -7 * exact.abs() + 1e-3).all()  # within one bf16 ulp


@pytest.mark.parametrize("cap", ["plain", None])
def test_c_attention_softmax_is_accurate_over_the_whole_exp_range(tmp_path, cap):
    """The C attention's own exp (one polynomial in its plain and AVX2 forms, so that both give the
    same bits) against float64: scores from -80 to 0 (one key dimension carries the score), values that
    weigh each token by its position; the softmax-weighted mean position within fp32 rounding."""
    if cpu_attention.library()[0] is None:
        pytest.skip("no C compiler")
    n, d, block = 4096 + 5, 64, 16
    blocks = -(-n // block)
    s = torch.linspace(-80, 0, n)
    kc, vc = torch.zeros(blocks, 1, d, block), torch.zeros(blocks, 1, block, d)
    padded = lambda t: torch.cat([t, torch.zeros(blocks * block - n)]).view(blocks, block)
    kc[:, 0, 0, :], vc[:, 0, :, 1] = padded(s), padded(torch.arange(n, dtype=torch.float32))
    vc[:, 0, :, 2] = 1.0
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    torch.save((q, kc, vc, torch.arange(blocks).view(1, -1), torch.tensor([n])), tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import cpu_attention; a = torch.load(sys.argv[1]); "
            "torch.save(cpu_attention.decode(*a, 1.0), sys.argv[2])")
    env = {**os.environ, "PDMIX_S8GEMM_ISA": cap} if cap else os.environ
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True, env=env)
    out = torch.load(tmp_path / "out.pt")[0, 0]
    e = torch.exp(s.double())
    assert abs(out[1].item() - (e * torch.arange(n).double()).sum().item() / e.sum().item()) < 1e-5 * n
    assert abs(out[2].item() - 1.0) < 1e-6  # the weights sum to one


@pytest.mark.parametrize("cap", ["plain", None])
def test_c_attention_on_a_bf16_cache_gives_the_fp32_cache_bits(tmp_path, cap):
    """bf16 models keep a bf16 cache (kv_cache.cache_dtype): their k/v are bf16 already, so it holds
    the same values as an fp32 cache, and decode attention must give the same bits from either. The C
    cache write rounds fp32 rows to bf16 as torch does. On this CPU's path and the portable one."""
    if cpu_attention.library()[0] is None:
        pytest.skip("no C compiler")
    assert cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert cache_dtype(torch.float32, torch.device("cpu")) == torch.float32
    block, kv, d = 16, 2, 64
    g = torch.Generator().manual_seed(3)
    caches = {dt: KVCache(1, 40, block, kv, d, dt, torch.device("cpu")) for dt in (torch.float32, torch.bfloat16)}
    rows = torch.randn(300, 2, kv, d, generator=g)
    slots = Slots.of(torch.randperm(40 * block, generator=g)[:300], block)
    for cache in caches.values():
        cache.write(0, slots, rows[:, 0].bfloat16(), rows[:, 1].bfloat16())
    assert torch.equal(caches[torch.bfloat16].k[0].float(), caches[torch.float32].k[0])
    assert torch.equal(caches[torch.bfloat16].v[0].float(), caches[torch.float32].v[0])
    rounded = KVCache(1, 40, block, kv, d, torch.bfloat16, torch.device("cpu"))
    rounded.write(0, slots, rows[:, 0], rows[:, 1])  # fp32 rows into the bf16 cache
    assert torch.equal(rounded.k[0], caches[torch.bfloat16].k[0])

    tables = torch.randperm(40, generator=g)[:20].view(2, 10)
    lengths = torch.tensor([160, 77])
    q = torch.randn(2, 6, d, generator=g).bfloat16()
    args = {dt: (q, c.k[0], c.v[0], tables, lengths, d ** -0.5) for dt, c in caches.items()}
    torch.save(args, tmp_path / "in.pt")
    code = ("import sys, torch; from pdmix.kernels import cpu_attention; a = torch.load(sys.argv[1]); "
            "torch.save({dt: cpu_attention.decode(*x) for dt, x in a.items()}, sys.argv[2])")
    env = {**os.environ, "PDMIX_S8GEMM_ISA": cap} if cap else os.environ
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True, env=env)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out[torch.bfloat16], out[torch.float32])
    assert out[torch.float32].abs().sum() > 0


def test_c_decode_attention_writes_the_steps_rows_as_kv_write_does():
    """A decode-only step writes its new rows and attends in one C call (PagedAttention): the cache and
    the output are those of kv_write followed by the attention alone."""
    if cpu_attention.library()[0] is None:
        pytest.skip("no C compiler")
    block, kv, h, d = 16, 2, 6, 64
    g = torch.Generator().manual_seed(5)
    caches = [KVCache(1, 12, block, kv, d, torch.bfloat16, torch.device("cpu")) for _ in range(2)]
    old = Slots.of(torch.randperm(12 * block, generator=g)[:100], block)
    rows = torch.randn(100, 2, kv, d, generator=g).bfloat16()
    for cache in caches:
        cache.write(0, old, rows[:, 0], rows[:, 1])
    tables = torch.tensor([[0, 1, 2], [5, 4, 4], [9, 8, 7]])
    lengths = torch.tensor([40, 20, 33])  # the new row included
    slots = torch.stack([tables[i, (n - 1) // block] * block + (n - 1) % block for i, n in enumerate(lengths.tolist())])
    fused = torch.randn(3, h + 2 * kv, d, generator=g).bfloat16()  # q, k, v heads of one output, as the runtime's
    q, k, v = fused[:, :h], fused[:, h:h + kv], fused[:, h + kv:]
    caches[0].write(0, Slots.of(slots, block), k, v)
    apart = cpu_attention.decode(q, caches[0].k[0], caches[0].v[0], tables, lengths, d ** -0.5)
    together = cpu_attention.decode(q, caches[1].k[0], caches[1].v[0], tables, lengths, d ** -0.5, new=(k, v, slots))
    assert torch.equal(caches[1].k[0], caches[0].k[0]) and torch.equal(caches[1].v[0], caches[0].v[0])
    assert torch.equal(together, apart)

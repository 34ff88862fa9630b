"""The continuous-batching scheduler, the block allocator and the sampler, on their own."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from pdmix.errors import PdmixError
from pdmix.runtime.kv_cache import BlockAllocator, KVCache, Slots
from pdmix.runtime.sampling import SamplingParams, filter_top_k_top_p, make_generator, sample_one
from pdmix.runtime.scheduler import Scheduler, Sequence


def advance(plan, next_token=7):
    """What the engine does after a forward: count computed tokens, append sampled ones."""
    for seq, n in plan.prefill:
        seq.num_computed += n
        if seq.num_computed == seq.num_prefill:
            seq.output_ids.append(next_token)
    for seq in plan.decode:
        seq.num_computed += 1
        seq.output_ids.append(next_token)


def seqs(*lengths, max_tokens=8):
    return [Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens)) for n in lengths]


def test_chunked_prefill_batch_limit_and_row_order():
    sched = Scheduler(BlockAllocator(100), block_size=4, max_batch_size=2, max_prefill_tokens=8)
    a, b, c = seqs(10, 3, 5)
    for s in (a, b, c):
        sched.add(s)
    p1 = sched.schedule()
    assert [(s, n) for s, n in p1.prefill] == [(a, 8)] and p1.decode == []
    assert len(a.block_table) == 2
    advance(p1)
    p2 = sched.schedule()  # a's last chunk first, then b joins; c waits for a free batch slot
    assert p2.prefill == [(a, 2), (b, 3)] and p2.decode == []
    advance(p2)
    p3 = sched.schedule()
    assert p3.prefill == [] and p3.decode == [a, b]
    advance(p3)
    sched.finish(a, "stop")
    p4 = sched.schedule()  # a left: c joins while b decodes
    assert p4.prefill == [(c, 5)] and p4.decode == [b]
    assert sched.allocator.num_free == 100 - len(b.block_table) - len(c.block_table)


def test_preemption_frees_blocks_and_recomputes_everything_later():
    alloc = BlockAllocator(5)
    sched = Scheduler(alloc, block_size=4, max_batch_size=4, max_prefill_tokens=64)
    a, b = seqs(8, 7)
    sched.add(a)
    sched.add(b)
    p = sched.schedule()
    assert p.prefill == [(a, 8), (b, 7)] and alloc.num_free == 1
    advance(p)
    p = sched.schedule()  # a's 9th token takes the last block; b's 8th fits in its second block
    assert p.decode == [a, b] and alloc.num_free == 0
    advance(p)
    p = sched.schedule()  # b's 9th token needs a block: b, the latest admitted, is preempted
    assert p.decode == [a] and sched.waiting[0] is b and b.block_table == [] and sched.num_preemptions == 1
    assert b.num_computed == 0 and b.num_prefill == len(b.tokens) == 9
    advance(p)
    sched.finish(a, "length")
    assert alloc.num_free == 5
    p = sched.schedule()
    assert p.prefill == [(b, 9)]


def test_a_sequence_too_long_for_the_cache_is_refused():
    sched = Scheduler(BlockAllocator(3), block_size=4, max_batch_size=1, max_prefill_tokens=64)
    with pytest.raises(PdmixError, match="does not fit in the KV cache"):
        sched.add(seqs(10, max_tokens=3)[0])


def test_cache_write_puts_rows_at_their_slots():
    cache = KVCache(num_layers=1, num_blocks=3, block_size=4, kv_heads=2, head_dim=3, dtype=torch.float32,
                    device=torch.device("cpu"))
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    cache.write(0, Slots.of(torch.tensor([9, 2, 4]), 4), k, v)  # block 2 row 1, block 0 row 2, block 1 row 0
    # keys per block, transposed [num_blocks, kv_heads, head_dim, block_size]; values per block
    # [num_blocks, kv_heads, block_size, head_dim]
    assert torch.equal(cache.k[0][2, :, :, 1], k[0]) and torch.equal(cache.k[0][0, :, :, 2], k[1])
    assert torch.equal(cache.k[0][1, :, :, 0], k[2])
    assert torch.equal(cache.v[0][1, :, 0], v[2]) and torch.equal(cache.v[0][2, :, 1], v[0])
    assert cache.k[0].shape == (3, 2, 3, 4) and cache.v[0].shape == (3, 2, 4, 3)
    keys, values = cache.blocks(0, torch.tensor([[2, 0]]))  # one sequence over blocks 2 then 0
    assert torch.equal(keys[0, 0, :, :, 1], k[0]) and torch.equal(keys[0, 1, :, :, 2], k[1])
    assert torch.equal(values[0, 0, :, 1], v[0]) and torch.equal(values[0, 1, :, 2], v[1])
    assert keys.shape == (1, 2, 2, 3, 4) and values.shape == (1, 2, 2, 4, 3)
    tk, tv = cache.tokens(0, Slots.of(torch.tensor([[9, 2, 4]]), 4))  # [P, KV, L, D]
    assert torch.equal(tk[0].transpose(0, 1), k) and torch.equal(tv[0].transpose(0, 1), v)


def test_top_k_and_top_p_filters_match_transformers():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50) * 3
        for k in (1, 5, 50):
            ours = filter_top_k_top_p(logits, k, 1.0)
            hf = TopKLogitsWarper(k)(None, logits[None].clone())[0]
            assert torch.equal(torch.isinf(ours), torch.isinf(hf))
        for p in (0.1, 0.5, 0.9):
            ours = filter_top_k_top_p(logits, 0, p)
            hf = TopPLogitsWarper(p)(None, logits[None].clone())[0]
            assert torch.equal(torch.isinf(ours), torch.isinf(hf))


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, seed=3)
    draw = lambda p, n: [sample_one(logits, p, [], g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(n)]
    assert draw(params, 30) == draw(params, 30)
    counts = torch.bincount(torch.tensor(draw(SamplingParams(temperature=1.0, seed=0), 4000)), minlength=4).float()
    assert torch.allclose(counts / 4000, logits.softmax(-1), atol=0.03)
    assert set(draw(SamplingParams(temperature=1.0, top_k=2, seed=1), 200)) == {1, 2}
    assert sample_one(logits, SamplingParams(), [], None) == 2
    # repetition penalty (Hugging Face's rule) can move greedy off a seen token
    assert sample_one(logits, SamplingParams(repetition_penalty=4.0), [2], None) == 1


def test_bad_sampling_params_are_refused():
    for kw in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"repetition_penalty": 0}):
        with pytest.raises(PdmixError):
            SamplingParams(**kw)

"""The pieces under `pdmix serve`: incremental detokenization with stop strings, aborting a
sequence, and per-token logprobs."""

import pytest
import torch

from pdmix import LLM, SamplingParams
from pdmix.runtime.kv_cache import BlockAllocator
from pdmix.runtime.scheduler import Scheduler, Sequence
from pdmix.serving.detokenizer import TextStream
from pdmix.synth import byte_tokenizer

TEXT = "Deep learning 深度学习 is fun 🙂👍🏽 — ok"


def stream_pieces(tokenizer, ids, stop=None) -> tuple[list[str], TextStream]:
    s = TextStream(tokenizer, stop)
    pieces = [s.add(ids[:i]) for i in range(1, len(ids) + 1)]
    pieces.append(s.finish(ids))
    return pieces, s


def test_byte_tokens_never_split_a_character():
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode())  # one token per byte: multi-byte characters span several tokens
    pieces, _ = stream_pieces(tok, ids)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert "学" in pieces and "🙂" in pieces  # each character came out whole, in one piece
    assert pieces.count("") >= len(ids) - len(TEXT)  # pieces held while a character was incomplete


def test_special_tokens_are_skipped_and_an_incomplete_tail_is_flushed_at_the_end():
    tok = byte_tokenizer()
    ids = tok("ab深", add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pieces, _ = stream_pieces(tok, ids[:-1] + [eos])  # the last byte of 深 never came
    assert "".join(pieces) == tok.decode(ids[:-1], skip_special_tokens=True) == "ab\ufffd"
    assert pieces[:-1] == ["a", "b", "", "", ""]


@pytest.mark.parametrize("stop, want", [
    (["学习"], "Deep learning 深度"),              # a stop string spread over six byte tokens
    (["is", "深度"], "Deep learning "),            # the earliest of several stops wins
    (["🙂👍"], "Deep learning 深度学习 is fun "),
    (["absent"], TEXT),
])
def test_stop_strings_are_cut_and_never_streamed(stop, want):
    tok = byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces, s = stream_pieces(tok, ids, stop)
    assert "".join(pieces) == want
    assert s.stopped == (want != TEXT)
    sent = ""
    for p in pieces:  # at no point had the client seen any part of a stop string past the cut
        sent += p
        assert sent == want[:len(sent)]


def test_smollm2_style_tokenizer_round_trip(tiny_models):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_models("llama")))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces, _ = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_abort_frees_blocks_of_waiting_and_running_sequences():
    alloc = BlockAllocator(8)
    sched = Scheduler(alloc, block_size=4, max_batch_size=1, max_prefill_tokens=64)
    a, b = Sequence(list(range(10)), SamplingParams()), Sequence(list(range(5)), SamplingParams())
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [s for s, _ in plan.prefill] == [a] and alloc.num_free == 8 - 3
    sched.abort(b)  # waiting: never had blocks
    sched.abort(a)  # running: its 3 blocks come back
    assert alloc.num_free == 8 and not sched.has_work()
    assert a.finish_reason == b.finish_reason == "abort" and a.block_table == []


def test_logprobs_are_log_softmax_of_the_sampled_rows(tiny_models):
    llm = LLM(tiny_models("qwen3"), block_size=8)
    seq = Sequence([5, 6, 7, 8], SamplingParams(max_tokens=4, logprobs=3, return_logits=True, ignore_eos=True))
    llm.engine.run([seq])
    assert len(seq.logprobs) == len(seq.output_ids) == 4
    for token, row, (lp, top) in zip(seq.output_ids, seq.logits, seq.logprobs):
        logp = row.double().exp() / row.double().exp().sum()  # softmax written out
        assert lp == pytest.approx(float(logp[token].log()), abs=1e-4)
        want = torch.topk(logp, 3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.log().tolist(), abs=1e-4)

"""A greedy answer does not depend on who else is served (issue 18): 32 concurrent streams on the real
SmolLM2 W8A8_MIX checkpoint (m4 smoothing, L10 rollback, so float linears too), prompts of different
lengths arriving at different times so that steps mix prefill and decode rows, each identical to the
same request run alone in-process; plain, with --compile, and under tensor parallelism (TP=3: SmolLM2's
9 query and 3 KV heads do not split in two; tests/test_serve.py serves the tiny model at TP=2)."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdmix import LLM, SamplingParams
from servers import serve

N = 32
FLAGS = ("--block_size", 16, "--max_batch_size", N, "--max_input_length", 160, "--max_output_length", 32,
         "--served_model_name", "smol")


def requests(tok) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of each client: text of 2 to 101 words, 8 to 24 new tokens."""
    words = ("The river valley was settled early , and its farms fed the growing towns along the coast . "
             "In 1850 the railway reached the capital , bringing trade , soldiers and new ideas . ").split() * 8
    return [(tok(" ".join(words[(i * 7) % 30:][:2 + (i * 37) % 100]))["input_ids"], 8 + (i * 5) % 17)
            for i in range(N)]


@pytest.fixture(scope="module")
def solo(smollm2_w8a8):
    """Each request alone, in this process, at the server's one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(smollm2_w8a8, block_size=16)
        work = requests(llm.tokenizer)
        return work, [llm.generate([ids], SamplingParams(max_tokens=m, ignore_eos=True))[0].outputs[0].text
                      for ids, m in work]
    finally:
        torch.set_num_threads(threads)


def served_concurrently(server, work) -> list[str]:
    def one(i):
        time.sleep(0.04 * i)  # staggered: later prompts prefill while earlier ones decode
        ids, max_tokens = work[i]
        chunks = server.client().completions.create(model="smol", prompt=ids, max_tokens=max_tokens, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        return "".join(ch.choices[0].text for ch in chunks)

    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, range(N)))


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("how", ["plain", "compile", "tp3"])
def test_32_concurrent_real_streams_each_equal_their_solo_run(smollm2_w8a8, solo, how):
    work, want = solo
    flags = FLAGS + (("--compile",) if how == "compile" else ())
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
                if how == "tp3" else None)
    with serve(smollm2_w8a8, *flags, launcher=launcher, startup_s=600) as s:
        before = s.metrics()
        got = served_concurrently(s, work)
        m = s.metrics()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} ({len(work[i][0])} prompt tokens): {g!r} != solo {w!r}"
    steps = m["pdmix_step_sequences_count"] - before["pdmix_step_sequences_count"]
    big = steps - (m['pdmix_step_sequences_bucket{le="4.0"}'] - before['pdmix_step_sequences_bucket{le="4.0"}'])
    assert big >= 5, m  # the batch really held many sequences at once

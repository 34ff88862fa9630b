"""Load on `pdmix serve`: N concurrent streaming clients; prints JSON with requests/s, output
tokens/s, and time to first token (TTFT) and time per output token (TPOT), p50 and p99.

Starts `pdmix serve MODEL` itself on a free loopback port (or uses --url), then every client
sends /v1/completions requests one after another, streamed, greedy, ignore_eos, with random
token-id prompts and output lengths drawn from the given ranges (seeded, so runs compare).

    python benchmarks/serve_load.py --model out/smol --clients 32 --requests 128 \\
        --prompt_tokens 16,256 --max_tokens 16,128 --server_args "--max_batch_size 32"
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
    proc = subprocess.Popen([sys.executable, "-m", "pdmix", "serve", model, "--port", str(port), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pdmix serve exited: {proc.stderr.read()}")
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


def one_request(url: str, model: str, prompt: list[int], max_tokens: int, api_key: str | None) -> dict:
    """Stream one completion; the time of every token (logprobs: 0 makes each token its own event)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times = []
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        lp = json.loads(line[6:])["choices"][0]["logprobs"]
        times += [time.perf_counter()] * len(lp["tokens"]) if lp else []
    conn.close()
    return {"ttft": times[0] - start, "tokens": len(times),
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (served here unless --url is given)")
    ap.add_argument("--url", default=None, help="a running pdmix serve, e.g. http://127.0.0.1:8000")
    ap.add_argument("--served_model_name", default=None)
    ap.add_argument("--api_key", default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="in all (default: 2 per client)")
    ap.add_argument("--prompt_tokens", type=span, default=(16, 128), help="LO,HI")
    ap.add_argument("--max_tokens", type=span, default=(16, 64), help="LO,HI")
    ap.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server_args", default="", help='flags for pdmix serve, e.g. "--max_batch_size 32"')
    args = ap.parse_args()

    n = args.requests or 2 * args.clients
    rng = random.Random(args.seed)
    work = [([rng.randrange(args.vocab) for _ in range(rng.randint(*args.prompt_tokens))],
             rng.randint(*args.max_tokens)) for _ in range(n)]
    model = args.served_model_name or Path(args.model).resolve().name
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, ["--served_model_name", model, *shlex.split(args.server_args)])
    try:
        one_request(url, model, [1, 2, 3], 2, args.api_key)  # warm the server
        results, lock, it = [], threading.Lock(), iter(work)

        def client():
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                r = one_request(url, model, *job, args.api_key)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    pct = lambda xs: {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "server_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "model": str(args.model), "server_args": args.server_args, "clients": args.clients, "requests": len(results),
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "wall_s": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_s": pct([r["ttft"] for r in results]), "tpot_s": pct(tpots) if tpots else None,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

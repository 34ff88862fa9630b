"""Start `pdmix serve` as a real subprocess on a free loopback port, and talk to it."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, api_key: str | None):
        self.proc, self.port, self.api_key = proc, port, api_key
        self.base_url = f"http://127.0.0.1:{port}"

    def client(self, **kw):
        from openai import OpenAI
        kw = {"api_key": self.api_key or "unused", "max_retries": 0, "timeout": 120, **kw}
        return OpenAI(base_url=self.base_url + "/v1", **kw)

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict | str]:
        """One plain HTTP request (for bodies the openai client would refuse to send)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(headers or {})
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={k: v for k, v in h.items() if v is not None})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by name (with labels), e.g. m['pdmix_kv_blocks_used']."""
        status, text = self.raw("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@contextmanager
def serve(model, *flags, api_key: str | None = None, startup_s: float = 120, launcher=None, env=None):
    port = free_port()
    cmd = [*(launcher or [sys.executable]), "-m", "pdmix", "serve", str(model), "--port", str(port), "--device", "cpu",
           *map(str, flags)] + (["--api-key", api_key] if api_key else [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    server = Server(proc, port, api_key)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pdmix serve exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                if server.raw("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("pdmix serve did not come up")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

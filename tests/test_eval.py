"""`pdmix eval --compare`: each path's perplexity, KL(float || quantized) and top-1 agreement against
the formulas written out here, on logits scored independently by each model."""

import math

import pytest
import torch
import torch.nn.functional as F

from pdmix.evaluate import evaluate, token_windows
from pdmix.runtime.llm import LLM
from test_oracle import FLOAT, ORACLE

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(TEXT)
    return path


def test_compare_reports_kl_top1_and_ppl_per_path(data):
    res = evaluate(ORACLE, data, ctx=48, max_windows=3, compare=FLOAT, agreement_prompts=0, quiet=True)
    quant, ref = LLM(ORACLE, max_input_length=128), LLM(FLOAT, max_input_length=128)
    windows = token_windows(quant.tokenizer, data, 48, 3)
    # static: a window's first token is prefill, as a decode step always has one before it
    for mode, rows, path in (("dynamic", lambda n: n, "dynamic"), ("static", lambda n: 1, "pdmix"),
                             ("pdmix", lambda n: n // 2, "pdmix")):
        nll = base_nll = kl = top1 = n = 0.0
        for w in windows:
            q = torch.log_softmax(quant.score(w, rows(len(w)), path)[:-1].float(), -1)
            f = torch.log_softmax(ref.score(w, 0, "pdmix")[:-1].float(), -1)
            target = torch.tensor(w[1:])
            nll += F.nll_loss(q, target, reduction="sum").item()
            base_nll += F.nll_loss(f, target, reduction="sum").item()
            kl += F.kl_div(q, f, log_target=True, reduction="sum").item()
            top1 += (q.argmax(-1) == f.argmax(-1)).sum().item()
            n += len(target)
        c = res["compare"]
        assert res["ppl"][mode] == pytest.approx(math.exp(nll / n), rel=1e-6)
        assert c["float_ppl"] == pytest.approx(math.exp(base_nll / n), rel=1e-6)
        assert c["delta"][mode] == pytest.approx(math.exp((nll - base_nll) / n) - 1, abs=1e-6)
        assert c["kl"][mode] == pytest.approx(kl / n, rel=1e-5, abs=1e-9)
        assert c["top1"][mode] == top1 / n
        assert c["kl"][mode] > 0  # a quantized path differs from float


def test_a_model_compared_with_itself_has_no_divergence(data):
    res = evaluate(FLOAT, data, ctx=48, max_windows=2, compare=FLOAT, agreement_prompts=0, quiet=True)
    assert res["compare"]["kl"] == {"float": 0.0}
    assert res["compare"]["top1"] == {"float": 1.0}
    assert res["compare"]["delta"] == {"float": 0.0}

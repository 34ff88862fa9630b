"""Every recipe's output passes `pdmix inspect`, and the runtime computes on it the perplexity that
the SPEC §5 reference arithmetic gives (issue 5)."""

import math

import pytest
import torch

from pdmix import LLM
from pdmix.format.inspect import inspect_checkpoint
from pdmix.quant.config import QuantConfig
from pdmix.quant.pipeline import quantize
from spec_reference import Reference, assert_close

IDS = [(7 * i * i + 3 * i + 11) % 256 for i in range(48)]


def ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


@pytest.mark.parametrize("anti", ["none", "smooth", "m4"])
@pytest.mark.parametrize("observer,level", [("minmax", "L2"), ("mse", "auto:5")])
def test_recipe_output_inspects_and_matches_reference(tiny_models, small_calib, tmp_path, anti, observer, level):
    out = quantize(tiny_models("qwen2"), tmp_path / "out",
                   QuantConfig(anti_method=anti, observer=observer, disable_level=level, calib_file=str(small_calib),
                               quiet=True))
    summary = inspect_checkpoint(out)
    assert summary["quantized_linears"] > 0
    llm, ref = LLM(out), Reference(out)
    for mode, n_dynamic in (("pdmix", 24), ("dynamic", len(IDS)), ("static", 0)):
        got = llm.score(IDS, n_dynamic, mode)
        want = ref.forward(IDS, n_dynamic)
        assert_close(got, want)
        assert abs(ppl(got, IDS) / ppl(want, IDS) - 1) < 2e-3, mode

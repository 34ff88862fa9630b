"""`--static_tokens decode`: static (decode) ranges from the calibration tokens a decode step computes,
every prompt's first left out. Its effect on a checkpoint's input_scale is checked against transformers'
forward in test_quant.py::test_first_layer_static_range_matches_float_model."""

import json

import torch

from pdmix.cli import main
from pdmix.quant.calib_forward import RunningInputQuant
from pdmix.quant.observer import MinMaxObserver
from spec_reference import fake_static


def spec_fake_quant(x: torch.Tensor, mins: list[float], maxs: list[float]) -> torch.Tensor:
    """SPEC §4 in float64 with msModelSlim's minmax range: the mean of the per-prompt extremes."""
    return fake_static(x.double(), sum(mins) / len(mins), sum(maxs) / len(maxs))


def test_first_row_of_each_prompt_is_neither_observed_nor_quantized():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7]  # a one-token prompt has nothing for the observer
    x = torch.randn(sum(lengths), 16, generator=g)
    x[0, 3], x[6, 2] = 400.0, -300.0  # first rows: attention-sink outliers
    quant = RunningInputQuant(MinMaxObserver(), torch.float32, lambda t: t.split(lengths), skip_first=True)
    y = quant(x)
    seen_min, seen_max = [], []
    for rows, out in zip(x.split(lengths), y.split(lengths)):
        assert torch.equal(out[0], rows[0])  # prefill's row: as it came
        if len(rows) > 1:
            seen_min.append(rows[1:].min().item())
            seen_max.append(rows[1:].max().item())
            # the rest through the static quantizer with the ranges observed so far, this prompt's included
            torch.testing.assert_close(out[1:].double(), spec_fake_quant(rows[1:], seen_min, seen_max),
                                       rtol=0, atol=1e-5)
    obs = quant.observer
    assert [m.item() for m in obs.mins] == seen_min and [m.item() for m in obs.maxs] == seen_max
    assert max(seen_max) < 10  # the outliers never reached the observer


def test_default_observes_and_quantizes_every_row():
    lengths = [4, 3]
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    y = RunningInputQuant(MinMaxObserver(), torch.float32, lambda t: t.split(lengths))(x)
    first = x[:4]
    torch.testing.assert_close(y[:4].double(), spec_fake_quant(first, [first.min().item()], [first.max().item()]),
                               rtol=0, atol=1e-5)


def run(args, capsys):
    rc = main(["quant", *map(str, args), "--quiet"])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_bad_value(tiny_models, small_calib, tmp_path, capsys):
    save = tmp_path / "o"
    rc, err = run(["--model_path", tiny_models("llama", layers=3), "--save_path", save, "--calib_file", small_calib,
                   "--static_tokens", "first"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("pdmix: error: --static_tokens first"), err
    assert not save.exists() or not any(save.iterdir())


def test_decode_needs_a_prompt_longer_than_one_token(tiny_models, tmp_path, capsys):
    from transformers import AutoTokenizer
    src = tiny_models("llama", layers=3)
    tok = AutoTokenizer.from_pretrained(src)
    word = next(w for w in ("a", "x", "7", "!") if len(tok(w)["input_ids"]) == 1)
    calib = tmp_path / "one.jsonl"
    calib.write_text(json.dumps({"inputs_pretokenized": word}) + "\n")
    save = tmp_path / "o"
    rc, err = run(["--model_path", src, "--save_path", save, "--calib_file", calib, "--static_tokens", "decode"],
                  capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("pdmix: error: --static_tokens decode"), err
    assert "one token" in err[0]
    assert not save.exists() or not any(save.iterdir())
    # the same prompt is enough for msModelSlim's setting
    rc, err = run(["--model_path", src, "--save_path", save, "--calib_file", calib], capsys)
    assert rc == 0, err

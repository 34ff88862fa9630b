"""Static activation observers, each against an independent numpy computation of SPEC §4."""

import numpy as np
import pytest
import torch

from pdmix.kernels.reference import quantize_static
from pdmix.quant.observer import (OBSERVERS, MinMaxObserver, MSEObserver, PercentileObserver, fake_quant_static,
                                  make_observer, quantile)

EPS = np.finfo(np.float32).eps


def forwards(seed, sizes=((37, 64), (20, 64), (51, 64)), spike=0.0):
    """Per-forward linear inputs: normal values; with a spike, one value +spike in the first forward and
    one -spike in the second (rare outliers that drag the min/max range far from the bulk)."""
    rng = np.random.default_rng(seed)
    xs = [torch.from_numpy(rng.standard_normal(size).astype(np.float32)) for size in sizes]
    if spike:
        for x, v in zip(xs, (spike, -spike)):
            x[0, 0] = v
    return xs


def observe(obs, xs):
    for x in xs:
        obs.update(x)
    return obs


def spec_params(mn: float, mx: float) -> tuple[float, float]:
    """SPEC §4, in float64: range clamped to include 0, scale = (mx - mn) / 255, integer offset."""
    mn, mx = min(mn, 0.0), max(mx, 0.0)
    scale = max((mx - mn) / 255, EPS)
    return scale, -128 - np.round(mn / scale)


def fake_quant_mse(x: np.ndarray, scale: float, offset: float) -> float:
    q = np.clip(np.round(x / scale + offset), -128, 127)
    return float(np.mean(((q - offset) * scale - x) ** 2))


def assert_params(got, scale, offset):
    s, o = got
    assert s.shape == (1,) and o.shape == (1,)
    assert s.item() == pytest.approx(scale, rel=1e-5)
    assert abs(o.item() - offset) <= 1  # the offset may round the other way at a .5 boundary


def test_registry():
    assert set(OBSERVERS) == {"minmax", "percentile", "mse"}
    for name, cls in OBSERVERS.items():
        assert isinstance(make_observer(name), cls)


def test_minmax_is_the_mean_of_per_forward_extremes():
    xs = forwards(0)
    got = observe(MinMaxObserver(), xs).params(torch.float32)
    mn = np.mean([x.numpy().min() for x in xs])
    mx = np.mean([x.numpy().max() for x in xs])
    assert_params(got, *spec_params(mn, mx))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("q", [0.0, 1e-4, 0.01, 0.5, 0.9999, 1.0])
def test_quantile_matches_numpy(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert quantile(x, q).item() == pytest.approx(np.quantile(x.numpy().astype(np.float64), q), rel=1e-6, abs=1e-6)


def test_quantile_beyond_torch_quantile_limit():
    x = torch.zeros(2 ** 24 + 10)
    x[-3:] = torch.tensor([5.0, 6.0, 7.0])
    assert quantile(x, 1.0).item() == 7.0
    assert quantile(x, 0.5).item() == 0.0


@pytest.mark.parametrize("q", [1e-4, 0.01])
def test_percentile_averages_per_forward_quantiles(q):
    xs = forwards(1, sizes=((400, 64), (250, 64)), spike=50.0)
    got = observe(PercentileObserver(q), xs).params(torch.float32)
    mn = np.mean([np.quantile(x.numpy().astype(np.float64), q) for x in xs])
    mx = np.mean([np.quantile(x.numpy().astype(np.float64), 1 - q) for x in xs])
    assert_params(got, *spec_params(mn, mx))


def test_percentile_clips_outliers_minmax_keeps():
    xs = forwards(2, sizes=((400, 64),), spike=50.0)
    clipped = observe(PercentileObserver(1e-4), xs).params(torch.float32)[0]
    assert clipped < observe(MinMaxObserver(), xs).params(torch.float32)[0] / 4


def brute_force_mse(xs, grid):
    """The grid point c minimising the fake-quant MSE of range c * (mean min, mean max), all values."""
    values = np.concatenate([x.numpy().ravel() for x in xs]).astype(np.float64)
    mn = np.mean([x.numpy().min() for x in xs])
    mx = np.mean([x.numpy().max() for x in xs])
    errs = [fake_quant_mse(values, *spec_params(c * mn, c * mx)) for c in grid]
    best = int(np.argmin(errs))
    return grid[best], errs[best], values, (mn, mx)


def test_mse_finds_the_brute_force_minimum():
    xs = forwards(3, sizes=((8000, 64), (8000, 64)), spike=60.0)
    obs = observe(MSEObserver(max_samples=8000 * 64), xs)  # keeps every value: the brute force sees the same
    scale, offset = obs.params(torch.float32)
    grid = [i / 100 for i in range(100, 0, -1)]
    c, best_err, values, (mn, mx) = brute_force_mse(xs, grid)
    assert c < 0.8  # clipping the spikes pays
    assert fake_quant_mse(values, scale.item(), offset.item()) <= best_err * (1 + 1e-4)
    assert_params((scale, offset), *spec_params(c * mn, c * mx))


def test_mse_without_outliers_keeps_most_of_the_range():
    xs = forwards(4)
    scale, _ = observe(MSEObserver(), xs).params(torch.float32)
    c, *_ = brute_force_mse(xs, [i / 100 for i in range(100, 0, -1)])
    minmax_scale, _ = observe(MinMaxObserver(), xs).params(torch.float32)
    assert scale.item() == pytest.approx(c * minmax_scale.item(), rel=1e-4)
    assert c > 0.5


def test_fake_quant_is_the_static_kernel_and_back():
    x = torch.randn(10000) * 3
    scale, offset = torch.tensor([0.02], dtype=torch.bfloat16), torch.tensor([-7.0], dtype=torch.bfloat16)
    expect = (quantize_static(x, scale, offset).float() - offset.float()) * scale.float()
    assert torch.equal(fake_quant_static(x, scale, offset), expect)


def test_mse_memory_is_bounded_and_range_exact():
    x = torch.randn(1000, 100, dtype=torch.bfloat16)
    x[3, 4], x[900, 99] = 500, -700
    obs = MSEObserver(max_samples=4096)
    obs.update(x)
    assert obs.samples[0].numel() == 4096
    assert obs.maxs[0].item() == 500 and obs.mins[0].item() == -700


def test_bf16_params_are_model_dtype():
    for name in OBSERVERS:
        s, o = observe(make_observer(name), [x.to(torch.bfloat16) for x in forwards(5)]).params(torch.bfloat16)
        assert s.dtype == o.dtype == torch.bfloat16
        assert o.item() == round(o.item()) and -128 <= o.item() <= 127

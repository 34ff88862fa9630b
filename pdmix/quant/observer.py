"""Static activation-range observers (`--observer`): each sees a linear's input once per
calibration forward and turns what it saw into (input_scale, input_offset) per SPEC §4."""

import torch

from pdmix.quant.arithmetic import static_activation_params


class MinMaxObserver:
    """msModelSlim's: the mean over forwards of each forward's min and max (SPEC §4)."""

    def __init__(self):
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []

    def forward_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.min(), x.max()

    def update(self, x: torch.Tensor) -> None:
        mn, mx = self.forward_range(x)
        self.mins.append(mn.reshape(()))
        self.maxs.append(mx.reshape(()))

    def params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return static_activation_params(torch.stack(self.mins), torch.stack(self.maxs), dtype)


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's default ('linear') quantile of all of x. By partial sort from the nearer end: cheap
    for the tails a percentile asks for, and torch.quantile refuses more than 2^24 values."""
    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    h = (n - 1) * q
    lo = int(h)
    hi = min(lo + 1, n - 1)
    if lo < n - 1 - hi:
        smallest = x.topk(hi + 1, largest=False).values  # ascending
        a, b = smallest[lo], smallest[hi]
    else:
        largest = x.topk(n - lo).values  # descending: largest[j] is the (n-1-j)-th smallest
        a, b = largest[n - 1 - lo], largest[n - 1 - hi]
    return a + (h - lo) * (b - a)


class PercentileObserver(MinMaxObserver):
    """Like minmax, with each forward's min and max replaced by its q and 1-q quantiles."""

    def __init__(self, q: float = 1e-4):
        super().__init__()
        self.q = q

    def forward_range(self, x):
        return quantile(x, self.q), quantile(x, 1 - self.q)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x (fp32) through the static path's quantizer (SPEC §5, as kernels.reference.quantize_static)
    and back. Stays in float: an int8 round trip would make the mse search several times slower."""
    scale, offset = scale.float(), offset.float()
    return (torch.round(x / scale + offset).clamp_(-128, 127) - offset) * scale


class MSEObserver(MinMaxObserver):
    """The minmax range shrunk by the factor c in GRID that minimises the mean squared static
    fake-quant error over the calibration activations.

    Memory is bounded: each forward keeps its exact min and max (the range, as minmax) and at most
    `max_samples` of its values, drawn at random, for the error. The extremes are not added to the
    sample: that would weight them far above their frequency and bias the search against clipping.
    """

    GRID = tuple(i / 100 for i in range(100, 0, -1))  # c = 1.00, 0.99, ..., 0.01; ties go to the larger c

    def __init__(self, max_samples: int = 32768, seed: int = 0):
        super().__init__()
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x):
        super().update(x)
        flat = x.reshape(-1)
        if flat.numel() > self.max_samples:
            flat = flat[torch.randint(flat.numel(), (self.max_samples,), generator=self.gen)]
        self.samples.append(flat.to(torch.float32))

    def params(self, dtype):
        x = torch.cat(self.samples)
        mins, maxs = torch.stack(self.mins), torch.stack(self.maxs)
        best, best_err = None, float("inf")
        for c in self.GRID:
            scale, offset = static_activation_params(mins * c, maxs * c, dtype)
            err = (fake_quant_static(x, scale, offset) - x).pow(2).mean().item()
            if err < best_err:
                best, best_err = (scale, offset), err
        return best


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(name: str):
    return OBSERVERS[name]()

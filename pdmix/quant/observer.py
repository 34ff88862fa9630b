"""Static activation-range observers (`--observer`): each sees a linear's input once per
calibration forward and turns what it saw into (input_scale, input_offset) per SPEC §4."""

import torch

from pdmix.quant.arithmetic import static_activation_params


class MinMaxObserver:
    """msModelSlim's: the mean over forwards of each forward's min and max (SPEC §4)."""

    def __init__(self):
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.mins.append(x.min().reshape(()))
        self.maxs.append(x.max().reshape(()))

    def params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return static_activation_params(torch.stack(self.mins), torch.stack(self.maxs), dtype)


OBSERVERS = {"minmax": MinMaxObserver}


def make_observer(name: str):
    return OBSERVERS[name]()

"""Outlier suppression (`--anti_method`), applied to one float decoder layer before it is observed.

A method gets the layer's float tensors (full HF names) and per-channel statistics of each
linear input group, measured on the calibration set, and returns the tensors of a layer that
computes the same function with flatter activations: scales folded into the preceding norm or
linear, shifts folded into norm and linear biases (the FLOAT tensors of SPEC §6).
"""

from dataclasses import dataclass

import torch

from pdmix.quant.smooth import m4, smooth


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one linear-input group over all calibration tokens (fp32 [k])."""
    min: torch.Tensor
    max: torch.Tensor

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        torch.minimum(self.min, x.amin(0), out=self.min)
        torch.maximum(self.max, x.amax(0), out=self.max)

    @classmethod
    def empty(cls, k: int) -> "ChannelStats":
        return cls(torch.full((k,), float("inf")), torch.full((k,), float("-inf")))


def no_anti_outlier(cfg, layer_idx: int, tensors: dict[str, torch.Tensor], stats: dict[str, ChannelStats],
                    alpha: float) -> dict[str, torch.Tensor]:
    return tensors


METHODS = {"none": no_anti_outlier, "smooth": smooth, "m4": m4}


def anti_outlier(method: str, cfg, layer_idx, tensors, stats, alpha) -> dict[str, torch.Tensor]:
    return METHODS[method](cfg, layer_idx, tensors, stats, alpha)

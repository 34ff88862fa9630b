"""`--w_method gptq`: GPTQ weight rounding (Frantar et al. 2022) into the same per-output-channel
symmetric int8 weights that minmax writes (SPEC §4), so the checkpoint is an ordinary W8A8_MIX one.

minmax rounds every weight to its nearest int8 level. GPTQ rounds one input column at a time and
moves each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = sum x x^T of the inputs the linear sees on the calibration prompts, so that the layer's output
on those inputs, not the weight itself, stays close. The weight scale is minmax's (max|w| / 127 per
output channel), so only the int8 values differ from a minmax checkpoint.

As msModelSlim's GPTQ (msmodelslim/core/quantizer/impl/gptq.py): 1% dampening, blocks of 128
columns. Unlike it: fp32 arithmetic (its runs in the model dtype), columns in decreasing order of
H's diagonal (act-order; free here, the scale being per output channel), and columns no
calibration input reaches are rounded to nearest rather than zeroed.
"""

import torch

from pdmix.quant.arithmetic import weight_scale

W_METHODS = ("minmax", "gptq")
BLOCK = 128   # columns per lazy-update block (the GPTQ paper's and msModelSlim's)
DAMP = 0.01   # dampening: this fraction of the mean Hessian diagonal is added to it


class Hessians:
    """sum x x^T (fp32 [k, k], on the inputs' device) of each linear group's inputs: one forward
    collects them for every group of a layer that has a linear to round."""

    def __init__(self, groups):
        self.groups = set(groups)
        self.h: dict = {}

    def update(self, group, x: torch.Tensor) -> None:
        if group in self.groups:
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if group not in self.h:
                self.h[group] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.h[group].addmm_(x.T, x)

    def round(self, group, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight [n, k], weight_scale [n, 1] in w's dtype) for float weight w [n, k], on the CPU."""
        h = self.h[group]
        scale = weight_scale(w)
        q = gptq_round(w.to(h.device, torch.float32), h, scale.to(h.device, torch.float32))
        return q.cpu(), scale


def inverse_hessian_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening, which is done in place on h (a copy): never-seen
    inputs (zero diagonal) get a unit diagonal, then DAMP x the mean diagonal is added (raised until H
    is positive definite)."""
    diag = h.diagonal()
    diag[diag == 0] = 1
    mean, added = diag.mean(), 0.0
    for damp in (DAMP, 0.1, 1.0, 10.0):
        diag += (damp - added) * mean
        added = damp
        l, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise ValueError("the calibration inputs' Hessian is not positive definite even after dampening")


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Round w [n, k] (fp32) to the int8 levels of the per-row scale [n, 1] by GPTQ under Hessian h [k, k]:
    columns in decreasing order of h's diagonal (act-order), in blocks with lazy updates. int8 [n, k]."""
    w = w.to(torch.float32).clone()
    perm = torch.argsort(h.diagonal(), descending=True)
    w = w[:, perm]
    u = inverse_hessian_factor(h[perm][:, perm])
    q = torch.empty_like(w)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j:j + 1]
            qc = (col / scale).round_().clamp_(-127, 127)  # half-to-even, as minmax
            q[:, i1 + j:i1 + j + 1] = qc
            e = (col - qc * scale) / u1[j, j]
            w1[:, j:] -= e * u1[j:j + 1, j:]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)

"""`--w_method gptq`: GPTQ weight rounding (Frantar et al. 2022) into the same per-output-channel
symmetric int8 weights that minmax writes (SPEC §4), so the checkpoint is an ordinary W8A8_MIX one.

minmax rounds every weight to its nearest int8 level. GPTQ rounds one input column at a time and
moves each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = sum x x^T of the inputs the linear sees on the calibration prompts, so that the layer's output
on those inputs, not the weight itself, stays close. The weight scale is minmax's (max|w| / 127 per
output channel) of the weight being rounded.

Static input quantization: a W8A8_MIX linear sees its input as is (up to per-token rounding) on
prompt rows and through the static per-tensor quantizer on decode rows. With share `static_share` of
the objective on static rows, GPTQ minimises

    (1 - a) ||W X - Q X||^2 + a ||W X - Q fq(X)||^2,    a = static_share, fq = static fake-quant,

i.e. GPTQ of the least-squares target W' = W C H^-1 under H = (1 - a) X X^T + a fq(X) fq(X)^T,
C = (1 - a) X X^T + a X fq(X)^T: the weight absorbs part of the static quantizer's systematic error.
a = 0 is plain GPTQ.
"""

import torch

from pdmix.quant.arithmetic import weight_scale
from pdmix.quant.observer import fake_quant_static

W_METHODS = ("minmax", "gptq")
BLOCK = 128          # columns per lazy-update block (the GPTQ paper's)
DAMP = 0.01          # dampening: this fraction of the mean Hessian diagonal is added to it
STATIC_SHARE = 0.0   # share of the objective on statically quantized inputs (see the module doc; measured)


class InputMoments:
    """sum x x^T over the calibration inputs of one linear group, and with static input quantization
    the cross term sum x fq(x)^T and sum fq(x) fq(x)^T (fp32 [k, k] each, on the inputs' device)."""

    def __init__(self, k: int, device, static: tuple[torch.Tensor, torch.Tensor] | None, static_share: float):
        self.static, self.a = static, static_share if static is not None else 0.0
        self.xx = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.xq = torch.zeros_like(self.xx) if self.a else None
        self.qq = torch.zeros_like(self.xx) if self.a else None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xx.addmm_(x.T, x)
        if self.a:
            q = fake_quant_static(x, *self.static)
            self.xq.addmm_(x.T, q)
            self.qq.addmm_(q.T, q)
        self.rows += x.shape[0]

    def hessian_and_target(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W') for weight w [n, k]: the Hessian GPTQ rounds under, and the weight it rounds toward."""
        w = w.to(self.xx.device, torch.float32)
        if not self.a:
            return self.xx, w
        a = self.a
        h = (1 - a) * self.xx + a * self.qq
        c = (1 - a) * self.xx + a * self.xq
        # W' = W C H^-1  <=>  H W'^T = C^T W^T (H symmetric, dampened as GPTQ's)
        target = torch.cholesky_solve(c.T @ w.T, torch.linalg.cholesky(damped(h))).T
        return h, target


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I, with never-seen inputs (zero diagonal) given a unit diagonal."""
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1
    diag += damp * diag.mean()
    return h


def inverse_hessian_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, after dampening (raised until H is positive definite)."""
    for damp in (DAMP, 0.1, 1.0, 10.0):
        l, info = torch.linalg.cholesky_ex(damped(h, damp))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise ValueError("the calibration inputs' Hessian is not positive definite even after dampening")


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Round w [n, k] (fp32) to int8 levels of the per-row scale [n, 1] by GPTQ under Hessian h [k, k]:
    columns in decreasing order of h's diagonal (act-order), in blocks with lazy updates. int8 [n, k]."""
    w = w.to(torch.float32).clone()
    perm = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h)
    s = scale.to(w.device, torch.float32)
    q = torch.empty_like(w)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j:j + 1]
            qc = (col / s).round_().clamp_(-127, 127)
            q[:, i1 + j:i1 + j + 1] = qc
            e = (col - qc * s) / u1[j, j]
            w1[:, j:] -= e * u1[j:j + 1, j:]
            err[:, j:j + 1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)


def gptq_weight(w: torch.Tensor, moments: InputMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [n, k], weight_scale [n, 1] in w's dtype) for float weight w, on the CPU."""
    h, target = moments.hessian_and_target(w)
    scale = weight_scale(target.to(w.dtype))
    q = gptq_round(target, h, scale.to(torch.float32))
    return q.cpu(), scale.cpu()


def collect_moments(layer, run, observe_inputs, groups, static_params: dict, static_share: float | None = None):
    """One calibration forward of `layer` (run(layer)) collecting InputMoments of each input group in
    `groups`; static_params[group] = (input_scale, input_offset) of its static quantizer."""
    moments = {}
    share = STATIC_SHARE if static_share is None else static_share

    def on_input(g, x):
        if g in groups:
            if g not in moments:
                moments[g] = InputMoments(x.shape[-1], x.device, static_params[g], share)
            moments[g].update(x)
    hooks = observe_inputs(layer, on_input)
    run(layer)
    for h in hooks:
        h.remove()
    return moments

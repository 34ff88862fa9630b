"""The lm_head's two run-time forms (the choice is validated in pdmix/params.py).

`float` (the default): the checkpoint's weight in the model dtype, logits as Hugging Face computes
them, so greedy outputs stay exact per SPEC §7.

`int8` (`--lm_head int8`, `LLM(lm_head="int8")`): a speed option, chosen at load and never written
into a checkpoint (`Int8Head`). At decode the lm_head is the largest single weight a step reads
(SmolLM2: 49152 x 576, 57 MB in bf16, a third of the step's bytes); int8 halves it. The logits come
out in fp32. Rows stay independent (exact int32 block sums, a fixed order for the rest), so batch
invariance holds; the logits are not the float head's, so greedy outputs may differ from the exact
path's (its tests compare it with its own arithmetic).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pdmix.kernels import arena, reference, s8gemm

BLOCK = 32


class Int8Head(nn.Module):
    """Logits from the int8 lm_head: weight and activations quantized in blocks of BLOCK along the
    hidden dimension, each block with its own fp32 scale (absmax / 127), as llama.cpp's Q8_0 does.
    Per-channel weights with per-token activations cost SmolLM2 +0.9% perplexity (+0.24% for the
    weight alone); blocks of 32 keep the outlier channels of the final hidden state from setting
    the step size of the whole row."""

    def __init__(self, weight: torch.Tensor, rows_per_chunk: int = 4096):
        super().__init__()
        n, k = weight.shape
        self.pad = -k % BLOCK
        q, d = arena.empty((n, k + self.pad), torch.int8), arena.empty((n, (k + self.pad) // BLOCK), torch.float32)
        for r in range(0, n, rows_per_chunk):  # bounded fp32 temporaries
            q[r:r + rows_per_chunk], d[r:r + rows_per_chunk] = quantize_blocks(self.padded(weight[r:r + rows_per_chunk].cpu()))
        self.register_buffer("weight", q.to(weight.device))
        self.register_buffer("scales", d.to(weight.device))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.pad)) if self.pad else x

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x_q, x_scales = quantize_blocks(self.padded(hidden))
        if hidden.device.type == "cpu" and s8gemm.library()[0] is not None:
            return s8gemm.q8_0_gemm(x_q, x_scales, self.weight, self.scales)
        return blocks_matmul(x_q, x_scales, self.weight, self.scales)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [r, k] -> (int8 codes [r, k], fp32 scales [r, k / BLOCK]): SPEC §5's per-token quantization
    (round(x / s), s = max|x| / 127) with each block of BLOCK as a token."""
    q, s = reference.quantize_dynamic(x.reshape(-1, BLOCK))
    return q.reshape(x.shape), s.reshape(x.shape[0], -1)


def blocks_matmul(x_q, x_scales, weight, w_scales, rows_per_chunk: int = 8) -> torch.Tensor:
    """The same sum in torch, where the C library is not (no compiler, or a GPU): each block's dot
    product in fp32 is exact (|sum| <= 32 * 127^2 < 2^24), then the scaled blocks are summed."""
    m, (n, k) = x_q.shape[0], weight.shape
    w = weight.to(torch.float32).reshape(n, -1, BLOCK)
    out = []
    for r in range(0, m, rows_per_chunk):
        x = x_q[r:r + rows_per_chunk].to(torch.float32).reshape(-1, k // BLOCK, BLOCK)
        dots = torch.einsum("mbi,nbi->mnb", x, w)
        out.append((dots * (x_scales[r:r + rows_per_chunk, None, :] * w_scales[None])).sum(-1))
    return torch.cat(out) if out else x_q.new_empty((0, n), dtype=torch.float32)

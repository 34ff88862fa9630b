"""The whole causal LM: embeddings, decoder layers, final norm, lm_head.

A forward runs the rows of every sequence of a step flattened into one [T] batch; attention is
injected (`attn(layer, q, k, v)`) and `split` says which rows take which W8A8 path.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pdmix.models.config import ModelConfig
from pdmix.models.layers import DecoderLayer, RMSNorm, Rotary
from pdmix.models.lm_head import Int8Head
from pdmix.models.linear import RowSplit, float_gemm


def run_layers(layers, norm, x, cos, sin, attn, split):
    """The decoder stack and the final norm (eager; the runtime may swap in a compiled form)."""
    for layer in layers:
        x = layer(x, cos, sin, attn, split)
    return norm(x)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        # tied embeddings share one tensor
        self.lm_head = self.embed_tokens if lm_head is embed else nn.Parameter(lm_head, requires_grad=False)
        self.head_int8 = None  # the int8 form of lm_head, when chosen (pdmix/models/lm_head.py)
        self.rotary = Rotary(cfg, embed.device)
        self.decoder = run_layers
        self.decode_stack = None  # the runtime's decode-only steps in one C call, where it fits (runtime/decode_block.py)

    def use_int8_head(self) -> None:
        """Compute logits with an int8 lm_head (built here, on the weight's device); an untied float
        lm_head is let go."""
        self.head_int8 = Int8Head(self.lm_head.detach())
        if self.lm_head is not self.embed_tokens:
            self.lm_head = None

    def to(self, device):
        self.rotary.to(device)
        return super().to(device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, split: RowSplit | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (after the last norm)."""
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary(positions)
        stack = self.decode_stack and getattr(attn, "run_decode_stack", None)
        out = stack and stack(self.decode_stack, x, cos, sin, split)
        if out is not None:  # the same bits as the decoder's layers
            return self.norm(out)
        return self.decoder(self.layers, self.norm, x, cos, sin, attn, split)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of some rows, computed in the model dtype as Hugging Face does (bf16 on CPU in
        C, the same for a row alone or in any batch: linear.float_gemm), or by the int8 lm_head."""
        if self.head_int8 is not None:
            return self.head_int8(hidden)
        return float_gemm(hidden, self.lm_head, None).float()

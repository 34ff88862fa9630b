"""The calibration forward of one decoder layer, as msModelSlim's Calibrator runs it (SPEC §4).

msModelSlim calibrates with the whole model fake-quantized, one prompt after another: each quantized
linear's weight is its int8 weight times weight_scale, and its input, once the observer has seen the
prompt's rows, goes through the static quantizer with the range observed so far (the mean of the
prompts' minima and maxima up to this one). So a linear sees inputs shaped by every quantized linear
upstream of it, in earlier layers and in its own (o_proj after q/k/v, the MLP after attention,
down_proj after gate/up), and early prompts with ranges of fewer prompts. Running the same forward
layer by layer gives the same activations: a prompt's rows at a layer depend only on the prompts
before it, never on later ones. Deeper layers' input_scale then land within 2% of msModelSlim's
(tests/test_oracle.py), where a float forward of the current layer was 5% off.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pdmix.quant.observer import MinMaxObserver

# --static_tokens: which calibration tokens set the static (decode) ranges -> skip each prompt's first?
STATIC_TOKENS = {"all": False, "decode": True}  # all: msModelSlim's; decode: the tokens a decode step computes


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """msModelSlim's fake_quantize of an input, in x's dtype (bf16 division and all, as it computes it)."""
    s, o = scale.to(x.dtype), offset.to(x.dtype)
    return ((x / s + o).round().clamp(-128, 127) - o) * s


class RunningInputQuant:
    """One static linear group's input quantizer during calibration. `prompts(x)` splits a chunk's rows
    into its prompts; `observer` (the configured one) and a running min-max see each prompt's rows in
    order, and the rows are fake-quantized with the min-max parameters so far (msModelSlim's act_method 1
    calibration mode, no QDrop). on_input(x) sees each chunk's float input once (GPTQ's Hessian).

    skip_first=True (`--static_tokens decode`): each prompt's first row is neither observed nor
    quantized. A decode step never computes a sequence's first token (prefill always has), and that
    token is the attention sink, whose inputs to some linears are hundreds of times everyone else's."""

    def __init__(self, observer, dtype: torch.dtype, prompts, on_input=None, skip_first: bool = False):
        self.observer, self.dtype, self.prompts, self.on_input = observer, dtype, prompts, on_input
        self.skip = int(skip_first)
        self.running = observer if type(observer) is MinMaxObserver else MinMaxObserver()
        # the last call (key, output, input): the group's linears share one input
        self.last: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        """What makes two calls see the same input: the same memory, shape and strides, unmodified since
        (a view or another tensor object of the same rows counts once; `last` keeps the memory alive,
        so no other tensor can take its place)."""
        return x.data_ptr(), x.shape, x.stride(), x._version, x.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.last is not None and self.last[0] == self.key(x):
            return self.last[1]
        out = []
        for rows in self.prompts(x):
            first, rest = rows[:self.skip], rows[self.skip:]
            if len(rest):  # a one-token prompt has none after its first
                self.observer.update(rest)
                if self.running is not self.observer:
                    self.running.update(rest)
                rest = fake_quant(rest, *self.running.params(self.dtype))
            out += [first, rest]
        if self.on_input is not None:
            self.on_input(x)
        self.last = (self.key(x), torch.cat(out), x)
        return self.last[1]


def fake_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """msModelSlim's calibration-time weight: w / weight_scale rounded, clamped to [-128, 127], times
    weight_scale, in w's dtype. Not exactly the saved int8 weight times its scale: in bf16 a row's
    largest weight can divide to 128 and, when negative, stays -128 here, where the saved weight has
    -127 (SPEC §4)."""
    return (w / scale).round().clamp(-128, 127) * scale


class FakeQuantLinear(nn.Module):
    """A static (W8A8_MIX) linear during calibration: F.linear of the fake-quantized input and the
    fake-quantized weight (model dtype)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: RunningInputQuant):
        super().__init__()
        self.weight, self.bias, self.quant = weight, None if bias is None else bias.to(weight.dtype), quant

    def forward(self, x: torch.Tensor, split=None) -> torch.Tensor:
        return F.linear(self.quant(x), self.weight, self.bias)

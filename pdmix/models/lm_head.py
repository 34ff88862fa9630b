"""The lm_head's two run-time forms.

`float` (the default): the checkpoint's weight in the model dtype, logits as Hugging Face computes
them, so greedy outputs stay exact per SPEC §7.

`int8` (`--lm_head int8`, `LLM(lm_head="int8")`): a speed option, chosen at load and never written
into a checkpoint. The weight is quantized per output channel (SPEC §4's weight quantization) and
each row's activation per token, as W8A8_DYNAMIC does (docs/moe.md), through the same kernel
backends; the logits come out in fp32. At decode the lm_head is the largest single weight a step
reads (SmolLM2: 49152 x 576, 57 MB in bf16, a third of the step's bytes); int8 halves it. Rows stay
independent (exact int32 accumulators, per-row scales), so batch invariance holds.
"""

from pdmix.errors import PdmixError

CHOICES = ("float", "int8")  # light to import: the CLIs build their flags from these
HELP = ("the lm_head's form: float (the model dtype, exact) or int8 (per-channel int8 weight, per-token "
        "int8 activation; faster decode, a small perplexity cost; never written into a checkpoint)")


def check_choice(lm_head: str, flag: str = "--lm_head") -> None:
    if lm_head not in CHOICES:
        raise PdmixError(f"{flag} {lm_head!r}: choose from {', '.join(CHOICES)}")


def int8_head(weight, backend: str | None = None):
    """A ready int8 lm_head (a W8A8DynamicLinear): per-channel int8 weight, per-token int8
    activations, fp32 logits."""
    import torch

    from pdmix.models.linear import W8A8DynamicLinear
    from pdmix.schemes import w8a8_dynamic
    tensors = w8a8_dynamic.quantize(weight.cpu())
    head = W8A8DynamicLinear.from_tensors(tensors, torch.float32, "lm_head", backend=backend).to(weight.device)
    head.prepare()
    return head

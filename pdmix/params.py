"""Type and range checks of parameters (command-line flags, SamplingParams, LLM arguments); each
failure is a PdmixError naming the parameter."""

import math

from pdmix.errors import PdmixError


def whole(name: str, v, lo: int, hi: int | None = None) -> int:
    """An int (not a bool, not 2.5) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise PdmixError(f"{name} must be a whole number, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise PdmixError(f"{name} must be {f'in [{lo}, {hi}]' if hi is not None else f'at least {lo}'}, got {v}")
    return v


def number(name: str, v, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite real number in the interval (open or closed at each end)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PdmixError(f"{name} must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise PdmixError(f"{name} must be in {interval}, got {v}")
    return float(v)


def boolean(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise PdmixError(f"{name} must be True or False, got {v!r}")
    return v


LM_HEADS = ("float", "int8")  # pdmix/models/lm_head.py
LM_HEAD_HELP = ("the lm_head's form: float (the model dtype, exact) or int8 (weight and activations in int8 blocks of "
                "32 with their own scales, as llama.cpp's Q8_0; faster decode for a small perplexity cost; never "
                "written into a checkpoint)")


DTYPES = ("auto", "float32")  # the activations' dtype at run time (models/config.py with_dtype)
DTYPE_HELP = ("the activations' dtype: auto (the checkpoint's, as MindIE and vLLM compute it) or float32 (float "
              "weights widened exactly; every activation, epilogue and the KV cache in fp32, as llama.cpp computes: "
              "the quantization's own error without bf16 rounding; slower)")


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise PdmixError(f"{flag} {dtype!r}: choose from {', '.join(DTYPES)}")


def check_lm_head(lm_head: str, flag: str = "--lm_head") -> None:
    if lm_head not in LM_HEADS:
        raise PdmixError(f"{flag} {lm_head!r}: choose from {', '.join(LM_HEADS)}")

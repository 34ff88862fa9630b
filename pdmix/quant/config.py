"""Quantization settings (torchao-style dataclass) and the named recipes that `--model_type` selects."""

import math
import re
from dataclasses import dataclass, field, fields, replace

from pdmix.errors import PdmixError
from pdmix.models.arch import is_dynamic_linear, layer_linears


@dataclass
class QuantConfig:
    anti_method: str = "none"       # outlier suppression: none | smooth | m4
    alpha: float = 0.5              # smoothing strength
    observer: str = "minmax"        # static activation range: minmax | percentile | mse
    w_method: str = "minmax"        # weight rounding: minmax (nearest) | gptq
    disable_level: str = "L0"       # Ln: keep the n most sensitive linears float; auto:<pct> by budget
    rollback_score: str = "ratio"   # sensitivity: ratio (max|x|/std, msModelSlim's) | error (measured)
    static_tokens: str = "all"      # static ranges from: all (msModelSlim's) | decode (each prompt's first token left out)
    rotation: str = "none"          # none | quarot (offline Hadamard rotation of the residual stream and values)
    disable_names: tuple[str, ...] = ()
    calib_file: str | None = None   # jsonl; None = the calibration set shipped with pdmix
    calib_max_samples: int = 48
    calib_max_len: int = 512
    part_file_size: float = 4.0     # GB per output shard
    device: str = "cpu"
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Types and ranges of every setting, before any file is read."""
        for name in ("calib_max_samples", "calib_max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PdmixError(f"--{name} {v}: expected a whole number of at least 1")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:  # NaN fails the comparison
            raise PdmixError(f"--alpha {self.alpha}: expected a number in [0, 1]")
        if not isinstance(self.part_file_size, (int, float)) or not 0 < self.part_file_size < math.inf:
            raise PdmixError(f"--part_file_size {self.part_file_size}: expected a positive number of GB")
        if self.rollback_count() is None and not 0 < float(self.disable_level.split(":")[1]) < math.inf:
            raise PdmixError(f"--disable_level {self.disable_level}: the budget must be a positive percentage")

    def check_model(self, cfg) -> None:
        """Settings that depend on the model: the prompt length its positions allow, and a rollback
        that leaves something to quantize."""
        if self.calib_max_len > cfg.max_position_embeddings:
            raise PdmixError(f"--calib_max_len {self.calib_max_len}: the model has max_position_embeddings "
                             f"{cfg.max_position_embeddings}; calibrating past it measures positions it never sees")
        n = self.rollback_count()
        total = sum(not is_dynamic_linear(cfg, p) for i in range(cfg.num_layers) for p, _ in layer_linears(cfg, i))
        if n is not None and n >= total:
            raise PdmixError(f"--disable_level {self.disable_level}: the model has {total} W8A8_MIX linears, so "
                             f"nothing would be quantized; use at most L{total - 1}")

    def rollback_count(self) -> int | None:
        """n of 'Ln', or None for a budget ('auto:<pct>')."""
        m = re.fullmatch(r"[Ll](\d+)", self.disable_level)
        if m:
            return int(m.group(1))
        if re.fullmatch(r"auto:\d+(\.\d+)?", self.disable_level):
            return None
        raise PdmixError(f"--disable_level {self.disable_level}: expected L0..Ln or auto:<pct>")


# msModelSlim's recipe for the seed (SPEC §9): m4 smoothing, alpha 0.5, 10 linears rolled back.
RECIPES = {
    "default": {},
    "Qwen3-14B": dict(anti_method="m4", alpha=0.5, disable_level="L10", calib_max_samples=48),
    # What docs/accuracy.md measured best on SmolLM2 (by KL to the float model): m4, GPTQ-rounded weights,
    # then the fewest linears kept float, ranked by their measured effect on their layer's output, that
    # bring the static path within 1% of float perplexity on the calibration prompts (15 there, 25 by max|x|/std).
    "best": dict(anti_method="m4", alpha=0.5, observer="minmax", w_method="gptq", disable_level="auto:1",
                 rollback_score="error"),
    # msModelSlim's lab_practice/qwen3_moe/qwen3-30b-a3b-w8a8.yaml: m4 (which skips experts), no rollback;
    # the MLP linears' W8A8_DYNAMIC scheme comes with the architecture (docs/moe.md)
    "Qwen3-30B-A3B": dict(anti_method="m4", alpha=0.5, disable_level="L0", calib_max_samples=48),
}


def recipe(model_type: str | None) -> tuple[dict, bool]:
    """(recipe settings, known?) for a --model_type; unknown types get the default recipe."""
    if model_type is None:
        return RECIPES["default"], True
    for name, settings in RECIPES.items():
        if name.lower() == model_type.lower():
            return settings, True
    return RECIPES["default"], False


def make_config(model_type: str | None, overrides: dict) -> tuple[QuantConfig, bool]:
    """The recipe of model_type with explicitly given flags on top (None = not given)."""
    settings, known = recipe(model_type)
    names = {f.name for f in fields(QuantConfig)}
    given = {k: v for k, v in overrides.items() if v is not None and k in names}
    return replace(QuantConfig(), **{**settings, **given}), known

"""Calibration prompts: a jsonl file (msModelSlim's `inputs_pretokenized` field, or `text`), or the
set shipped with pdmix. Each prompt is tokenized alone: calibration runs batch 1, no padding."""

from importlib import resources
from pathlib import Path

import torch

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_jsonl

FIELDS = ("inputs_pretokenized", "text")


def default_calib_file() -> Path:
    return Path(str(resources.files("pdmix.quant") / "data" / "calib_default.jsonl"))


def read_prompts(path: str | Path | None, max_samples: int) -> list[str]:
    path = Path(path) if path else default_calib_file()
    prompts = []
    for n, row in read_jsonl(path, "--calib_file"):
        text = next((row[f] for f in FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        if text is None:
            raise PdmixError(f"--calib_file {path}: line {n} has no string field {' or '.join(FIELDS)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PdmixError(f"--calib_file {path}: line {n} holds {e.object[e.start:e.end]!a}, "
                             f"not a character (a lone surrogate escape?)") from None
        if text.strip() and len(prompts) < max_samples:
            prompts.append(text)
    if not prompts:
        raise PdmixError(f"--calib_file {path}: no calibration prompts")
    return prompts


def tokenize(tokenizer, prompts: list[str], max_len: int) -> list[torch.Tensor]:
    ids = []
    for p in prompts:
        t = tokenizer(p, add_special_tokens=True)["input_ids"][:max_len]
        if t:
            ids.append(torch.tensor(t, dtype=torch.long))
    if not ids:
        raise PdmixError("the tokenizer turned every calibration prompt into no tokens")
    return ids

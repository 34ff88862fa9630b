"""Read JSON that a user hands pdmix, turning every way it can be wrong into a one-line PdmixError.

Every JSON pdmix parses itself (config.json, generation_config.json, the quantization description,
safetensors indexes and headers, calibration and chat JSONL lines) goes through `parse`, which
holds it to a size and a nesting limit: a 100,000-deep array would otherwise end in Python's
RecursionError, and a multi-gigabyte file in memory exhaustion.
"""

import json
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.paths import os_reason

MAX_DEPTH = 64                 # real configs nest 3-5 levels, tokenizer files about 6
MAX_BYTES = 64 * 1024 * 1024   # one JSON document or one JSONL line (tokenizer.json files reach ~30 MB)


def depth(value) -> int:
    """How deeply arrays and objects nest in a parsed value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        if d <= MAX_DEPTH:  # one level past the limit is enough to refuse it
            stack.extend((c, d + 1) for c in children)
    return deepest


def parse(text: str | bytes, what: str):
    """json.loads within MAX_BYTES and MAX_DEPTH; `what` names the file (and line) in the error."""
    if len(text) > MAX_BYTES:
        raise PdmixError(f"{what}: {len(text)} bytes of JSON, more than the limit of {MAX_BYTES}")
    too_deep = PdmixError(f"{what}: JSON nested deeper than the limit of {MAX_DEPTH} levels")
    try:
        data = json.loads(text)
    except RecursionError:  # deeper than Python's parser goes, far past MAX_DEPTH
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PdmixError(f"{what}: not valid JSON ({e})") from None
    if depth(data) > MAX_DEPTH:
        raise too_deep
    return data


def read_json(path: Path, missing_hint: str = ""):
    """A JSON file's value, its size checked before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise PdmixError(f"{path}: {size} bytes, more than the limit of {MAX_BYTES} for a JSON file")
        text = path.read_bytes()
    except FileNotFoundError:
        raise PdmixError(f"{path}: missing{missing_hint}") from None
    except OSError as e:
        raise PdmixError(f"{path}: cannot read ({os_reason(e)})") from None
    return parse(text, str(path))


def read_json_object(path: Path, missing_hint: str = "") -> dict:
    data = read_json(path, missing_hint)
    if not isinstance(data, dict):
        raise PdmixError(f"{path}: expected a JSON object")
    return data


def read_jsonl(path: Path, flag: str):
    """(line number, value) of each non-blank line of a JSONL file, read line by line (a line longer
    than MAX_BYTES is refused before it is held whole); errors name the flag, the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_BYTES + 1), ""), 1):
                if len(line) > MAX_BYTES:
                    raise PdmixError(f"{flag} {path}: line {n} is longer than the limit of {MAX_BYTES} bytes")
                if line.strip():
                    yield n, parse(line, f"{flag} {path}: line {n}")
    except FileNotFoundError:
        raise PdmixError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise PdmixError(f"{flag} {path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise PdmixError(f"{flag} {path}: cannot read ({os_reason(e)})") from None

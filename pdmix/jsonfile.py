"""Read a JSON object file, turning every way it can be wrong into a one-line PdmixError."""

import json
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.paths import os_reason


def read_json_object(path: Path, missing_hint: str = "") -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PdmixError(f"{path}: missing{missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PdmixError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise PdmixError(f"{path}: cannot read ({os_reason(e)})") from None
    if not isinstance(data, dict):
        raise PdmixError(f"{path}: expected a JSON object")
    return data

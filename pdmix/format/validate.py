"""The tensors of a checkpoint folder against its config.json, before any work starts.

Names, shapes and dtypes come from the safetensors headers (nothing is read); finiteness is
checked one tensor at a time, so memory stays bounded by the largest tensor. `pdmix quant` runs
these on its float source; `LLM` (run, serve, eval) runs them on a float folder, and `inspect`'s
checks on a W8A8_MIX one, before loading, so nothing `inspect` would reject is ever loaded.
"""

import re
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.format.description import is_quant_checkpoint, read_description
from pdmix.format.inspect import check_all_finite, inspect_checkpoint
from pdmix.format.names import DESCRIPTION_FILE, DYNAMIC_TYPE, FLOAT, INDEX_FILE, QUANT_TYPE, WEIGHT_FILE
from pdmix.models.arch import ROUTER, config_dims, is_sparse, layer_linears, linear_shape
from pdmix.format.reader import SafetensorsFolder
from pdmix.models.config import ModelConfig

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
FLOAT_ST_DTYPES = ("BF16", "F16", "F32")
ST_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[list[int], bool]]:
    """name -> (shape, required) of every tensor a model of this config may hold (biases are optional:
    sources have them by design, outlier suppression adds them, SPEC §6)."""
    h, out = cfg.hidden_size, {}

    def norm(name, size):
        out[name + ".weight"] = ([size], True)
        out[name + ".bias"] = ([size], False)

    out["model.embed_tokens.weight"] = ([cfg.vocab_size, h], True)
    out["lm_head.weight"] = ([cfg.vocab_size, h], not cfg.tie_word_embeddings)
    norm("model.norm", h)
    for i in range(cfg.num_layers):
        norm(f"model.layers.{i}.input_layernorm", h)
        norm(f"model.layers.{i}.post_attention_layernorm", h)
        if cfg.qk_norm:
            norm(f"model.layers.{i}.self_attn.q_norm", cfg.head_dim)
            norm(f"model.layers.{i}.self_attn.k_norm", cfg.head_dim)
        if is_sparse(cfg, i):
            out[f"model.layers.{i}.{ROUTER}.weight"] = ([cfg.num_experts, h], True)
        dims = config_dims(cfg, i)
        for prefix, lin in layer_linears(cfg, i):
            shape = list(linear_shape(dims, lin.name))
            out[prefix + ".weight"] = (shape, True)
            out[prefix + ".bias"] = ([shape[0]], False)
    return out


def check_layer_count(cfg: ModelConfig, st: SafetensorsFolder) -> None:
    """Weights of exactly num_hidden_layers decoder layers (checked first: a wrong count in either
    direction would otherwise surface as one missing tensor among thousands)."""
    for name in st.names():
        m = LAYER_RE.match(name)
        if m and int(m.group(1)) >= cfg.num_layers:
            raise PdmixError(f"{st.file_of(name)}: tensor {name} is beyond num_hidden_layers {cfg.num_layers} "
                             f"of {cfg.folder / 'config.json'}")
        m = EXPERT_RE.match(name)
        if m and not (is_sparse(cfg, int(m.group(1))) and int(m.group(2)) < cfg.num_experts):
            what = (f"beyond num_experts {cfg.num_experts}" if is_sparse(cfg, int(m.group(1)))
                    else f"an expert of layer {m.group(1)}, which config.json makes dense")
            raise PdmixError(f"{st.file_of(name)}: tensor {name} is {what} ({cfg.folder / 'config.json'})")


def check_tensors(cfg: ModelConfig, st: SafetensorsFolder, dtype_exact: bool, types: dict[str, str] | None = None) -> None:
    """Every tensor the config implies is there with its shape; float tensors are floating point
    (exactly the config's dtype when dtype_exact). types: a W8A8_MIX description (quantized
    linears keep their int8 [n, k] weight; inspect checks their other tensors)."""
    check_layer_count(cfg, st)
    config = cfg.folder / "config.json"
    want = {"bfloat16": "BF16", "float16": "F16"}[str(cfg.dtype).removeprefix("torch.")]
    for name, (shape, required) in expected_tensors(cfg).items():
        if name not in st:
            if required:
                raise PdmixError(f"{st.folder}: tensor {name} missing (expected by {config})")
            continue
        dtype, actual = st.meta(name)
        if actual != shape:
            raise PdmixError(f"{st.file_of(name)}: tensor {name} has shape {actual}, expected {shape} from {config}")
        if types and name.endswith(f".{ROUTER}.weight") and types.get(name) != FLOAT:
            raise PdmixError(f"{cfg.folder / DESCRIPTION_FILE}: router {name} is labelled {types.get(name)}; "
                             f"a MoE router stays {FLOAT}")
        if types and types.get(name) in (QUANT_TYPE, DYNAMIC_TYPE):
            continue
        if dtype not in FLOAT_ST_DTYPES or (dtype_exact and dtype != want and not name.endswith(".bias")):
            expected = want if dtype_exact else " or ".join(FLOAT_ST_DTYPES)
            hint = "" if dtype in FLOAT_ST_DTYPES else "; a float model's tensors are floating point"
            named = f"{dtype} ({ST_NAMES[dtype]})" if dtype in ST_NAMES else dtype
            raise PdmixError(f"{st.file_of(name)}: tensor {name} is {named}, "
                             f"expected {expected} (config.json dtype {str(cfg.dtype).removeprefix('torch.')}){hint}")


def has_quant_weights(folder: Path) -> bool:
    return (folder / WEIGHT_FILE).exists() or (folder / INDEX_FILE).exists()


def check_not_quantized(folder: Path, flag: str = "--model_path") -> None:
    if is_quant_checkpoint(folder) or has_quant_weights(folder):
        raise PdmixError(f"{flag} {folder} is already a W8A8_MIX checkpoint; pass the float model it came from")


def check_float_source(cfg: ModelConfig, st: SafetensorsFolder, dtype_exact: bool = True) -> None:
    """A float Hugging Face folder: names, shapes and dtypes against the config, then finiteness."""
    check_tensors(cfg, st, dtype_exact)
    check_all_finite(st)


def check_loadable(cfg: ModelConfig) -> None:
    """What run/LLM/eval load: a W8A8_MIX folder that `pdmix inspect` accepts and whose shapes match
    config.json, or a float folder whose tensors match it and are finite."""
    folder = Path(cfg.folder)
    if is_quant_checkpoint(folder):
        inspect_checkpoint(folder)
        st = SafetensorsFolder(folder, quantized=True)
        check_tensors(cfg, st, dtype_exact=False, types=read_description(folder)[1])
        st.release()
        return
    if has_quant_weights(folder):
        raise PdmixError(f"{folder}: has W8A8_MIX weight files but no {DESCRIPTION_FILE}")
    check_float_source(cfg, SafetensorsFolder(folder, quantized=False), dtype_exact=False)

"""Recognise a W8A8_MIX folder without `--quantization w8a8_mix`.

vLLM asks quantization configs to claim a checkpoint only when config.json carries a
`quantization_config`, which W8A8_MIX folders (msModelSlim's layout) do not. So the plugin wraps
`ModelConfig._verify_quantization`: for a local folder holding quant_model_description.json and
no quantization_config, it sets `quantization = "w8a8_mix"` first, exactly as the flag would, and
vLLM then reads the description through W8A8MixConfig.get_config_filenames(). Plugins load in
EngineArgs before the ModelConfig is built, so the wrapper is in place for `vllm serve` and
`vllm.LLM` alike. (Hub ids are not inspected: pass the flag, or download the folder first.)
"""

import os

from vllm.config.model import ModelConfig

from pdmix.format.names import DESCRIPTION_FILE
from pdmix.vllm.config import NAME


def is_w8a8_mix_folder(model: str) -> bool:
    return os.path.isfile(os.path.join(model, DESCRIPTION_FILE))


def install() -> None:
    original = ModelConfig._verify_quantization
    if getattr(original, "_pdmix", False):
        return

    def verify_quantization(self: ModelConfig) -> None:
        if (self.quantization is None and self.model_arch_config.quantization_config is None
                and is_w8a8_mix_folder(str(self.model))):
            self.quantization = NAME
        original(self)

    verify_quantization._pdmix = True
    ModelConfig._verify_quantization = verify_quantization

"""pdmix's W8A8_MIX checkpoints (and msModelSlim's) inside upstream vLLM, with the PD-mix split per
token row of every forward (decode rows static per tensor, prefill rows dynamic per token) on
vLLM's own int8 kernels. Installed with `pip install 'pdmix[vllm]'`; vLLM loads it through the
`vllm.general_plugins` entry point `pdmix = pdmix.vllm:register` in every one of its processes.

- config.py: the quantization method "w8a8_mix" (reads quant_model_description.json)
- linear.py: the linear method (fused groups, float members, TP) on vLLM's int8 kernel factory
- moe.py: a MoE layer's W8A8_DYNAMIC experts (vLLM's int8 fused MoE, or pdmix's per-expert kernels)
- routing.py: which rows of a forward are prefill rows, read from vLLM's forward context
- models.py: Llama/Qwen2/Qwen3/Qwen3-MoE that carry the m4 biases and refuse tensors they cannot place
- detect.py: recognise a W8A8_MIX folder without --quantization
Importing pdmix never imports this package.
"""


def register() -> None:
    from pdmix.vllm import config, detect, models  # noqa: F401  (config registers "w8a8_mix")
    detect.install()
    models.register()

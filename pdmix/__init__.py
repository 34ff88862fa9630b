"""pdmix: W8A8 PD-mix quantization (msModelSlim W8A8_MIX format) and inference."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "PdmixError", "__version__"]


def __getattr__(name):
    # The runtime pulls in torch and the model code; keep `import pdmix` cheap for the CLI.
    if name == "LLM":
        from pdmix.runtime.llm import LLM
        return LLM
    if name == "SamplingParams":
        from pdmix.runtime.sampling import SamplingParams
        return SamplingParams
    if name == "PdmixError":
        from pdmix.errors import PdmixError
        return PdmixError
    raise AttributeError(name)

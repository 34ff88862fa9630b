"""`pdmix` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; it is imported only when used."""

import argparse
import importlib
import os
import sys

from pdmix.errors import PdmixError

COMMANDS = {
    "fetch": ("pdmix.fetch", "download and convert a real model (smollm2) into a cached Hugging Face folder"),
    "quant": ("pdmix.quant.cli", "quantize a Hugging Face model to a W8A8_MIX checkpoint (msModelSlim flags)"),
    "inspect": ("pdmix.format.inspect", "validate a W8A8_MIX directory against the SPEC and summarise it"),
    "run": ("pdmix.run_pa", "run a checkpoint with paged attention (same as python -m pdmix.run_pa)"),
    "eval": ("pdmix.evaluate", "perplexity of a checkpoint per quantization path"),
    "bench": ("pdmix.bench", "linear-level and end-to-end speed, float vs W8A8 PD-mix"),
    "serve": ("pdmix.serving.cli", "an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)"),
}


def run_command(module: str, args) -> int:
    try:
        return importlib.import_module(module).run(args) or 0
    except PdmixError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; say it once
            print(f"pdmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdmix: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pdmix", description="W8A8 PD-mix quantization and inference")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return run_command(args._module, args)


if __name__ == "__main__":
    raise SystemExit(main())

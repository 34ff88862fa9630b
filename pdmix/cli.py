"""`pdmix` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; it is imported only when used."""

import argparse
import importlib
import os
import sys

from pdmix.errors import PdmixError
from pdmix.paths import os_reason

COMMANDS = {
    "fetch": ("pdmix.fetch", "download and convert a real model (smollm2) into a cached Hugging Face folder"),
    "quant": ("pdmix.quant.cli", "quantize a Hugging Face model to a W8A8_MIX checkpoint (msModelSlim flags)"),
    "inspect": ("pdmix.format.inspect", "validate a W8A8_MIX directory against the SPEC and summarise it"),
    "run": ("pdmix.run_pa", "run a checkpoint with paged attention (same as python -m pdmix.run_pa)"),
    "eval": ("pdmix.evaluate", "perplexity of a checkpoint per quantization path"),
    "bench": ("pdmix.bench", "linear-level and end-to-end speed, float vs W8A8 PD-mix"),
    "serve": ("pdmix.serving.cli", "an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in pdmix's one-line form."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"pdmix: error: {message}\n")


def error_line(message: str) -> str:
    """Under torchrun every rank says its own error (the first rank to fail may take the others down
    before rank 0 has printed), marked with its rank; ranks that fail alike print one line each."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    return f"pdmix: error: {rank}{' '.join(str(message).split(chr(10)))}"


def run_command(module: str, args) -> int:
    try:
        return importlib.import_module(module).run(args) or 0
    except PdmixError as e:
        print(error_line(str(e)), file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:  # `pdmix inspect X | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the last net: an operating-system error no check foresaw, still one line
        where = f"{e.filename}: " if e.filename else ""
        print(error_line(f"{where}{os_reason(e)}"), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("pdmix: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="pdmix", description="W8A8 PD-mix quantization and inference")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(p)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    return run_command(args._module, args)


if __name__ == "__main__":
    raise SystemExit(main())

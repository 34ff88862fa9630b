"""`pdmix serve MODEL_DIR`: an OpenAI-compatible server (FastAPI + uvicorn) on pdmix's engine.

Under `torchrun --nproc_per_node N -m pdmix serve ...` every rank loads its shard; rank 0 serves
HTTP and broadcasts each step's new requests and aborts, the other ranks follow.
"""

import os
import signal
import socket
import sys
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.params import DTYPE_HELP, DTYPES, LM_HEAD_HELP, LM_HEADS, number, whole
from pdmix.run_pa import check_engine_flags, load_llm


def flag(p, name: str, **kw) -> None:
    """--max_batch_size and --max-batch-size alike (run_pa's spelling and the usual server one)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*names, dest=name, **kw)


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="W8A8_MIX folder or float Hugging Face folder")
    flag(p, "host", default="127.0.0.1")
    flag(p, "port", type=int, default=8000)
    flag(p, "api_key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    flag(p, "served_model_name", default=None, help="the model name clients use (default: the folder name)")
    flag(p, "chat_template", default=None, help="a chat template file or template string (default: the tokenizer's)")
    flag(p, "max_batch_size", type=int, default=8, help="sequences in the running batch")
    flag(p, "max_input_length", type=int, default=1024, help="longest prompt in tokens")
    flag(p, "max_output_length", type=int, default=512, help="largest max_tokens (and its default)")
    flag(p, "max_prefill_tokens", type=int, default=-1,
         help="prompt tokens per step; longer prompts are prefilled in chunks (-1: no limit)")
    flag(p, "block_size", type=int, default=128, help="KV cache block size in tokens")
    flag(p, "num_blocks", type=int, default=None,
         help="KV cache blocks (default: enough for max_batch_size sequences of the longest length)")
    flag(p, "quant_mode", default="pdmix", choices=("pdmix", "dynamic", "static"))
    flag(p, "device", default="auto", choices=("cpu", "cuda", "auto"))
    flag(p, "kernel", default=None, help="force a W8A8 kernel backend (onednn, reference, cuda; default: the device's best)")
    flag(p, "lm_head", default="float", choices=LM_HEADS, help=LM_HEAD_HELP)
    flag(p, "dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    flag(p, "compile", action="store_true",
         help="compile the decoder stack for decode steps (bit-identical output; ~1 min on first start)")
    flag(p, "threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    flag(p, "shutdown_timeout", type=float, default=5.0,
         help="on SIGTERM, seconds running requests may take to finish before they are aborted")
    flag(p, "log_level", default="warning", choices=("critical", "error", "warning", "info", "debug"))


def check_flags(args) -> None:
    whole("--port", args.port, 0, 65535)
    number("--shutdown_timeout", args.shutdown_timeout, 0)
    check_engine_flags(args)
    if args.num_blocks is not None:
        whole("--num_blocks", args.num_blocks, 1)


def run(args) -> int:
    import torch.distributed as dist

    from pdmix.runtime import tp
    from pdmix.serving.online import follow

    check_flags(args)
    if tp.from_env().is_main:
        check_port(args.host, args.port)  # before minutes of loading, not after
    llm = load_llm(args, args.model, args.num_blocks)
    try:
        group = dist.new_group(backend="gloo") if llm.tp.size > 1 else None
        llm.warmup()
        if not llm.tp.is_main:
            for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop and says so
                signal.signal(sig, signal.SIG_IGN)
            follow(llm, group)
            return 0
        serve(llm, args, group)
    finally:
        tp.shutdown()
    return 0


def check_port(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise PdmixError(f"cannot listen on {host}:{port} ({e.strerror})") from None


def serve(llm, args, group) -> None:
    import uvicorn

    from pdmix.serving.app import ServeConfig, create_app
    from pdmix.serving.metrics import Metrics
    from pdmix.serving.online import OnlineEngine

    from pdmix.tokenizer import load_tokenizer

    llm.tokenizer  # noqa: B018  (a model without a tokenizer fails here, as a one-line error)
    engine = OnlineEngine(llm, load_tokenizer(llm.cfg.folder), Metrics(), group)  # the engine thread's own
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(llm, engine, ServeConfig(name, args.max_output_length, args.api_key, args.chat_template))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.begin_shutdown(args.shutdown_timeout)  # running requests finish (or are aborted) first
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"pdmix serve: {name} on http://{args.host}:{args.port} (tp {llm.tp.size}, pid {os.getpid()})",
                      flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = Server(config)
    # uvicorn re-raises the signal it shut down on; after a graceful shutdown the exit status is 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    engine.start()
    try:
        server.run()
    except SystemExit:
        raise PdmixError(f"cannot listen on {args.host}:{args.port}") from None
    finally:
        if engine.thread.is_alive():
            engine.stop()
    if not server.started:
        raise PdmixError(f"cannot listen on {args.host}:{args.port}")
    print("pdmix serve: stopped", file=sys.stderr, flush=True)

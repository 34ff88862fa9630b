"""`pdmix run` / `python -m pdmix.run_pa`: MindIE's run_pa for W8A8_MIX and float checkpoints.

`torchrun --nproc_per_node N -m pdmix.run_pa --model_path PATH` runs N-way tensor parallel; only
rank 0 prints. Prompts come from --input_texts, --input_ids or --input_file (jsonl chats).
"""

import json
from pathlib import Path

from pdmix.errors import PdmixError
from pdmix.jsonfile import read_jsonl
from pdmix.params import DTYPE_HELP, DTYPES, LM_HEAD_HELP, LM_HEADS, whole

DEFAULT_INPUT = "What's deep learning?"


def add_arguments(p) -> None:
    p.add_argument("--model_path", required=True, help="W8A8_MIX folder or float Hugging Face folder")
    p.add_argument("--input_texts", nargs="+", default=None, help=f'prompts (default "{DEFAULT_INPUT}")')
    p.add_argument("--input_ids", nargs="+", default=None, help='token-id prompts, each like "1,2,3"')
    p.add_argument("--input_file", default=None,
                   help='jsonl: each line a chat, a list of {role, content} or {"messages": [...]}')
    p.add_argument("--max_batch_size", type=int, default=1)
    p.add_argument("--max_input_length", type=int, default=1024)
    p.add_argument("--max_output_length", type=int, default=20)
    p.add_argument("--max_prefill_tokens", type=int, default=-1,
                   help="prompt tokens per step; longer prompts are prefilled in chunks (-1: no limit)")
    p.add_argument("--block_size", type=int, default=128, help="KV cache block size in tokens")
    p.add_argument("--is_chat_model", action="store_true", help="wrap --input_texts in the chat template")
    p.add_argument("--chat_template", default=None, help="a chat template file or template string")
    p.add_argument("--ignore_eos", action="store_true")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--quant_mode", default="pdmix", choices=("pdmix", "dynamic", "static"),
                   help="pdmix: dynamic for prompt rows, static for decode rows; or force one path")
    p.add_argument("--kernel", default=None,
                   help="force a W8A8 kernel backend (onednn, reference, cuda; default: the device's best)")
    p.add_argument("--lm_head", default="float", choices=LM_HEADS, help=LM_HEAD_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="compile the decoder stack for decode steps (bit-identical output; ~1 min on first start)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--print_ids", action="store_true", help="also print the generated token ids")


def read_chats(path: str) -> list[list[dict]]:
    chats = []
    for n, item in read_jsonl(path, "--input_file"):
        messages = item.get("messages") if isinstance(item, dict) else item
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise PdmixError(f"{path}:{n}: expected a list of {{role, content}} messages or {{\"messages\": [...]}}")
        if not messages:
            raise PdmixError(f"{path}:{n}: an empty chat (no messages)")
        if not all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages):
            raise PdmixError(f"{path}:{n}: a message's role and content must be strings")
        chats.append(messages)
    if not chats:
        raise PdmixError(f"{path}: no chats")
    return chats


def chat_template(arg: str | None, tokenizer) -> str:
    """--chat_template: a Jinja template string (it holds {{ or {%), or else the file that holds one."""
    if arg is not None:
        if "{{" in arg or "{%" in arg:
            return arg
        try:
            return Path(arg).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise PdmixError(f"--chat_template {arg[:80]!r}: neither a template (no {{{{ or {{%) nor a readable "
                             f"file ({reason})") from None
    if not tokenizer.chat_template:
        raise PdmixError("the tokenizer has no chat template; pass --chat_template")
    return tokenizer.chat_template


def apply_chat(tokenizer, template: str, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja2's TemplateSyntaxError, UndefinedError, or a raise_exception() in the template
        raise PdmixError(f"--chat_template: the chat template fails ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_ids(s: str) -> list[int]:
    try:
        return [int(t) for t in s.replace(" ", "").split(",") if t]
    except ValueError:
        raise PdmixError(f'--input_ids {s!r}: expected comma-separated integers like "1,2,3"') from None


def build_prompts(args, llm) -> tuple[list[str], list[list[int]]]:
    """(what to show as the question, token ids) of every prompt."""
    if sum(x is not None for x in (args.input_texts, args.input_ids, args.input_file)) > 1:
        raise PdmixError("give only one of --input_texts, --input_ids, --input_file")
    if args.input_ids is not None:
        ids = [parse_ids(s) for s in args.input_ids]
        return [str(i) for i in ids], ids
    tok = llm.tokenizer
    if args.input_file is not None:
        chats = read_chats(args.input_file)
        template = chat_template(args.chat_template, tok)
        return [json.dumps(c, ensure_ascii=False) for c in chats], [apply_chat(tok, template, c) for c in chats]
    texts = args.input_texts or [DEFAULT_INPUT]
    if args.is_chat_model:
        template = chat_template(args.chat_template, tok)
        return texts, [apply_chat(tok, template, [{"role": "user", "content": t}]) for t in texts]
    return texts, [llm.encode(t) for t in texts]


def check_engine_flags(args) -> None:
    """The engine flags `pdmix run` and `pdmix serve` share."""
    for name in ("max_batch_size", "max_input_length", "max_output_length", "block_size"):
        whole(f"--{name}", getattr(args, name), 1)
    if args.threads is not None:
        whole("--threads", args.threads, 1)
    if args.max_prefill_tokens != -1:
        whole("--max_prefill_tokens", args.max_prefill_tokens, 1)


def load_llm(args, model_path, num_blocks: int | None = None):
    """The LLM the shared engine flags describe (after check_engine_flags)."""
    import torch

    from pdmix.runtime.llm import LLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return LLM(model_path, quant_mode=args.quant_mode, block_size=args.block_size, max_batch_size=args.max_batch_size,
               max_prefill_tokens=args.max_prefill_tokens if args.max_prefill_tokens > 0 else None,
               max_input_length=args.max_input_length, max_output_length=args.max_output_length,
               num_blocks=num_blocks, device=args.device, kernel=args.kernel, compile=args.compile,
               lm_head=args.lm_head, dtype=args.dtype)


def check_flags(args) -> None:
    check_engine_flags(args)
    from pdmix.runtime.sampling import check_sampling
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed, prefix="--")


def run(args) -> int:
    from pdmix.runtime import tp
    from pdmix.runtime.sampling import SamplingParams

    check_flags(args)
    params = SamplingParams(max_tokens=args.max_output_length, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    llm = load_llm(args, args.model_path)
    try:
        questions, prompts = build_prompts(args, llm)
        llm.warmup()
        outputs = llm.generate(prompts, params)
        if llm.tp.is_main:
            for i, (q, out) in enumerate(zip(questions, outputs)):
                o = out.outputs[0]
                print(f"Question[{i}]: {q}")
                print(f"Answer[{i}]: {o.text if o.text is not None else o.token_ids}")
                if args.print_ids:
                    print(f"Generate[{i}] token ids: {o.token_ids}")
            print(summary(llm.stats, len(outputs), llm.tp.size, llm.kernel_names, args.compile, args.dtype), flush=True)
    finally:
        tp.shutdown()
    return 0


def summary(s, n: int, tp_size: int, kernel_names: list[str], compiled: bool = False, dtype: str = "auto") -> str:
    rate = lambda tokens, sec: tokens / sec if sec > 0 else 0.0
    kernels = f", kernels {'+'.join(kernel_names)}" if kernel_names else ""
    kernels += ", compiled decode" if compiled else ""
    kernels += "" if dtype == "auto" else f", {dtype} activations"
    return (f"pdmix run: {n} prompt(s), tp {tp_size}{kernels}: prefill {s.prefill_tokens} tokens in {s.prefill_s:.3f} s "
            f"({rate(s.prefill_tokens, s.prefill_s):.1f} tokens/s), decode {s.decode_tokens} tokens in "
            f"{s.decode_s:.3f} s ({rate(s.decode_tokens, s.decode_s):.1f} tokens/s)")


def main(argv: list[str] | None = None) -> int:
    from pdmix.cli import Parser, run_command

    parser = Parser(prog="python -m pdmix.run_pa", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run_command("pdmix.run_pa", args)


if __name__ == "__main__":
    raise SystemExit(main())

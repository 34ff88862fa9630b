"""The Python API, in vLLM's shape: LLM(model_path).generate(prompts, SamplingParams(...))."""

from dataclasses import dataclass, field

import torch

from pdmix import kernels
from pdmix.device import resolve_device
from pdmix.errors import PdmixError
from pdmix.format.validate import check_loadable
from pdmix.models.config import load_config, with_dtype
from pdmix.models.linear import MODES
from pdmix.params import check_dtype, check_lm_head, whole
from pdmix.runtime import tp as tpm
from pdmix.runtime.compiled import compile_decoder
from pdmix.runtime.engine import Engine, Stats
from pdmix.runtime.kv_cache import KVCache, blocks_needed, cache_dtype
from pdmix.runtime.loader import load_model
from pdmix.runtime.memory import keep_freed_memory
from pdmix.runtime.sampling import SamplingParams, make_generator
from pdmix.runtime.scheduler import Scheduler, Sequence
from pdmix.tokenizer import load_tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str | None
    logits: torch.Tensor | None = None  # [len(token_ids), vocab] fp32, with SamplingParams(return_logits=True)


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """A checkpoint (W8A8_MIX or float Hugging Face folder) ready to generate.

    dtype: "auto" computes in the checkpoint's dtype (bf16: MindIE's and vLLM's arithmetic, the tests'
    reference); "float32" widens the float weights and computes every activation in fp32 (pdmix.params.DTYPES).

    Under torchrun (WORLD_SIZE > 1) every rank builds its shard; all ranks must call generate
    with the same prompts, and all return the same outputs.
    """

    def __init__(self, model_path, quant_mode: str = "pdmix", block_size: int = 128, max_batch_size: int = 8,
                 max_prefill_tokens: int | None = None, max_input_length: int = 1024, max_output_length: int = 512,
                 num_blocks: int | None = None, device: str = "cpu", kernel: str | None = None,
                 compile: bool = False, lm_head: str = "float", dtype: str = "auto"):
        if quant_mode not in MODES:
            raise PdmixError(f"quant_mode must be one of {', '.join(MODES)}, got {quant_mode!r}")
        whole("block_size", block_size, 1, 1 << 16)
        whole("max_batch_size", max_batch_size, 1)
        if max_prefill_tokens is not None:
            whole("max_prefill_tokens", max_prefill_tokens, 1)
        if num_blocks is not None:
            whole("num_blocks", num_blocks, 1)
        kernels.check_name(kernel)
        check_lm_head(lm_head, "lm_head")
        check_dtype(dtype, "dtype")
        stored = load_config(model_path)
        cfg = with_dtype(stored, dtype)
        for name, v in (("max_input_length", max_input_length), ("max_output_length", max_output_length)):
            if whole(name, v, 1) > cfg.max_position_embeddings:  # positions past it were never trained
                raise PdmixError(f"{name} {v} passes the model's max_position_embeddings "
                                 f"{cfg.max_position_embeddings} ({cfg.folder / 'config.json'})")
        tp_size = tpm.from_env().size
        tpm.check_divisible(cfg, tp_size)  # before any rank joins the process group
        if num_blocks is None:
            num_blocks = max_batch_size * blocks_needed(max_input_length + max_output_length, block_size)
        device = resolve_device(device)
        check_kv_memory(cfg, num_blocks, block_size, tp_size, device,
                        f"max_batch_size {max_batch_size} x (max_input_length {max_input_length} + "
                        f"max_output_length {max_output_length}) tokens")
        check_loadable(stored)  # before joining the process group: every rank refuses a bad checkpoint alike
        self.tp, self.device = tpm.init(device)
        self.cfg, self.model = cfg, load_model(cfg, self.device, self.tp, kernel, lm_head)
        if compile:
            compile_decoder(self.model, max_batch_size)
        keep_freed_memory()
        self.max_input_length = max_input_length
        cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads // self.tp.size, cfg.head_dim,
                        cache_dtype(cfg.dtype, self.device), self.device)
        prefill_budget = max_prefill_tokens or max_batch_size * max_input_length
        scheduler = Scheduler(cache.allocator, block_size, max_batch_size, prefill_budget)
        self.engine = Engine(self.model, cache, scheduler, cfg.eos_token_ids, quant_mode, self.tp, self.device)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.folder, "; give token ids instead (--input_ids)")
        return self._tokenizer

    @property
    def kernel_names(self) -> list[str]:
        """The W8A8 kernel backends this model's quantized linears run on (empty for a float model)."""
        return sorted({m.kernel.name for m in self.model.modules() if getattr(m, "kernel", None) is not None})

    @property
    def stats(self) -> Stats:
        """Token counts and times of the last generate call."""
        return self.engine.stats

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if prompt and not ids:
            raise PdmixError(f"the tokenizer of {self.cfg.folder} turned the prompt {prompt[:40]!r} into no tokens")
        return ids

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and not isinstance(prompts[0], (str, list, tuple))):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise PdmixError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                             f"got {type(prompts).__name__}")
        params = SamplingParams() if sampling_params is None else sampling_params
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise PdmixError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise PdmixError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
            ids = self.encode(prompt) if isinstance(prompt, str) else prompt_ids(prompt, i)
            self.check_request(ids, p, i)
            seqs.append(Sequence(ids, p, make_generator(p, self.device)))
        self.engine.stats = Stats()
        self.engine.run(seqs)
        return [self.output(prompt, seq) for prompt, seq in zip(prompts, seqs)]

    def warmup(self, prompt_lens: tuple[int, ...] = (8, 64), decode_steps: int = 4) -> None:
        """Short prefills and a few decode steps, so one-time initialisation (kernel selection, the
        compiled fusions that larger prefills use, the compiled decoder stack, which is built on a
        decode step of two sequences, first allocations) is not counted in the first request's timings."""
        self.generate([[0] * min(n, self.max_input_length) for n in prompt_lens],
                      SamplingParams(max_tokens=decode_steps, ignore_eos=True))
        self.engine.stats = Stats()

    def check_request(self, ids: list[int], params: SamplingParams, i: int = 0) -> None:
        """Refuse prompt i and its max_tokens before it joins: too long, outside the vocabulary, past the
        model's positions, or more than the KV cache holds."""
        self.check_prompt(ids)
        if len(ids) + params.max_tokens > self.cfg.max_position_embeddings:
            raise PdmixError(f"prompt {i}: {len(ids)} tokens + max_tokens {params.max_tokens} pass the model's "
                             f"max_position_embeddings {self.cfg.max_position_embeddings}")
        self.engine.scheduler.check(len(ids), params.max_tokens)

    def check_prompt(self, ids: list[int], limit_length: bool = True) -> None:
        if not ids:
            raise PdmixError("empty prompt")
        if limit_length and len(ids) > self.max_input_length:
            raise PdmixError(f"prompt of {len(ids)} tokens is longer than max_input_length {self.max_input_length}")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise PdmixError(f"token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")

    def output(self, prompt, seq: Sequence) -> RequestOutput:
        text = self.decode(seq.output_ids)
        logits = torch.stack(seq.logits) if seq.logits else None
        return RequestOutput(prompt if isinstance(prompt, str) else None, seq.prompt_ids,
                             [CompletionOutput(0, text, seq.output_ids, seq.finish_reason, logits)])

    def decode(self, ids: list[int]) -> str | None:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except PdmixError:
            return None

    def score(self, token_ids: list[int], n_prefill: int, mode: str = "pdmix") -> torch.Tensor:
        """fp32 logits [T, vocab] for every position of one sequence; under 'pdmix' rows
        [0, n_prefill) take the dynamic path and the rest the static one."""
        if mode not in MODES:
            raise PdmixError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        token_ids = prompt_ids(token_ids, 0)
        self.check_prompt(token_ids, limit_length=False)
        if len(token_ids) > self.cfg.max_position_embeddings:
            raise PdmixError(f"{len(token_ids)} tokens pass the model's max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        return self.engine.score(token_ids, n_prefill, mode)


def prompt_ids(prompt, i: int) -> list[int]:
    """A token-id prompt as a list of ints: floats (1.5, even 1.0), bools and strings are refused."""
    if not isinstance(prompt, (list, tuple)):
        raise PdmixError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int):
            raise PdmixError(f"prompt {i}: token ids must be integers, got {t!r}")
    return list(prompt)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on the device (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_kv_memory(cfg, num_blocks: int, block_size: int, tp_size: int, device: torch.device, what: str) -> None:
    """Refuse a KV cache that cannot fit before allocating it (a typo such as --max_batch_size 1e7 would
    otherwise ask the allocator for hundreds of GB)."""
    elt = torch.empty((), dtype=cache_dtype(cfg.dtype, device)).element_size()
    need = num_blocks * block_size * cfg.num_layers * 2 * (cfg.num_kv_heads // tp_size) * cfg.head_dim * elt
    free = available_memory(device)
    if free is not None and need > free:
        raise PdmixError(f"the KV cache for {what} needs {need / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB "
                         f"available on {device.type}; lower them")

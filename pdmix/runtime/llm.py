"""The Python API, in vLLM's shape: LLM(model_path).generate(prompts, SamplingParams(...))."""

from dataclasses import dataclass, field

import torch

from pdmix import kernels
from pdmix.device import resolve_device
from pdmix.errors import PdmixError
from pdmix.models.config import load_config
from pdmix.models.linear import MODES
from pdmix.runtime import tp as tpm
from pdmix.runtime.engine import Engine, Stats
from pdmix.runtime.kv_cache import KVCache, blocks_needed
from pdmix.runtime.loader import load_model
from pdmix.runtime.sampling import SamplingParams, make_generator
from pdmix.runtime.scheduler import Scheduler, Sequence


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

    Under torchrun (WORLD_SIZE > 1) every rank builds its shard; all ranks must call generate
    with the same prompts, and all return the same outputs.
    """

    def __init__(self, model_path, quant_mode: str = "pdmix", block_size: int = 128, max_batch_size: int = 8,
                 max_prefill_tokens: int | None = None, max_input_length: int = 1024, max_output_length: int = 512,
                 num_blocks: int | None = None, device: str = "cpu", kernel: str | None = None):
        if quant_mode not in MODES:
            raise PdmixError(f"quant_mode must be one of {', '.join(MODES)}, got {quant_mode!r}")
        for name, v in (("block_size", block_size), ("max_batch_size", max_batch_size),
                        ("max_input_length", max_input_length), ("max_output_length", max_output_length)):
            if v < 1:
                raise PdmixError(f"{name} must be at least 1, got {v}")
        kernels.check_name(kernel)
        cfg = load_config(model_path)
        tpm.check_divisible(cfg, tpm.from_env().size)  # before any rank joins the process group
        self.tp, self.device = tpm.init(resolve_device(device))
        self.cfg, self.model = cfg, load_model(cfg, self.device, self.tp, kernel)
        self.max_input_length = max_input_length
        if num_blocks is None:
            num_blocks = max_batch_size * blocks_needed(max_input_length + max_output_length, block_size)
        cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads // self.tp.size, cfg.head_dim,
                        cfg.dtype, self.device)
        prefill_budget = max_prefill_tokens or max_batch_size * max_input_length
        scheduler = Scheduler(cache.allocator, block_size, max_batch_size, prefill_budget)
        self.engine = Engine(self.model, cache, scheduler, cfg.eos_token_ids, quant_mode, self.tp, self.device)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.cfg.folder))
            except (OSError, ValueError) as e:
                raise PdmixError(f"{self.cfg.folder}: no usable tokenizer ({e.__class__.__name__})") from None
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
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise PdmixError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = []
        for prompt, p in zip(prompts, params):
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            self.check_prompt(ids)
            seqs.append(Sequence(ids, p, make_generator(p, self.device)))
        self.engine.stats = Stats()
        self.engine.run(seqs)
        return [self.output(prompt, seq) for prompt, seq in zip(prompts, seqs)]

    def warmup(self, prompt_len: int = 16, decode_steps: int = 2) -> None:
        """One short prefill and a few decode steps, so one-time initialisation (kernel selection,
        first allocations) is not counted in the first request's timings."""
        self.generate([[0] * min(prompt_len, self.max_input_length)],
                      SamplingParams(max_tokens=decode_steps, ignore_eos=True))
        self.engine.stats = Stats()

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
        self.check_prompt(list(token_ids), limit_length=False)
        return self.engine.score(list(token_ids), n_prefill, mode)

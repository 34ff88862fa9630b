"""Sampling parameters (vLLM's names) and the sampler: greedy unless a temperature is given."""

from dataclasses import dataclass

import torch

from pdmix.params import boolean, number, whole


def check_sampling(temperature, top_k, top_p, repetition_penalty, seed, prefix: str = "") -> None:
    """Types and ranges; errors name each parameter with `prefix` ("--" for command-line flags)."""
    number(f"{prefix}temperature", temperature, 0)
    whole(f"{prefix}top_k", top_k, -1)
    number(f"{prefix}top_p", top_p, 0, 1, lo_open=True)
    number(f"{prefix}repetition_penalty", repetition_penalty, 0, lo_open=True)
    if seed is not None:
        whole(f"{prefix}seed", seed, 0, 2**64 - 1)  # torch.Generator.manual_seed's range


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0 or -1: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    return_logits: bool = False   # keep the fp32 logits each output token was sampled from
    logprobs: int | None = None   # keep each output token's logprob and the top-N alternatives

    def __post_init__(self):
        whole("max_tokens", self.max_tokens, 1)
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)
        boolean("ignore_eos", self.ignore_eos)
        boolean("return_logits", self.return_logits)
        if self.logprobs is not None:
            whole("logprobs", self.logprobs, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """Hugging Face's rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already reach top_p (the first is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator | None) -> int:
    """One token from fp32 logits [vocab] of one sequence."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def sample(logits: torch.Tensor, seqs) -> torch.Tensor:
    """Next tokens [B] (int64) from fp32 logits [B, vocab], one row per sequence: one argmax for the
    whole batch when every sequence decodes greedily without a repetition penalty."""
    if all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs):
        return logits.argmax(-1)
    return torch.tensor([sample_one(row, s.params, s.tokens, s.generator) for s, row in zip(seqs, logits)],
                        dtype=torch.long, device=logits.device)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of token (before any penalty or temperature) and its top candidates,
    from fp32 logits [vocab]."""
    logp = logits.log_softmax(-1)
    values, ids = logp.topk(min(top, logp.shape[-1]))
    return float(logp[token]), list(zip(ids.tolist(), values.tolist()))

"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step holds prefill chunks (prompt tokens, at most `max_prefill_tokens` in all, a long prompt
split over several steps) and one decode row per sequence whose prompt is done. Sequences join
while fewer than `max_batch_size` run and leave when finished, freeing their blocks. When a
sequence needs a block and none is free, the most recently admitted one is preempted: its blocks
are freed and it is recomputed from scratch later (its prompt plus what it generated so far).
"""

from collections import deque
from dataclasses import dataclass, field
from itertools import count

import torch

from pdmix.errors import PdmixError
from pdmix.runtime.kv_cache import BlockAllocator, blocks_needed
from pdmix.runtime.sampling import SamplingParams

_ids = count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # when params.return_logits
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0      # tokens whose k/v are in the cache
    num_prefill: int = 0       # tokens to run as prompt rows (prompt, or everything after a preemption)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # (token logprob, [(id, logprob)] top) per output token

    def __post_init__(self):
        self.num_prefill = len(self.prompt_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prefill

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Plan:
    prefill: list[tuple[Sequence, int]]  # (sequence, tokens in this chunk)
    decode: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_prefill_tokens: int):
        self.allocator, self.block_size = allocator, block_size
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0
        self._scheduled: set[int] = set()

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a sequence that could not fit in the whole cache even alone."""
        longest = prompt_len + max_tokens
        if blocks_needed(longest, self.block_size) > self.allocator.num_blocks:
            raise PdmixError(f"a sequence of up to {longest} tokens (prompt + max_tokens) does not fit in the KV cache "
                             f"({self.allocator.num_blocks} blocks of {self.block_size} tokens)")

    def add(self, seq: Sequence) -> None:
        self.check(len(seq.prompt_ids), seq.params.max_tokens)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        self._scheduled = set()  # ids of sequences in this step: never preempted for it
        decode = self._schedule_decode()
        prefill = self._schedule_prefill()
        return Plan(prefill, decode)

    def _schedule_decode(self) -> list[Sequence]:
        decode = []
        for seq in list(self.running):
            if seq in self.running and not seq.prefilling and self._reserve_or_preempt(seq, seq.num_computed + 1):
                decode.append(seq)
        return decode

    def _schedule_prefill(self) -> list[tuple[Sequence, int]]:
        budget, chunks = self.max_prefill_tokens, []
        for seq in list(self.running):  # chunks of prompts already under way come first
            if budget and seq in self.running and seq.prefilling:
                n = min(seq.num_prefill - seq.num_computed, budget)
                if self._reserve_or_preempt(seq, seq.num_computed + n):
                    chunks.append((seq, n))
                    budget -= n
        while budget and self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            n = min(seq.num_prefill - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                break
            self.running.append(self.waiting.popleft())
            self._scheduled.add(seq.id)
            chunks.append((seq, n))
            budget -= n
        return chunks

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for its first num_tokens tokens; False (nothing taken) if too few are free."""
        more = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if more > self.allocator.num_free:
            return False
        if more > 0:
            seq.block_table += self.allocator.allocate(more)
        return True

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Reserve, preempting the latest admitted sequence not yet in this step (seq itself last)."""
        while not self._reserve(seq, num_tokens):
            victim = [s for s in self.running if s.id not in self._scheduled][-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self._scheduled.add(seq.id)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed, seq.num_prefill = 0, len(seq.tokens)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is (running or waiting) and free its blocks."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def abort(self, seq: Sequence) -> None:
        self.finish(seq, "abort")

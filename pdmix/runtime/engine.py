"""One step of continuous batching: schedule, lay out the rows, run the model, sample, advance.

Rows of a step are prefill chunks first, then one decode row per decoding sequence, so a single
RowSplit(n_prefill) sends prompt rows down the dynamic path and decode rows down the static one.
"""

import time
from dataclasses import dataclass

import torch

from pdmix.errors import PdmixError
from pdmix.models.linear import RowSplit
from pdmix.models.model import CausalLM
from pdmix.runtime import tp as tpm
from pdmix.runtime.attention import PagedAttention, SeqRows, StepMetadata, build_metadata
from pdmix.runtime.kv_cache import KVCache, blocks_needed, token_slots
from pdmix.runtime.sampling import SamplingParams, sample, token_logprobs
from pdmix.runtime.scheduler import Plan, Scheduler, Sequence
from pdmix.runtime.tp import TP


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: StepMetadata
    sample_rows: list[int]       # rows whose logits pick a next token
    sample_seqs: list[Sequence]  # the sequence of each of those rows


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0   # steps with decode rows only (a mixed step counts as prefill time)
    prefill_cpu_s: float = 0.0  # CPU time of this process (all its threads) in those steps
    decode_cpu_s: float = 0.0

    def record(self, n_prefill: int, n_decode: int, seconds: float, cpu_seconds: float) -> None:
        if n_prefill:
            self.prefill_tokens += n_prefill
            self.prefill_s += seconds
            self.prefill_cpu_s += cpu_seconds
        else:
            self.decode_tokens += n_decode
            self.decode_s += seconds
            self.decode_cpu_s += cpu_seconds


class StepRows:
    """The flattened rows of one step, appended sequence by sequence."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.ids, self.positions, self.slots = [], [], []
        self.sample: list[tuple[int, Sequence]] = []  # (row, sequence) of rows that pick a next token

    def add(self, seq: Sequence, n: int, sample: bool) -> SeqRows:
        """Rows for seq's next n tokens; with sample, the last of them picks seq's next token."""
        start = seq.num_computed
        rows = SeqRows(len(self.ids), n, start, seq.block_table)
        self.ids += seq.tokens[start:start + n]
        self.positions += range(start, start + n)
        self.slots += token_slots(seq.block_table, self.block_size, start, start + n)
        if sample:
            self.sample.append((len(self.ids) - 1, seq))
        return rows


def prefill_rows(plan: Plan, rows: StepRows) -> list[SeqRows]:
    # a chunk that completes the prompt samples the first new token from its last row
    return [rows.add(seq, n, sample=seq.num_computed + n == seq.num_prefill) for seq, n in plan.prefill]


def decode_rows(plan: Plan, rows: StepRows) -> list[SeqRows]:
    return [rows.add(seq, 1, sample=True) for seq in plan.decode]


def prepare(plan: Plan, block_size: int, device: torch.device) -> Batch:
    rows = StepRows(block_size)
    prefill, decode = prefill_rows(plan, rows), decode_rows(plan, rows)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    meta = build_metadata(as_tensor(rows.slots), prefill, decode, block_size, device)
    return Batch(as_tensor(rows.ids), as_tensor(rows.positions), meta,
                 [r for r, _ in rows.sample], [s for _, s in rows.sample])


class Engine:
    def __init__(self, model: CausalLM, cache: KVCache, scheduler: Scheduler, eos_ids: list[int],
                 quant_mode: str = "pdmix", tp: TP = TP(), device: torch.device = torch.device("cpu")):
        self.model, self.cache, self.scheduler = model, cache, scheduler
        self.eos_ids, self.quant_mode, self.tp, self.device = set(eos_ids), quant_mode, tp, device
        self.stats = Stats()

    def run(self, seqs: list[Sequence]) -> None:
        """Run sequences to completion (they join and leave the batch as the scheduler sees fit)."""
        for s in seqs:
            self.scheduler.check(len(s.prompt_ids), s.params.max_tokens)  # all or none join
        for s in seqs:
            self.scheduler.add(s)
        while self.scheduler.has_work():
            self.step()

    def step(self) -> list[Sequence]:
        """One forward over the scheduled rows; returns the sequences that finished."""
        start, cpu_start = time.perf_counter(), time.process_time()
        plan = self.scheduler.schedule()
        if not plan:
            raise PdmixError("scheduler made no progress (KV cache too small for the batch?)")
        batch = prepare(plan, self.cache.block_size, self.device)
        n_prefill = batch.meta.n_prefill
        logits = self.model.logits(self.forward(batch, RowSplit(n_prefill, self.quant_mode))[batch.sample_rows])
        tokens = self.sample(batch.sample_seqs, logits)
        for seq, n in plan.prefill:
            seq.num_computed += n
        for seq in plan.decode:
            seq.num_computed += 1
        finished = [seq for seq, token, row in zip(batch.sample_seqs, tokens, logits) if self.append(seq, token, row)]
        self.stats.record(n_prefill, len(plan.decode), time.perf_counter() - start, time.process_time() - cpu_start)
        return finished

    def forward(self, batch: Batch, split: RowSplit) -> torch.Tensor:
        return self.model(batch.input_ids, batch.positions, PagedAttention(self.cache, batch.meta), split)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        return tpm.broadcast(sample(logits, seqs), self.tp).tolist()

    def append(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        seq.output_ids.append(token)
        if seq.params.return_logits:
            seq.logits.append(logits.cpu())
        if seq.params.logprobs is not None:
            seq.logprobs.append(token_logprobs(logits, token, seq.params.logprobs))
        reason = ("stop" if token in self.eos_ids and not seq.params.ignore_eos else
                  "length" if len(seq.output_ids) >= seq.params.max_tokens else None)
        if reason:
            self.scheduler.finish(seq, reason)
        return reason is not None

    def score(self, token_ids: list[int], n_prefill: int, mode: str) -> torch.Tensor:
        """fp32 logits [T, vocab] of one sequence in one forward: rows [0, n_prefill) as prompt rows,
        the rest as decode rows (static quantization is per tensor, so teacher-forcing them in one
        forward equals decoding them one by one)."""
        seq = Sequence(list(token_ids), SamplingParams(max_tokens=1))
        need = blocks_needed(len(seq.prompt_ids), self.cache.block_size)
        if need > self.cache.allocator.num_free:
            raise PdmixError(f"{len(token_ids)} tokens need {need} KV cache blocks, {self.cache.allocator.num_free} free")
        seq.block_table = self.cache.allocator.allocate(need)
        try:
            batch = prepare(Plan([(seq, len(seq.prompt_ids))], []), self.cache.block_size, self.device)
            return self.model.logits(self.forward(batch, RowSplit(n_prefill, mode)))
        finally:
            self.cache.allocator.free(seq.block_table)

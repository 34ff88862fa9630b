"""The online engine: one thread steps pdmix's engine while requests join and leave the batch.

The HTTP side (asyncio) hands requests and cancellations to the engine thread through an inbox.
A sequence joins the batch only once the KV cache can hold it at its longest (prompt + max_tokens)
next to those already admitted; until then it queues. The scheduler could admit more and preempt
when the cache runs out, but a preempted sequence is recomputed with its generated tokens as prompt
rows (dynamic quantization) and so continues differently than it would have alone; reserving keeps
every answer equal to the same request run alone. Before every step the thread turns the inbox
into commands (add a sequence, abort one, stop), which
under tensor parallelism rank 0 broadcasts so that every rank applies the same commands and runs
the same schedule (`follow` is the loop of the other ranks). After every step each request gets
its new text through an asyncio queue.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import torch.distributed as dist

from pdmix.runtime.kv_cache import blocks_needed
from pdmix.runtime.sampling import SamplingParams, make_generator
from pdmix.runtime.scheduler import Sequence
from pdmix.serving.detokenizer import TextStream
from pdmix.serving.metrics import Metrics
from pdmix.serving.protocol import ApiError

log = logging.getLogger("pdmix.serve")
_request_ids = count()
HEARTBEAT_S = 2.0  # idle ranks hear from rank 0 this often (a collective never waits long enough to time out)


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list  # (logprob, [(id, logprob)]) per token, when asked for


@dataclass
class Finished:
    index: int
    reason: str             # stop | length | abort
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class Choice:
    """One sequence of a request: a prompt and its sampling parameters, and how far it was reported."""
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    seq: Sequence | None = None
    admitted: bool = False  # in the engine (else queued for KV cache room)
    sent: int = 0           # output tokens already reported
    first_token_at: float = 0.0

    def blocks(self, block_size: int) -> int:
        return blocks_needed(len(self.prompt_ids) + self.params.max_tokens, block_size)


@dataclass(eq=False)
class Request:
    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_request_ids))
    arrived: float = field(default_factory=time.perf_counter)

    def push(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Lockstep:
    """What every rank runs alike: apply a step's commands, then step the engine."""

    def __init__(self, llm, group=None):
        self.llm, self.engine, self.scheduler = llm, llm.engine, llm.engine.scheduler
        self.group = group  # a gloo group for the commands under torchrun, None in one process
        self.seqs: dict[tuple[int, int], Sequence] = {}

    def sync(self, cmds: list | None) -> list:
        """Rank 0's commands on every rank."""
        if self.group is None:
            return cmds
        box = [cmds]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def apply(self, cmds: list) -> bool:
        """Add and abort sequences; True on the stop command."""
        for cmd in cmds:
            if cmd[0] == "add":
                _, key, ids, params = cmd
                seq = self.seqs[key] = Sequence(ids, params, make_generator(params, self.llm.device))
                self.scheduler.add(seq)
            elif cmd[0] == "abort":
                seq = self.seqs.pop(cmd[1], None)
                if seq is not None and not seq.finished:
                    self.scheduler.abort(seq)
            elif cmd[0] == "stop":
                return True
        return False

    def step(self) -> None:
        try:
            self.engine.step()
        except Exception:
            for seq in self.seqs.values():  # the batch is lost; free it so the engine can go on
                if not seq.finished:
                    self.scheduler.abort(seq)
            self.seqs.clear()
            raise
        self.seqs = {k: s for k, s in self.seqs.items() if not s.finished}


def follow(llm, group) -> None:
    """The loop of ranks other than 0: rank 0's commands, then the same step, until told to stop."""
    lock = Lockstep(llm, group)
    while not lock.apply(lock.sync(None)):
        if lock.scheduler.has_work():
            try:
                lock.step()
            except Exception:
                log.exception("engine step failed")


class OnlineEngine:
    """Rank 0's engine thread, and the thread-safe calls the HTTP side makes on it."""

    def __init__(self, llm, tokenizer, metrics: Metrics, group=None):
        self.lock, self.tokenizer, self.metrics = Lockstep(llm, group), tokenizer, metrics
        self.cond = threading.Condition()  # an RLock: begin_shutdown runs in a signal handler
        self.inbox: list[tuple] = []
        self.choices: dict[tuple[int, int], tuple[Request, Choice]] = {}  # queued or admitted, by sequence key
        self.queue: deque[tuple[int, int]] = deque()  # keys waiting for KV cache room, first come first served
        self.reserved = 0  # KV blocks the admitted choices may grow into
        self.pending: list[tuple] = []  # commands the engine thread gave itself (aborts at a stop string)
        self.deadline: float | None = None  # set by begin_shutdown: abort what is still running then
        self.thread = threading.Thread(target=self._run, name="pdmix-engine", daemon=True)
        self.alive = False

    # --- called from the HTTP side -------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self.thread.start()

    def new_stream(self, stop: list[str]) -> TextStream:
        return TextStream(self.tokenizer, stop)

    def submit(self, request: Request) -> None:
        with self.cond:
            if self.deadline is not None or not self.alive:
                raise ApiError(503, "the server is shutting down" if self.alive else "the engine is not running")
            self.inbox.append(("submit", request))
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        with self.cond:
            self.inbox.append(("cancel", request))
            self.cond.notify()

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no new requests; let the running ones finish for grace_s, then abort them."""
        with self.cond:
            if self.deadline is None:
                self.deadline = time.monotonic() + grace_s
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.inbox.append(("stop",))
            self.cond.notify()
        self.thread.join()

    # --- the engine thread -----------------------------------------------------------------
    def _take(self) -> list[tuple]:
        with self.cond:
            waited = time.monotonic()
            while not (self.inbox or self.pending or self.queue or self.lock.scheduler.has_work() or self._overdue()):
                if self.lock.group is not None and time.monotonic() - waited >= HEARTBEAT_S:
                    break
                self.cond.wait(HEARTBEAT_S if self.deadline is None else 0.05)
            inbox, self.inbox = self.inbox, []
        return inbox

    def _overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline and bool(self.choices)

    def _commands(self, inbox: list[tuple]) -> list[tuple]:
        cmds, self.pending = self.pending, []
        for item in inbox:
            if item[0] == "submit":
                req = item[1]
                for c in req.choices:
                    self.choices[(req.id, c.index)] = (req, c)
                    self.queue.append((req.id, c.index))
            elif item[0] == "cancel":  # the client is gone: nothing to report
                for c in item[1].choices:
                    key = (item[1].id, c.index)
                    if key in self.choices:
                        cmds += self._drop(key, "cancelled")
            else:
                cmds.append(item)
        if self._overdue():
            for key, (req, c) in list(self.choices.items()):
                cmds += self._drop(key, "abort")
                req.push(Finished(c.index, "abort", c.sent))
        return cmds + self._admit()

    def _admit(self) -> list[tuple]:
        cmds, allocator, bs = [], self.lock.scheduler.allocator, self.lock.scheduler.block_size
        while self.queue:
            req, c = self.choices[self.queue[0]]
            if self.reserved + c.blocks(bs) > allocator.num_blocks:
                break
            key = self.queue.popleft()
            c.admitted, self.reserved = True, self.reserved + c.blocks(bs)
            cmds.append(("add", key, c.prompt_ids, c.params))
            self.metrics.prompt_tokens.inc(len(c.prompt_ids))
        return cmds

    def _drop(self, key, reason: str) -> list[tuple]:
        """Forget a choice (finished, cancelled, aborted); the engine command that goes with it."""
        _, c = self.choices.pop(key)
        self.metrics.finished.labels(reason).inc()
        if not c.admitted:
            self.queue.remove(key)
            return []
        self.reserved -= c.blocks(self.lock.scheduler.block_size)
        return [("abort", key)]

    def _run(self) -> None:
        try:
            while True:
                cmds = self.lock.sync(self._commands(self._take()))
                if self.lock.apply(cmds):
                    return
                for cmd in cmds:
                    if cmd[0] == "add" and cmd[1] in self.choices:
                        self.choices[cmd[1]][1].seq = self.lock.seqs[cmd[1]]
                if self.lock.scheduler.has_work():
                    self._step()
                self.metrics.engine_state(self.lock.scheduler, self.lock.engine.stats, len(self.queue))
        except Exception:
            log.exception("the engine thread failed")
            for req, _ in list(self.choices.values()):
                req.push(Failed("the engine failed"))
            self.choices.clear()
        finally:
            self.alive = False

    def _step(self) -> None:
        running = [(key, req, c) for key, (req, c) in self.choices.items() if c.seq is not None]
        before = {key: (c.seq.num_computed, len(c.seq.output_ids)) for key, _, c in running}
        try:
            self.lock.step()
        except Exception as e:  # the batch is lost (Lockstep freed it); queued requests go on
            log.exception("engine step failed")
            for key, req, c in running:
                self._drop(key, "error")
                req.push(Failed(f"engine step failed: {e.__class__.__name__}"))
            return
        now = time.perf_counter()
        advanced = sum(c.seq.num_computed > before[k][0] or len(c.seq.output_ids) > before[k][1] for k, _, c in running)
        self.metrics.step_sequences.observe(advanced)
        for key, req, c in running:
            self._report(key, req, c, now)

    def _report(self, key, req: Request, c: Choice, now: float) -> None:
        seq = c.seq
        n = len(seq.output_ids)
        if n == c.sent:
            return
        if not c.sent:
            c.first_token_at = now
            self.metrics.ttft.observe(now - req.arrived)
        self.metrics.generation_tokens.inc(n - c.sent)
        text = c.text.add(seq.output_ids)
        if seq.finished:
            text += c.text.finish(seq.output_ids)
        req.push(Delta(c.index, text, seq.output_ids[c.sent:n], seq.logprobs[c.sent:n]))
        c.sent = n
        if c.text.stopped or seq.finished:
            if n > 1:
                self.metrics.tpot.observe((now - c.first_token_at) / (n - 1))
            reason = "stop" if c.text.stopped else seq.finish_reason
            abort = self._drop(key, reason)
            if not seq.finished:  # cut at a stop string: the engine drops it before the next step
                self.pending += abort
            req.push(Finished(c.index, reason, n))

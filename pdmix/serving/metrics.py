"""Prometheus metrics of the online engine (served at /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("pdmix_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("pdmix_requests_waiting", "sequences waiting for a batch slot or KV cache room",
                             registry=r)
        self.kv_used = Gauge("pdmix_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("pdmix_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.preemptions = Gauge("pdmix_preemptions", "sequences preempted (recomputed) so far", registry=r)
        self.prefill_rate = Gauge("pdmix_prefill_tokens_per_second", "prompt tokens per second of prefill time",
                                  registry=r)
        self.decode_rate = Gauge("pdmix_decode_tokens_per_second", "output tokens per second of decode-only steps",
                                 registry=r)
        self.prompt_tokens = Counter("pdmix_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("pdmix_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("pdmix_request_choices_finished", "finished choices by reason", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("pdmix_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdmix_time_per_output_token_seconds", "mean time between output tokens of a choice",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.step_sequences = Histogram("pdmix_step_sequences", "sequences that advanced in one engine step",
                                        buckets=BATCH_BUCKETS, registry=r)

    def engine_state(self, scheduler, stats, queued: int) -> None:
        allocator = scheduler.allocator
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting) + queued)
        self.kv_used.set(allocator.num_blocks - allocator.num_free)
        self.kv_total.set(allocator.num_blocks)
        self.preemptions.set(scheduler.num_preemptions)
        if stats.prefill_s:
            self.prefill_rate.set(stats.prefill_tokens / stats.prefill_s)
        if stats.decode_s:
            self.decode_rate.set(stats.decode_tokens / stats.decode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

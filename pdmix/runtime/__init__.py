"""The inference runtime: checkpoint loading, paged KV cache, continuous batching, tensor parallelism."""

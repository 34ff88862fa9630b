"""`pdmix serve`: an OpenAI-compatible HTTP server on pdmix's own engine (continuous batching)."""

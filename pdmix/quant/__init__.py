"""The offline pipeline: float Hugging Face checkpoint -> W8A8_MIX checkpoint."""

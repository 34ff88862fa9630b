"""Layer definitions shared by the quantizer's calibration and the runtime (Llama, Qwen2, Qwen3)."""

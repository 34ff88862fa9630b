"""Quantization schemes: one module per scheme holds everything an engine must know about it
(tensor layout, stored encodings, derived parameters, tensor-parallel sharding), so pdmix's
runtime, `inspect`, the quantizer and the vLLM plugin read one definition."""

"""Tensor parallelism 2 under vLLM's CPU backend (SPEC §8: column-parallel layers shard every
per-channel tensor with the weight; row-parallel layers keep quant_bias on rank 0 only)."""

import pytest
import torch
from test_plugin import vllm_logprobs


@pytest.mark.parametrize("name,path", [("llama-pdmix", "dynamic"), ("llama-pdmix", "static"), ("qwen3_moe-pdmix", "pdmix")])
def test_tp2_matches_tp1(name, path, checkpoints, engines, monkeypatch):
    """Teacher-forced logprobs of TP=1 and TP=2 agree to the bf16 rounding of the all-reduce (a
    bias counted on both ranks, or sharded scales, would move them by tenths). MoE experts shard
    their intermediate dimension; each rank quantizes its part of the down_proj input per token
    with its own scale, as vLLM's int8 MoE does, so the bound is the mean one."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory
    engines.close()
    monkeypatch.setenv("PDMIX_VLLM_MODE", path)  # before the workers are spawned: they read it
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (2-core machine, one NUMA node)
    ids = torch.randint(0, 512, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    got = {}
    for tp in (1, 2):
        llm = LLM(str(checkpoints(name)), enforce_eager=True, max_model_len=512, tensor_parallel_size=tp,
                  distributed_executor_backend="mp", enable_prefix_caching=False)
        try:
            got[tp] = vllm_logprobs(llm, ids)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            cleanup_dist_env_and_memory()
    diff = (got[1] - got[2]).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())

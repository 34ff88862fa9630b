"""Which token rows of the running forward are prefill rows (dynamic path) and which decode rows
(static path), read from vLLM's forward context.

vLLM's CPU backend neither orders decodes first nor tells the metadata which requests are
prefilling, so the rule is derived from what every attention backend's metadata holds
(query_start_loc, seq_lens): a request's rows are prefill rows when it brings more than one new
token (a prompt or a chunk of one) or when all its tokens are new (a one-token prompt). A last
prompt chunk of exactly one token, after earlier chunks, is indistinguishable from a decode step
and takes the static path. Forwards without metadata (warm-up, profiling) run dynamic.

`parts` turns the rows into what a layer runs: each path's rows as one slice when they are
contiguous (vLLM's GPU runner orders decode requests first; its CPU runner keeps arrival order,
so a step is often [decodes, prompt] or [prompt, decodes]), so a layer reads and writes them in
place; only rows of both kinds interleaved more than that are gathered by index.
"""

import os

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

MODE_ENV = "PDMIX_VLLM_MODE"
MODES = ("pdmix", "dynamic", "static")


def mode() -> str:
    """PDMIX_VLLM_MODE: 'pdmix' (default, per row), or 'dynamic'/'static' to force one path for
    every row (for comparison). Read at every forward, so it can change while an engine runs."""
    m = os.environ.get(MODE_ENV, "pdmix")
    if m not in MODES:
        raise ValueError(f"pdmix: {MODE_ENV}={m!r}; expected one of {', '.join(MODES)}")
    return m


Rows = slice | torch.Tensor  # a contiguous block, or row indices


def parts(num_rows: int) -> list[tuple[bool, Rows]]:
    """[(prefill?, rows), ...] covering every row once: (True = dynamic path, False = static).
    Computed once per forward (the first layer) and kept in the forward context."""
    m = mode()
    if m != "pdmix" or num_rows == 0:
        return [(m != "static", slice(0, num_rows))]
    ctx = get_forward_context() if is_forward_context_available() else None
    cached = getattr(ctx, "_pdmix_parts", None)
    if cached is not None and cached[0] == num_rows:
        return cached[1]
    prefill = prefill_rows(num_rows)
    if prefill is None:
        result = [(True, slice(0, num_rows))]
    else:
        flags = prefill.cpu()
        switches = (flags[1:] != flags[:-1]).nonzero().flatten().tolist()
        if len(switches) <= 1:
            bounds = [0, *(i + 1 for i in switches), num_rows]
            result = [(bool(flags[a]), slice(a, b)) for a, b in zip(bounds, bounds[1:])]
        else:
            result = [(True, prefill.nonzero().flatten()), (False, (~prefill).nonzero().flatten())]
    if ctx is not None:
        ctx._pdmix_parts = (num_rows, result)
    return result


def prefill_rows(num_rows: int) -> torch.Tensor | None:
    """bool [num_rows]: True for prefill rows; None when the forward has no attention metadata."""
    if not is_forward_context_available():
        return None
    ctx = get_forward_context()
    meta = ctx.attn_metadata
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    if not meta:
        return None
    m = next(iter(meta.values()))
    start, seq_lens = m.query_start_loc, m.seq_lens
    num_reqs = seq_lens.shape[0]
    q_lens = (start[1:num_reqs + 1] - start[:num_reqs]).to(seq_lens.device)
    prefill = (q_lens > 1) | (seq_lens == q_lens)
    rows = torch.repeat_interleave(prefill, q_lens)
    out = torch.zeros(num_rows, dtype=torch.bool, device=rows.device)
    n = min(num_rows, rows.shape[0])  # rows past the real tokens are padding
    out[:n] = rows[:n]
    return out

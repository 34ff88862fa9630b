"""The decoder stack as one torch.compile graph (opt-in: `LLM(compile=True)`, `--compile`), as vLLM
compiles its models: linears' GEMMs and attention stay opaque ops, everything between them (norms,
rotary, residuals, W8A8 quantization and epilogues) is fused by Inductor, and the Python cost of
about a hundred small ops per layer goes.

Outputs are bit for bit the eager engine's (tested): Inductor rounds intermediates as eager does
(`emulate_precision_casts`), float GEMMs stay eager (`pdmix::linear`), and W8A8 layers run their
backend's graph form (`apply_masked`). Attention reads the step's paged-attention callable from
`_step`, set around each call, since its metadata changes every step.

One graph serves every decode step: the row count is symbolic, and Dynamo's guards are skipped,
since checking a few thousand module attributes cost about 1.5 ms a step. That is safe because each
model compiles its own copy of the function (Dynamo keeps graphs on the code object), the graph has
no breaks (`fullgraph`), it is first traced on two rows (not specialized to one), and what it reads
from Python (layer indices, norm eps, shapes) never changes after loading; what changes per step
(which rows are prompt rows) comes in as a tensor. Inductor's on-disk cache makes a second start
faster than the first.
"""

import sys
import types

import torch
import torch.fx.experimental._config as fx_config

from pdmix.errors import PdmixError
from pdmix.models.linear import FloatLinear, RowSplit, W8A8MixLinear
from pdmix.models.model import CausalLM, run_layers
from pdmix.models.moe import SparseMoE

_step = {"attn": None}


@torch.library.custom_op("pdmix::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """The current step's attention of one layer (writes the layer's new k/v into the cache)."""
    return _step["attn"](layer, q, k, v).contiguous()


@paged_attention.register_fake
def _(q, k, v, layer):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def graph_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.pdmix.paged_attention(q, k, v, layer)


def graph_layers(layers, norm, x, cos, sin, dynamic):
    return run_layers(layers, norm, x, cos, sin, graph_attention, dynamic)


def unsupported(model: CausalLM) -> str | None:
    """Why the model's stack cannot be compiled (None if it can)."""
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE):
            return f"{name} is a MoE block, whose rows are grouped by expert into data-dependent shapes"
        if isinstance(m, W8A8MixLinear) and not hasattr(m.kernel, "apply_masked"):
            return f"{m.name or name} runs on the {m.kernel.name} kernel, which has no graph form (use --kernel onednn)"
        if isinstance(m, (W8A8MixLinear, FloatLinear)) and m.row_parallel:
            return "tensor-parallel shards all-reduce inside their linears"
    return None


class CompiledDecoder:
    """Stands in for `run_layers` on one model. Steps with prompt rows run eager: the graph quantizes
    every row both ways, which costs more than eager's per-op overhead saves once prompts are long
    (10% slower at 512 tokens). The graph is built at the first decode step with `min_rows` rows: one
    traced on a single row would be specialized to it (and, with guards skipped, reused wrongly)."""

    def __init__(self, min_rows: int):
        own = types.FunctionType(graph_layers.__code__.replace(), graph_layers.__globals__, "graph_layers")
        # fullgraph: a graph break would leave resume functions shared by every layer, unsafe unguarded
        self.fn = torch.compile(own, dynamic=True, fullgraph=True, options={
            "emulate_precision_casts": True, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
        self.min_rows, self.compiled, self.failed = min_rows, False, False

    def __call__(self, layers, norm, x, cos, sin, attn, split):
        split = split or RowSplit(x.shape[0], "dynamic")
        eager = split.dynamic_rows(x.shape[0]) or self.failed or (not self.compiled and x.shape[0] < self.min_rows)
        if eager:
            return run_layers(layers, norm, x, cos, sin, attn, split)
        if not self.compiled:
            print("pdmix: compiling the decoder stack (about a minute on first start; cached after)",
                  file=sys.stderr, flush=True)
            try:
                out = self.graph(layers, norm, x, cos, sin, attn, split)
            except Exception as e:  # no C++ compiler, an unsupported platform: stay correct, just slower
                self.failed = True
                print(f"pdmix: warning: compiling failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                      "the decoder stack runs eager", file=sys.stderr, flush=True)
                return run_layers(layers, norm, x, cos, sin, attn, split)
            self.compiled = True
            return out
        return self.graph(layers, norm, x, cos, sin, attn, split)

    def graph(self, layers, norm, x, cos, sin, attn, split):
        _step["attn"] = attn
        try:
            with fx_config.patch(backed_size_oblivious=True):
                return self.fn(layers, norm, x, cos, sin, split.dynamic_mask(x.shape[0], x.device))
        finally:
            _step["attn"] = None


def compile_decoder(model: CausalLM, max_batch_size: int) -> None:
    why = unsupported(model)
    if why:
        raise PdmixError(f"--compile: cannot compile this model: {why}")
    model.decoder = CompiledDecoder(min(2, max_batch_size))
    model.decode_stack = None  # what was asked for: decode steps through the graph, not the C stack

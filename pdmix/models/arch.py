"""The decoder architectures pdmix runs, each described once (as llm-compressor's mapping registries
do). Checkpoint checks, the quantizer (calibration groups, smoothing, rollback), the loader, tensor
parallelism and the benchmarks derive what they need from here.

Llama, Qwen2 and Qwen3 share one decoder layer; they differ in q/k/v biases and q/k norms.
Qwen3-MoE is Qwen3 whose sparse layers replace the MLP by a float router (`mlp.gate`) and experts
(`mlp.experts.E.{gate,up,down}_proj`, the dense MLP's linears at `moe_intermediate_size`); its MLP
linears, experts and dense ones alike, are W8A8_DYNAMIC (msModelSlim's `"*.mlp.*": "w8a8_dynamic"`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Linear:
    name: str      # Hugging Face name inside its block: "q_proj"
    block: str     # "self_attn" or "mlp"
    group: str     # its input group: linears reading one input share static activation parameters,
    #                fuse into one GEMM and roll back together (SPEC §7)
    parallel: str  # tensor parallelism (SPEC §8): "column" shards outputs, "row" shards inputs
    out_dim: str   # [out, in] as dimensions of the config: "q", "kv", "hidden" or "inter"
    in_dim: str


@dataclass(frozen=True)
class SmoothEdge:
    """Where smoothing moves an input group's per-channel scales: into the tensor that produces it."""
    group: str     # the input group smoothed
    producer: str  # the tensor whose output channels are that input, e.g. "input_layernorm"
    shift: bool    # whether the producer can absorb a per-channel shift
    heads: bool    # producer channels are v channels shared by grouped query heads


@dataclass(frozen=True)
class Architecture:
    name: str        # config.json's "architectures" entry
    model_type: str  # config.json's "model_type"
    qkv_bias: bool   # q/k/v biases by design
    qk_norm: bool    # RMSNorm on q and k per head
    moe: bool = False  # sparse layers: router + experts; MLP linears W8A8_DYNAMIC (docs/moe.md)


LINEARS = (
    Linear("q_proj", "self_attn", "qkv", "column", "q", "hidden"),
    Linear("k_proj", "self_attn", "qkv", "column", "kv", "hidden"),
    Linear("v_proj", "self_attn", "qkv", "column", "kv", "hidden"),
    Linear("o_proj", "self_attn", "o", "row", "hidden", "q"),
    Linear("gate_proj", "mlp", "gate_up", "column", "inter", "hidden"),
    Linear("up_proj", "mlp", "gate_up", "column", "inter", "hidden"),
    Linear("down_proj", "mlp", "down", "row", "hidden", "inter"),
)
SMOOTH_EDGES = (
    SmoothEdge("qkv", "input_layernorm", shift=True, heads=False),
    SmoothEdge("o", "self_attn.v_proj", shift=True, heads=True),
    SmoothEdge("gate_up", "post_attention_layernorm", shift=True, heads=False),
    SmoothEdge("down", "mlp.up_proj", shift=False, heads=False),
)
ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", qkv_bias=False, qk_norm=False),
    Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False),
    Architecture("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qkv_bias=False, qk_norm=True, moe=True),
)}
BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}

# derived
LINEAR_NAMES = tuple(lin.name for lin in LINEARS)
BY_NAME = {lin.name: lin for lin in LINEARS}
GROUPS = {g: tuple(lin.name for lin in LINEARS if lin.group == g) for g in dict.fromkeys(lin.group for lin in LINEARS)}
INPUT_GROUPS = tuple(GROUPS.values())  # (("q_proj", "k_proj", "v_proj"), ("o_proj",), ...)


def linear_prefix(layer: int, name: str) -> str:
    """HF name of a decoder-layer linear, e.g. model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{BY_NAME[name].block}.{name}"


ROUTER = "mlp.gate"  # a sparse layer's router, [num_experts, hidden], always float


def expert_prefix(layer: int, expert: int, name: str) -> str:
    """HF name of an expert linear, e.g. model.layers.3.mlp.experts.7.down_proj."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{name}"


def is_sparse(cfg, layer: int) -> bool:
    """Whether a layer routes to experts (Qwen3-MoE: not in mlp_only_layers, every decoder_sparse_step-th)."""
    return cfg.num_experts > 0 and layer not in cfg.mlp_only_layers and (layer + 1) % cfg.decoder_sparse_step == 0


def layer_linears(cfg, layer: int) -> list[tuple[str, Linear]]:
    """(HF name, Linear) of every linear of a decoder layer, experts included (not the router)."""
    out = [(linear_prefix(layer, lin.name), lin) for lin in LINEARS if not (lin.block == "mlp" and is_sparse(cfg, layer))]
    if is_sparse(cfg, layer):
        out += [(expert_prefix(layer, e, lin.name), lin) for e in range(cfg.num_experts) for lin in LINEARS
                if lin.block == "mlp"]
    return out


def static_groups(cfg) -> tuple[tuple[str, ...], ...]:
    """The input groups quantized W8A8_MIX (static ranges observed, smoothed, rolled back by score):
    all of them, or a MoE model's attention groups only (its MLP linears are W8A8_DYNAMIC)."""
    moe = ARCHITECTURES[cfg.arch].moe
    return tuple(g for g in INPUT_GROUPS if not (moe and BY_NAME[g[0]].block == "mlp"))


def is_dynamic_linear(cfg, prefix: str) -> bool:
    """Whether a linear takes the W8A8_DYNAMIC scheme (MoE models' MLP linears) rather than W8A8_MIX."""
    return ARCHITECTURES[cfg.arch].moe and ".mlp." in prefix


def dims(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
    """The sizes a linear's shape is written in (`Linear.out_dim`, `in_dim`)."""
    return {"hidden": hidden_size, "inter": intermediate_size, "q": num_heads * head_dim, "kv": num_kv_heads * head_dim}


def config_dims(cfg, layer: int | None = None) -> dict[str, int]:
    """dims of the config; of a sparse layer, "inter" is the experts' moe_intermediate_size."""
    inter = cfg.moe_intermediate_size if layer is not None and is_sparse(cfg, layer) else cfg.intermediate_size
    return dims(cfg.hidden_size, inter, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)


def linear_shape(d: dict[str, int], name: str) -> tuple[int, int]:
    """[out, in] of a decoder-layer linear, from `dims`."""
    lin = BY_NAME[name]
    return d[lin.out_dim], d[lin.in_dim]


def group_shape(d: dict[str, int], group: str) -> tuple[int, int]:
    """[out, in] of an input group's linears fused into one (outputs concatenated)."""
    shapes = [linear_shape(d, n) for n in GROUPS[group]]
    return sum(s[0] for s in shapes), shapes[0][1]


def smooth_consumers(edge: SmoothEdge) -> tuple[str, ...]:
    """The linears an edge smooths, as names inside the layer ("self_attn.q_proj", ...)."""
    return tuple(f"{BY_NAME[n].block}.{n}" for n in GROUPS[edge.group])

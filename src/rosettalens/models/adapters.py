"""One table of architecture facts: where each hook point lives in a Hugging Face module tree.

Nothing here re-implements a model. An :class:`Adapter` names module paths (relative to the
top-level ``*ForCausalLM`` module, or to one decoder layer) and a few facts; ``hooks.py`` turns them
into PyTorch hooks.

Conventions (stated once, tested in ``tests/test_hooks.py``):

* ``resid_pre.L`` is the input of decoder layer ``L``; ``resid_pre.0`` equals HF ``hidden_states[0]``.
* ``resid_post.L`` is the output of decoder layer ``L``, always before the final norm. It equals HF
  ``hidden_states[L + 1]`` for ``L < n_layers - 1``; HF's last entry ``hidden_states[n_layers]`` is
  ``final_norm(resid_post.{n_layers - 1})``.
* ``attn_out.L`` / ``mlp_out.L`` are what is *added to the residual stream*: for Gemma 2/3 that is the
  output of ``post_attention_layernorm`` / ``post_feedforward_layernorm``, for the others the output of
  the attention / MLP module.
* ``resid_mid.L`` = ``resid_pre.L + attn_out.L`` (absent for parallel-residual models such as Pythia).
* ``head_z.L`` is the input of the attention output projection, ``[batch, pos, n_heads, d_head]``.
* ``q.L``/``k.L``/``v.L`` are the projections before rotary embeddings and q/k norms;
  ``k``/``v`` have ``n_kv_heads`` heads (GQA groups are never silently repeated).
* ``embed`` is the output of the token-embedding module (Gemma 3 scales inside that module;
  GPT-2 and Pythia add nothing else except GPT-2's position embedding, which ``resid_pre.0`` includes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnknownModelError
from ..names import LAYER_HOOKS, hook_name


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: str  # path of the ModuleList of decoder layers
    embed: str  # token embedding module
    final_norm: str
    lm_head: str
    attn: str  # attention module, relative to a layer
    o_proj: str  # attention output projection, relative to a layer
    mlp: str
    attn_out: str  # module whose output is added to the residual (relative to a layer)
    mlp_out: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_fused: str | None = None  # fused projection module, relative to a layer
    qkv_layout: str | None = None  # "gpt2": [q | k | v] blocks; "neox": per head [q k v]
    parallel_residual: bool = False
    embed_scale: str = "none"  # "none" | "sqrt_d_model (inside the embedding module)"
    post_block_norms: bool = False  # Gemma 2/3: attention/MLP outputs normed before the add


_LLAMA_LIKE: dict[str, Any] = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    attn_out="self_attn",
    mlp_out="mlp",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
)
_GEMMA_LIKE: dict[str, Any] = dict(
    _LLAMA_LIKE,
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    post_block_norms=True,
    embed_scale="sqrt_d_model",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(family="llama", **_LLAMA_LIKE),
    "mistral": Adapter(family="mistral", **_LLAMA_LIKE),
    "qwen2": Adapter(family="qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter(family="qwen3", **_LLAMA_LIKE),
    "gemma2": Adapter(family="gemma2", **_GEMMA_LIKE),
    "gemma3": Adapter(family="gemma3", **_GEMMA_LIKE),
    "gpt2": Adapter(
        family="gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        o_proj="attn.c_proj",
        mlp="mlp",
        attn_out="attn",
        mlp_out="mlp",
        qkv_fused="attn.c_attn",
        qkv_layout="gpt2",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        attn="attention",
        o_proj="attention.dense",
        mlp="mlp",
        attn_out="attention",
        mlp_out="mlp",
        qkv_fused="attention.query_key_value",
        qkv_layout="neox",
    ),
}

# HF config.model_type -> adapter family
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True)
class ModelConfig:
    """Facts about a hooked model, read from its HF config (never hard-coded)."""

    name: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    hook_points: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "vocab_size": self.vocab_size,
            "hook_points": list(self.hook_points),
        }


def adapter_for(hf_config) -> Adapter:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise UnknownModelError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(_MODEL_TYPES))}"
        )
    adapter = ADAPTERS[_MODEL_TYPES[model_type]]
    if adapter.family == "gpt_neox":
        parallel = bool(getattr(hf_config, "use_parallel_residual", True))
        if parallel != adapter.parallel_residual:
            from dataclasses import replace

            adapter = replace(adapter, parallel_residual=parallel)
    return adapter


def model_config(hf_config, name: str) -> ModelConfig:
    adapter = adapter_for(hf_config)
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    points: list[str] = ["embed"]
    for layer in range(n_layers):
        for kind in LAYER_HOOKS:
            if kind == "resid_mid" and adapter.parallel_residual:
                continue
            points.append(hook_name(kind, layer))
    points.append("logits")
    return ModelConfig(
        name=name,
        family=adapter.family,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        vocab_size=int(cfg.vocab_size),
        hook_points=tuple(points),
    )

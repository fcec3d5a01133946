"""Where each supported architecture keeps its parts, keyed by ``config.model_type``.

An adapter only *locates* modules; it never re-implements a forward. Adding an architecture means adding
one `Layout` here (plus a tiny test config in ``conf/model/tiny_<family>.yaml``). Paths are attribute paths
from the ``*ForCausalLM`` object (``model.layers``) or from a decoder layer (``self_attn.o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Attribute paths of one architecture family.

    Attributes:
        layers: the ``nn.ModuleList`` of decoder layers.
        final_norm: the norm applied after the last layer.
        embeddings: input embedding modules (token, and learned positions for OPT).
        attn: the attention module inside a layer.
        attn_norm: the norm feeding attention (pre-norm).
        attn_out: the attention output projection.
        mlp_norm: the norm feeding the MLP; ``None`` when attention and MLP share ``attn_norm`` (Phi-2).
        mlp_in: the MLP input projections (read the normed hidden state).
        mlp_out: the MLP output projection.
        parallel_blocks: attention and MLP read the same normed input and are added together (Phi-2).
    """

    layers: str
    final_norm: str
    embeddings: tuple[str, ...]
    attn: str
    attn_norm: str
    attn_out: str
    mlp_norm: str | None
    mlp_in: tuple[str, ...]
    mlp_out: str
    parallel_blocks: bool = False


# LLaMA, Mistral and Qwen2/Qwen3 share one layout; their differences (qkv bias, q/k norm, sliding window,
# GQA) live in the HF config and need no code here.
LLAMA_LIKE = Layout(
    layers="model.layers",
    final_norm="model.norm",
    embeddings=("model.embed_tokens",),
    attn="self_attn",
    attn_norm="input_layernorm",
    attn_out="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
)

# OPT keeps its MLP linears directly on the decoder layer and learns position embeddings.
OPT = Layout(
    layers="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    attn="self_attn",
    attn_norm="self_attn_layer_norm",
    attn_out="self_attn.out_proj",
    mlp_norm="final_layer_norm",
    mlp_in=("fc1",),
    mlp_out="fc2",
)

# Phi-2: one input_layernorm feeds attention and MLP in parallel; out = x + attn(n(x)) + mlp(n(x)).
PHI = Layout(
    layers="model.layers",
    final_norm="model.final_layernorm",
    embeddings=("model.embed_tokens",),
    attn="self_attn",
    attn_norm="input_layernorm",
    attn_out="self_attn.dense",
    mlp_norm=None,
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",
    parallel_blocks=True,
)

LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "opt": OPT,
    "phi": PHI,
}

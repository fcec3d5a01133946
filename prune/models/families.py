"""The one table of supported architectures, keyed by ``config.model_type``: HF classes and part paths.

An adapter only *locates* modules; it never re-implements a forward. Adding an architecture means adding
one `Layout` to `LAYOUTS` (plus a tiny test config in ``conf/model/tiny_<family>.yaml``); every other module
(adapters, sub-block removal, width pruning, the exported model types) reads the family from here. Paths are
attribute paths from the ``*ForCausalLM`` object (``model.layers``) or from a decoder layer
(``self_attn.o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Every supported family names its attention input projections so.
QKV_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class Layout:
    """One architecture family: its HF classes and the attribute paths of its parts.

    Attributes:
        hf_name: the prefix of its classes in ``transformers`` (``"Llama"``: ``LlamaConfig``,
            ``LlamaForCausalLM``).
        layers: the ``nn.ModuleList`` of decoder layers.
        final_norm: the norm applied after the last layer.
        embeddings: input embedding modules (token, and learned positions for OPT).
        attn_norm: the norm feeding attention (pre-norm).
        attn_out: the attention output projection.
        mlp_norm: the norm feeding the MLP; ``None`` when attention and MLP share ``attn_norm`` (Phi-2).
        mlp_in: the MLP input projections (read the normed hidden state).
        mlp_out: the MLP output projection.
        attn: the attention module inside a layer.
        attn_in: the attention input projections (q, k, v; read the normed hidden state).
        parallel_blocks: attention and MLP read the same normed input and are added together (Phi-2).
    """

    hf_name: str
    layers: str
    final_norm: str
    embeddings: tuple[str, ...]
    attn_norm: str
    attn_out: str
    mlp_norm: str | None
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn: str = "self_attn"
    attn_in: tuple[str, ...] = QKV_PROJ
    parallel_blocks: bool = False

    @property
    def config_class(self) -> str:
        return f"{self.hf_name}Config"

    @property
    def model_class(self) -> str:
        return f"{self.hf_name}ForCausalLM"

    def hf_classes(self) -> tuple[type, type]:
        """(config class, causal-LM class) of the family in ``transformers`` (imported on first use)."""
        import transformers

        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)


def _llama_like(hf_name: str) -> Layout:
    """LLaMA, Mistral and Qwen2/Qwen3 share one layout; their differences (qkv bias, q/k norm, sliding
    window, GQA) live in the HF config and need no code here."""
    return Layout(
        hf_name, layers="model.layers", final_norm="model.norm", embeddings=("model.embed_tokens",),
        attn_norm="input_layernorm", attn_out="self_attn.o_proj",
        mlp_norm="post_attention_layernorm", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    )


LAYOUTS: dict[str, Layout] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    # OPT keeps its MLP linears directly on the decoder layer and learns position embeddings.
    "opt": Layout(
        "OPT", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        attn_norm="self_attn_layer_norm", attn_out="self_attn.out_proj",
        mlp_norm="final_layer_norm", mlp_in=("fc1",), mlp_out="fc2",
    ),
    # Phi-2: one input_layernorm feeds attention and MLP in parallel; out = x + attn(n(x)) + mlp(n(x)).
    "phi": Layout(
        "Phi", layers="model.layers", final_norm="model.final_layernorm", embeddings=("model.embed_tokens",),
        attn_norm="input_layernorm", attn_out="self_attn.dense",
        mlp_norm=None, mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", parallel_blocks=True,
    ),
}

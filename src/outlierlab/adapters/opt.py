"""OPT: LayerNorm, separate q/k/v/out_proj, ReLU FFN (fc1 -> act -> fc2) at the layer level.

Most OPT models are pre-norm (``do_layer_norm_before``); OPT-350m is post-norm, where the norms act on the
residual stream after each add: they then get ``*.post_norm`` positions and the q/k/v input is the residual.
"""

from __future__ import annotations

from . import register
from .base import MLP_ALIASES, Adapter, LinearSpec, NormSpec, Position, pos


@register
class OPTAdapter(Adapter):
    model_types = ("opt",)
    ffn_kind = "mlp"
    layers_paths = ("model.decoder.layers",)
    final_norm_paths = ("model.decoder.final_layer_norm",)
    embed_paths = ("model.decoder.embed_tokens",)
    position_embedding_paths = ("model.decoder.embed_positions",)
    residual_projection_paths = ("model.decoder.project_in", "model.decoder.project_out")
    #: the decoder layer reshapes the FFN part to [batch * tokens, C]
    flat_positions = frozenset({"mlp.in", "mlp.norm", "mlp.fc1", "mlp.act", "mlp.down_in", "mlp.out"})

    @property
    def pre_norm(self) -> bool:
        return bool(getattr(self.config, "do_layer_norm_before", True))

    def positions(self) -> list[Position]:
        a = MLP_ALIASES
        if self.pre_norm:
            attn_head = [
                pos("attn.in", "self_attn_layer_norm", "input", doc="residual stream into the layer"),
                pos("attn.norm", "self_attn_layer_norm", doc="norm output = q/k/v input"),
            ]
            ffn_head = [
                pos("mlp.in", "final_layer_norm", "input", aliases=a, doc="residual stream into the FFN"),
                pos("mlp.norm", "final_layer_norm", aliases=a),
            ]
        else:
            attn_head = [pos("attn.in", "self_attn.q_proj", "input", doc="residual stream = q/k/v input")]
            ffn_head = [pos("mlp.in", "fc1", "input", aliases=a, doc="normalized residual = fc1 input")]
        tail = [pos("attn.post_norm", "self_attn_layer_norm", doc="post-norm after the attention add")]
        return [
            *attn_head,
            pos("attn.q", "self_attn.q_proj"),
            pos("attn.k", "self_attn.k_proj"),
            pos("attn.v", "self_attn.v_proj"),
            pos("attn.ctx", "self_attn.out_proj", "input", doc="attention context = out_proj input"),
            pos("attn.out", "self_attn.out_proj"),
            *([] if self.pre_norm else tail),
            *ffn_head,
            pos("mlp.fc1", "fc1", aliases=a),
            pos("mlp.act", "activation_fn", aliases=a, doc="act(fc1): MAs first appear here"),
            pos("mlp.down_in", None, aliases=a, same_as="mlp.act", doc="the same tensor as mlp.act"),
            pos("mlp.out", "fc2", aliases=a),
            pos("block.out", "", aliases=a, doc="residual stream after the layer"),
        ]

    def norms(self) -> list[NormSpec]:
        if self.pre_norm:
            return [
                NormSpec("attn.norm", "self_attn_layer_norm", "attn.norm", ("q", "k", "v")),
                NormSpec("mlp.norm", "final_layer_norm", "mlp.norm", ("fc1",)),
            ]
        return [
            NormSpec("attn.post_norm", "self_attn_layer_norm", "attn.post_norm", ("fc1",)),
            NormSpec("block.out", "final_layer_norm", "block.out", ()),
        ]

    def linears(self) -> list[LinearSpec]:
        attn_in = "attn.norm" if self.pre_norm else "attn.in"
        return [
            LinearSpec("q", "self_attn.q_proj", attn_in, "attn.q"),
            LinearSpec("k", "self_attn.k_proj", attn_in, "attn.k"),
            LinearSpec("v", "self_attn.v_proj", attn_in, "attn.v"),
            LinearSpec("o", "self_attn.out_proj", "attn.ctx", "attn.out"),
            LinearSpec("fc1", "fc1", "mlp.norm" if self.pre_norm else "mlp.in", "mlp.fc1"),
            LinearSpec("fc2", "fc2", "mlp.down_in", "mlp.out"),
        ]

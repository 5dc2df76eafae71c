"""What an architecture adapter declares: the operator positions and the weights of one decoder layer.

An adapter never patches a model's forward. It names, relative to a decoder layer, the module whose input or
output *is* each canonical position (``attn.norm``, ``mlp.down_in``...), plus the norms (with their gain
convention) and the linear weights (with their storage layout). Tracing, explanation and mitigation all read
these declarations, so adding a model family is adding one file in this package (see docs/adding-a-model.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

Select = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Capture:
    """Where a position's tensor is read: the ``input`` (first argument) or ``output`` of a submodule.

    ``module`` is relative to the decoder layer; ``""`` is the layer itself. ``select`` cuts a part out of the
    captured tensor (for fused projections such as GPT-2's ``c_attn``).
    """

    module: str
    kind: str = "output"
    select: Select | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("input", "output"):
            raise ValueError(f"Capture.kind must be 'input' or 'output', not {self.kind!r}")


@dataclass(frozen=True)
class Position:
    """A named operator position inside a decoder layer.

    ``alias`` is the paper's name (``y1``..``y8`` for SwiGLU/GeGLU FFNs, ``y1``..``y6`` for plain GeLU FFNs).
    ``same_as`` marks a position that is the very same tensor as another one (the FFN input of a parallel
    block is the attention input); it shares that position's statistics instead of being traced twice.
    """

    name: str
    capture: Capture | None = None
    alias: str | None = None
    same_as: str | None = None
    doc: str = ""


@dataclass(frozen=True)
class NormSpec:
    """A normalization layer: its module, the position of its output, and its gain convention.

    The effective per-channel gain is ``weight + gain_offset`` (Gemma stores ``gamma - 1``, so its offset
    is 1). ``consumers`` are the linear roles that read the norm's output (for gain folding).
    """

    name: str
    module: str
    output_position: str | None
    consumers: tuple[str, ...] = ()
    gain_offset: float = 0.0


@dataclass(frozen=True)
class LinearSpec:
    """A linear weight of the layer, by role (``q``, ``k``, ``v``, ``qkv``, ``o``, ``gate``, ``up``,
    ``gate_up``, ``down``, ``fc1``, ``fc2``), with its input position and storage layout.

    ``transposed`` is True for GPT-2's ``Conv1D`` (weight stored as ``[in, out]``).
    """

    role: str
    module: str
    input_position: str
    output_position: str | None = None
    transposed: bool = False


class Adapter:
    """Base class of the per-family adapters. Subclasses fill the class attributes and ``positions()``."""

    #: HF ``config.model_type`` values handled by this adapter.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``"glu"`` (SwiGLU / GeGLU: gate, up, act, down) or ``"mlp"`` (plain fc1 -> act -> fc2).
    ffn_kind: ClassVar[str] = "glu"
    #: attribute paths tried, in order, to find the list of decoder layers.
    layers_paths: ClassVar[tuple[str, ...]] = ("model.layers",)
    final_norm_paths: ClassVar[tuple[str, ...]] = ("model.norm",)
    embed_paths: ClassVar[tuple[str, ...]] = ("model.embed_tokens",)
    #: True when the tensors at token t depend on tokens 0..t only (a causal decoder): a forward that reads
    #: the rows of some tokens may then stop the window after the last of them (see ``causal_prefix``).
    causal: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers_path = self._first_path(self.layers_paths)

    def causal_prefix(self, ids: torch.Tensor, last_token: int) -> torch.Tensor:
        """``ids`` (``[..., T]``) cut after ``last_token`` when the model is causal: the rows of tokens up to
        it are what the whole window gives them, for ``last_token + 1`` tokens of compute instead of T."""
        return ids[..., :last_token + 1] if self.causal else ids

    # -- structure -------------------------------------------------------------------------------------
    def _first_path(self, paths: tuple[str, ...]) -> str:
        for path in paths:
            try:
                self.model.get_submodule(path)
                return path
            except AttributeError:
                continue
        raise AttributeError(f"{type(self).__name__}: none of {paths} exists in {type(self.model).__name__}")

    #: True when each layer's input is exactly the previous layer's output (``attn.in`` of layer L is
    #: ``block.out`` of layer L - 1), so the profiler traces that tensor once.
    residual_chain: ClassVar[bool] = True
    #: the attention module of a layer (relative path): the KV cache is quantized around its attention call.
    attention_module: ClassVar[str] = "self_attn"
    #: learned absolute position embeddings added to the residual stream (GPT-2's ``transformer.wpe``).
    position_embedding_paths: ClassVar[tuple[str, ...]] = ()
    #: projections of the residual stream between the embeddings, the layers and the head (OPT's
    #: ``project_in`` / ``project_out`` when ``word_embed_proj_dim != hidden_size``); None where absent.
    residual_projection_paths: ClassVar[tuple[str, ...]] = ()
    #: norms on the branch outputs before the residual add (sandwich norms, Gemma 2/3): branch -> module.
    branch_output_norms: ClassVar[dict[str, str]] = {}
    #: positions whose tensors the family flattens to ``[batch * tokens, C]`` (OPT's FFN).
    flat_positions: ClassVar[frozenset[str]] = frozenset()

    @property
    def parallel(self) -> bool:
        """True when attention and FFN read the same input (GPT-NeoX, Phi)."""
        return False

    @property
    def pre_norm(self) -> bool:
        """False for post-norm layouts (OPT-350m), where a norm's output is the residual stream itself."""
        return True

    def _existing(self, paths: tuple[str, ...]) -> list[nn.Module]:
        out = []
        for path in paths:
            try:
                out.append(self.model.get_submodule(path))
            except AttributeError:
                continue
        return [m for m in out if m is not None]

    def position_embeddings(self) -> list[nn.Module]:
        """The learned position embeddings that write into the residual stream (none for RoPE families)."""
        return self._existing(self.position_embedding_paths)

    def residual_projections(self) -> list[nn.Module]:
        """Projections of the residual stream outside the layers (empty for almost every model)."""
        return self._existing(self.residual_projection_paths)

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].get_submodule(self.attention_module)

    def branch_norm(self, layer: int, branch: str) -> nn.Module | None:
        """The norm on ``branch``'s (``"attn"`` / ``"mlp"``) output before the residual add, if the family has one."""
        path = self.branch_output_norms.get(branch)
        return None if path is None else self.layers()[layer].get_submodule(path)

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def layer_name(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def positions(self) -> list[Position]:
        """The positions of one decoder layer, in execution order."""
        raise NotImplementedError

    def norms(self) -> list[NormSpec]:
        return []

    def linears(self) -> list[LinearSpec]:
        return []

    def final_norm(self) -> nn.Module | None:
        try:
            return self.model.get_submodule(self._first_path(self.final_norm_paths))
        except AttributeError:
            return None

    def final_norm_offset(self) -> float:
        norms = self.norms()
        return norms[0].gain_offset if norms else 0.0

    # -- weights ---------------------------------------------------------------------------------------
    def linear_weight(self, layer: int, spec: LinearSpec) -> torch.Tensor:
        """The weight of a linear as ``[out_features, in_features]`` (a view; never modified here)."""
        w = self.layers()[layer].get_submodule(spec.module).weight
        return w.t() if spec.transposed else w

    def norm_gain(self, layer: int, spec: NormSpec) -> torch.Tensor | None:
        """The effective per-channel gain of a norm (``weight + gain_offset``), or None without a weight."""
        w = getattr(self.layers()[layer].get_submodule(spec.module), "weight", None)
        if w is None:
            return None
        return w.detach().float() + spec.gain_offset

    # -- helpers for subclasses ------------------------------------------------------------------------
    def position_names(self) -> list[str]:
        return [p.name for p in self.positions()]

    def describe(self) -> dict:
        """JSON-able summary of the layout, written into every report."""
        return {
            "adapter": type(self).__name__,
            "ffn_kind": self.ffn_kind,
            "parallel": self.parallel,
            "layers_path": self.layers_path,
            "positions": [
                {"name": p.name, "alias": p.alias, "same_as": p.same_as, "doc": p.doc} for p in self.positions()
            ],
            "norms": [
                {"name": n.name, "module": n.module, "gain_offset": n.gain_offset, "consumers": list(n.consumers)}
                for n in self.norms()
            ],
            "linears": [{"role": s.role, "module": s.module, "input": s.input_position} for s in self.linears()],
            "pre_norm": self.pre_norm,
            "attention_module": self.attention_module,
            "branch_output_norms": dict(self.branch_output_norms),
            "flat_positions": sorted(self.flat_positions),
        }


def split_last(start: int, stop: int) -> Select:
    """A ``select`` that keeps ``[..., start:stop]`` of the last dimension."""

    def select(x: torch.Tensor) -> torch.Tensor:
        return x[..., start:stop]

    select.__qualname__ = f"split_last({start}, {stop})"
    return select


# Shared position sets. Attention side first, then the FFN; the paper's aliases follow the FFN type.
GLU_ALIASES = {
    "mlp.in": "y1",
    "mlp.norm": "y2",
    "mlp.gate": "y3",
    "mlp.up": "y4",
    "mlp.act": "y5",
    "mlp.down_in": "y6",
    "mlp.out": "y7",
    "block.out": "y8",
}
MLP_ALIASES = {
    "mlp.in": "y1",
    "mlp.norm": "y2",
    "mlp.fc1": "y3",
    "mlp.act": "y4",
    "mlp.down_in": "y4",
    "mlp.out": "y5",
    "block.out": "y6",
}


def pos(name: str, module: str | None, kind: str = "output", select: Select | None = None, *,
        aliases: dict[str, str] | None = None, same_as: str | None = None, doc: str = "") -> Position:
    """Short constructor used by the adapter files."""
    alias = (aliases or {}).get(name)
    capture = None if module is None else Capture(module, kind, select)
    return Position(name=name, capture=capture, alias=alias, same_as=same_as, doc=doc)

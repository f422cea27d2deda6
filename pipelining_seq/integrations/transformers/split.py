"""Pipeline stages of a Hugging Face ``*ForCausalLM``: :func:`split_causal_lm`.

A stage holds a contiguous run of the decoder's layers (stage 0 also the token
embedding, the last stage also the final norm and the output head) and the rotary
embedding (no parameters). Its modules are the model's own objects under the model's
own names (``model.embed_tokens.weight``, ``model.layers.2.self_attn.q_proj.weight``,
``lm_head.weight``: the layers sit in a ``ModuleDict`` keyed by their original index), so
``stage.load_state_dict({k: full[k] for k in stage.state_dict()})`` loads a Hugging Face
checkpoint by name, and each gradient maps back to the model's parameter of the same
name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import chunk_inputs, enable, text_config

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLMStage", "split_causal_lm", "stage_layers"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoders with the Llama module layout whose stages :func:`split_causal_lm` builds (tested)."""


def stage_layers(n_layers: int, n_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[range]:
    """The layer range of every stage: ``layers_per_stage`` counts, or an even split
    (earlier stages take the remainder)."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages={n_stages!r}: must be a positive integer")
    if layers_per_stage is None:
        if n_layers < n_stages:
            raise ValueError(
                f"cannot split {n_layers} layers over n_stages={n_stages}: every stage needs at least one layer"
            )
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    else:
        counts = list(layers_per_stage)
        if len(counts) != n_stages:
            raise ValueError(
                f"layers_per_stage={counts} has {len(counts)} entries but n_stages={n_stages}: give one count per stage"
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(f"layers_per_stage={counts}: every stage needs a positive integer number of layers")
        if sum(counts) != n_layers:
            raise ValueError(
                f"layers_per_stage={counts} sums to {sum(counts)} but the model has {n_layers} layers "
                "(config.num_hidden_layers): make them agree"
            )
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


class CausalLMStage(nn.Module):
    """One pipeline stage of a Llama-layout ``*ForCausalLM`` (see :func:`split_causal_lm`).

    ``forward(x, *, document_ids=None, position_ids=None)``: ``x`` is ``input_ids``
    ``[batch, seq]`` on the first stage and hidden states ``[batch, seq, hidden]`` on
    the others; the last stage returns logits ``[batch, seq, vocab]``, the others hidden
    states. Without ``position_ids`` the positions are the chunk's absolute ones
    (:func:`~pipelining_seq.chunk_positions`); ``position_ids`` in Hugging Face's packed
    form (restarting per document) also give the document mask, unless
    ``document_ids`` are passed too.
    """

    def __init__(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        prefix = model.base_model_prefix
        base = getattr(model, prefix)
        body = nn.Module()
        if first:
            body.embed_tokens = base.embed_tokens
        body.layers = nn.ModuleDict({str(i): base.layers[i] for i in layers})
        body.rotary_emb = base.rotary_emb
        if last:
            body.norm = base.norm
        self.add_module(prefix, body)
        self._body = prefix
        if last:
            self.lm_head = model.lm_head
        self.is_first, self.is_last = first, last
        self.layer_ids = list(layers)
        self.config = model.config

    def forward(self, x: torch.Tensor, *, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        body = getattr(self, self._body)
        h = body.embed_tokens(x) if self.is_first else x
        batch, seq = h.shape[0], h.shape[1]
        pos, docs = chunk_inputs(batch, seq, h.device, position_ids, document_ids)
        if pos is None:  # outside a pipeline: the whole sequence
            pos = torch.arange(seq, device=h.device).unsqueeze(0)
        kwargs: dict[str, Any] = {} if docs is None else {"document_ids": docs}
        rope = body.rotary_emb(h, position_ids=pos)
        for layer in body.layers.values():
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope, use_cache=False, **kwargs)
            if isinstance(h, tuple):
                h = h[0]
        if self.is_last:
            h = self.lm_head(body.norm(h))
        return h

    def extra_repr(self) -> str:
        return f"layers={self.layer_ids[0]}..{self.layer_ids[-1]}, first={self.is_first}, last={self.is_last}"


def split_causal_lm(model: nn.Module, stage_index: int, n_stages: int, *,
                    layers_per_stage: Sequence[int] | None = None) -> nn.Module:
    """The stage module ``stage_index`` of ``n_stages`` of a Hugging Face ``*ForCausalLM``.

    Calls :func:`~pipelining_seq.integrations.transformers.enable` on ``model`` (in
    place) and returns a :class:`CausalLMStage` sharing the model's modules, for
    :class:`~pipelining_seq.SequencePipelineStage`. ``layers_per_stage``: the number of
    decoder layers of each stage (default: an even split, earlier stages taking the
    remainder). Parameter names are the model's own (``model.state_dict()``'s keys).

    Supported: the Llama module layout of :data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral,
    Qwen2, Qwen3). Input embeddings tied to the output head are refused across stages
    (the two would live on different ranks).
    """
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"split_causal_lm supports model types {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r} "
            f"({type(model).__name__}); enable(model) still makes it chunk-aware for a stage split by hand"
        )
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, n)]
    if base is None or missing or not hasattr(model, "lm_head"):
        raise ValueError(
            f"{type(model).__name__} does not have the *ForCausalLM layout split_causal_lm needs "
            f"(model.{prefix}.embed_tokens/layers/norm/rotary_emb and model.lm_head; missing {missing or ['lm_head']})"
        )
    ranges = stage_layers(len(base.layers), n_stages, layers_per_stage)
    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 0 <= stage_index < n_stages:
        raise ValueError(f"stage_index={stage_index!r}: must be in 0..{n_stages - 1} (n_stages={n_stages})")
    if n_stages > 1 and model.lm_head.weight is base.embed_tokens.weight:
        raise ValueError(
            "config.tie_word_embeddings=True: the output head shares the input embedding's weight, which "
            "split_causal_lm would place on the first and the last stage; untie them "
            "(tie_word_embeddings=False) or run one stage"
        )
    enable(model)
    return CausalLMStage(model, ranges[stage_index], first=stage_index == 0, last=stage_index == n_stages - 1)

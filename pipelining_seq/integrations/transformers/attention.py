"""Chunk-aware attention for Hugging Face transformers models: :func:`enable`.

transformers dispatches every attention module's softmax through a registry
(``transformers.AttentionInterface``): ``fn(module, q, k, v, attention_mask, scaling=,
dropout=, **kwargs)`` with q/k/v ``[batch, heads, seq, head_dim]`` after RoPE, K/V heads
not repeated, returning ``([batch, seq, heads, head_dim], weights)``. :func:`enable`
registers :func:`chunked_attention_forward` there under :data:`IMPLEMENTATION`, selects it
on the model, and gives every attention module its own
:class:`~pipelining_seq.ChunkedCausalAttention` (the registry function is shared by all
layers; the instance is the key of the layer's K/V cache), with the module's ``scaling``
and sliding window. A forward pre-hook on the decoder supplies what HF would get wrong
inside a sequence chunk:

* positions: HF uses ``arange`` of what it is given, the chunk's local positions; inside
  a chunk the hook passes :func:`~pipelining_seq.chunk_positions` (absolute) instead;
* packed documents: HF derives the block mask from ``position_ids`` that restart per
  document, but builds no mask for an implementation it does not know; the hook turns
  such ``position_ids`` into ``document_ids = chunk_positions(S) - position_ids``
  (constant inside a document), and ``document_ids=`` given directly pass through;
* an ``attention_mask`` with padding would be dropped silently by HF for this
  implementation: it is refused (an all-ones mask, as tokenizers return, is dropped).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from ...attention import ChunkedCausalAttention
from ...context import ContractError, KVCache, chunk_positions, current_chunk

__all__ = ["ATTENTION_ATTR", "IMPLEMENTATION", "chunk_inputs", "chunked_attention_forward", "enable"]

IMPLEMENTATION = "pipelining_seq_chunked"
"""The name :func:`chunked_attention_forward` is registered under in ``AttentionInterface``."""

ATTENTION_ATTR = "seq1f1b_attention"
"""The attribute of each attention module that holds its ChunkedCausalAttention."""

_HOOK_ATTR = "_seq1f1b_inputs_hook"
_LAYER_TYPES = ("full_attention", "sliding_attention")
# Last position of each (micro-batch, chunk) per stage cache: a chunk checks that its
# first position continues the previous chunk's last one in HF's packed form.
_LAST_POSITIONS: weakref.WeakKeyDictionary[KVCache, dict[tuple[int, int], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _layer_name(module: nn.Module) -> str:
    idx = getattr(module, "layer_idx", None)
    return f"{type(module).__name__}" + (f" of layer {idx}" if idx is not None else "")


def chunked_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registry function: the module's own ChunkedCausalAttention, with checks.

    Everything this function cannot honour exactly raises :class:`ContractError`."""
    attn = getattr(module, ATTENTION_ATTR, None)
    where = _layer_name(module)
    if not isinstance(attn, ChunkedCausalAttention):
        raise ContractError(
            f"{where} runs attention implementation {IMPLEMENTATION!r} but has no ChunkedCausalAttention: "
            "call pipelining_seq.integrations.transformers.enable(model) on the model that owns it"
        )
    if dropout:
        raise ContractError(
            f"{where}: attention dropout {dropout} cannot run exactly over sequence chunks: "
            "set config.attention_dropout=0.0"
        )
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ContractError(f"{where}: the attention got {name}=..., which ChunkedCausalAttention does not do")
    window = kwargs.get("sliding_window")
    if window != attn.window:
        raise ContractError(
            f"{where} asks for sliding_window={window} but enable() gave it window={attn.window}: "
            "call enable(model) again after changing the config's sliding window or layer types"
        )
    if attention_mask is not None:
        raise ContractError(
            f"{where} got an attention mask: padding and custom masks are not supported by the Seq1F1B "
            "adapter; pack documents (document_ids= or position_ids that restart per document) and mask "
            "targets with -100 instead"
        )
    if key.shape[2] != query.shape[2]:
        raise ContractError(
            f"{where}: {key.shape[2]} keys for {query.shape[2]} queries (a K/V cache from generation): the "
            "Seq1F1B adapter runs training and evaluation forwards only; pass use_cache=False"
        )
    if scaling is not None and attn.scale is not None and scaling != attn.scale:
        raise ContractError(f"{where}: scaling={scaling} but enable() took the module's scaling {attn.scale}")
    out = attn(query, key, value, document_ids=kwargs.get("document_ids"))
    return out.transpose(1, 2), None


# --------------------------------------------------------------------- chunk inputs
def _packed_document_ids(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``chunk_positions(S) - position_ids``, checked to be HF's packed form."""
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool or position_ids.dim() != 2:
        raise ContractError(
            f"position_ids must be an integer tensor [batch, seq], got {position_ids.dtype} "
            f"{tuple(position_ids.shape)}"
        )
    seq = position_ids.shape[1]
    ctx = current_chunk()
    # Documents are the runs where positions count up by one (HF's find_packed_sequence_indices).
    # index - position is constant on a run and grows where a run restarts lower; a forward
    # jump would make it fall back and could meet an earlier document's id: refused.
    step_ok = position_ids[:, 1:] - position_ids[:, :-1] <= 1
    ok = step_ok.all()
    if ctx is not None and ctx.chunk > 0:
        prev = _LAST_POSITIONS.get(ctx.cache, {}).get((ctx.microbatch, ctx.chunk - 1))
        if prev is not None and prev.shape[0] == position_ids.shape[0]:
            ok = ok & (position_ids[:, 0] - prev <= 1).all()
    if ctx is not None and not ctx.recompute:
        _LAST_POSITIONS.setdefault(ctx.cache, {})[(ctx.microbatch, ctx.chunk)] = position_ids[:, -1].detach().clone()
    if not position_ids.is_cuda:
        if not bool(ok):
            raise ContractError(
                "position_ids jump forward by more than one: in Hugging Face's packed form positions count "
                "up by one inside a document and restart (lower) where one starts; pass document_ids= "
                "(one id per token) for other layouts"
            )
    else:
        torch._assert_async(ok, "position_ids jump forward by more than one (Seq1F1B adapter: pass document_ids=)")
    ids = chunk_positions(seq, position_ids.device)[None, :] - position_ids
    return ids.expand(batch, seq) if ids.shape[0] != batch else ids


def chunk_inputs(
    batch: int, seq: int, device: torch.device, position_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(position_ids, document_ids) for a decoder forward on ``seq`` tokens.

    No ``position_ids``: the chunk's absolute positions inside a Seq1F1B unit (None
    outside, where HF's own default is right). ``position_ids`` without
    ``document_ids``: document ids derived from them (packed form)."""
    if position_ids is None:
        if current_chunk() is None:
            return None, document_ids
        return chunk_positions(seq, device).unsqueeze(0), document_ids
    if document_ids is None:
        document_ids = _packed_document_ids(position_ids, batch)
    return position_ids, document_ids


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    return {**dict(zip(names, args)), **kwargs}


def _drop_attention_mask(mask: Any) -> None:
    if mask is None:
        return
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.bool().all()):
        return  # no padding: nothing to mask
    raise ContractError(
        "attention_mask with padding (or a 4D/custom mask) is not supported by the Seq1F1B adapter: HF builds "
        "no mask for its attention implementation, so it would be ignored; pack documents instead "
        "(document_ids= or position_ids that restart per document) and mask targets with -100"
    )


def _inputs_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kw = _bind(module, args, kwargs)
    ref = kw.get("input_ids")
    if ref is None:
        ref = kw.get("inputs_embeds")
    if ref is None or ref.dim() < 2:
        return args, kwargs  # let HF report the missing inputs
    _drop_attention_mask(kw.get("attention_mask"))
    kw["attention_mask"] = None
    pos, docs = chunk_inputs(ref.shape[0], ref.shape[1], ref.device, kw.get("position_ids"), kw.get("document_ids"))
    kw["position_ids"] = pos
    if docs is not None:
        kw["document_ids"] = docs
    if current_chunk() is not None and kw.get("use_cache") is None:
        kw["use_cache"] = False  # a DynamicCache per chunk holds K/V for nothing
    return (), kw


# --------------------------------------------------------------------------- enable
def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config: pass a transformers PreTrainedModel")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF attention modules: the ones with a ``scaling`` and an ``is_causal`` attribute."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "scaling") and hasattr(m, "is_causal") and not isinstance(m, ChunkedCausalAttention)]


def _refuse(field: str, value: Any, why: str, fix: str) -> None:
    raise ContractError(f"pipelining_seq transformers adapter: {field}={value!r}: {why}; {fix}")


def _check_config(config: Any) -> None:
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        _refuse("config.attention_dropout", dropout, "attention dropout cannot run exactly over sequence chunks",
                "set it to 0.0")
    for field in ("attn_logit_softcapping", "attention_chunk_size"):
        value = getattr(config, field, None)
        if value is not None:
            _refuse(f"config.{field}", value, "ChunkedCausalAttention has no such attention variant",
                    "use a model without it")
    if getattr(config, "use_bidirectional_attention", False):
        _refuse("config.use_bidirectional_attention", True, "Seq1F1B runs causal attention only",
                "set it to False")
    if not getattr(config, "is_causal", True):
        _refuse("config.is_causal", False, "Seq1F1B runs causal attention only", "use a causal decoder")
    if getattr(config, "is_encoder_decoder", False):
        _refuse("config.is_encoder_decoder", True, "cross attention is not chunked causal attention",
                "use a decoder-only model")
    for i, kind in enumerate(getattr(config, "layer_types", None) or []):
        if kind not in _LAYER_TYPES:
            _refuse(f"config.layer_types[{i}]", kind, f"only {list(_LAYER_TYPES)} layers are supported",
                    "use a model whose attention layers are full or sliding-window causal")


def _layer_window(config: Any, module: nn.Module) -> int | None:
    """The sliding window the module will ask for (HF passes it as ``sliding_window=``)."""
    if hasattr(module, "sliding_window"):  # Qwen2/3, Gemma: None on full-attention layers
        return module.sliding_window
    layer_types = getattr(config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if layer_types and idx is not None:
        return config.sliding_window if layer_types[idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)  # Mistral: every layer


def enable(model: nn.Module) -> nn.Module:
    """Make a Hugging Face decoder Seq1F1B-ready, in place; returns ``model``.

    Registers :func:`chunked_attention_forward` with ``transformers.AttentionInterface``
    and selects it; gives every attention module its own ``ChunkedCausalAttention``
    (attribute :data:`ATTENTION_ATTR`) with the module's ``scaling`` and sliding window
    (Mistral's ``sliding_window``; Qwen2/3's ``use_sliding_window`` and
    ``max_window_layers``; ``layer_types`` with ``"sliding_attention"``); installs the
    decoder pre-hook that supplies chunk positions and packed document ids. Outside a
    pipeline the model computes what the stock model computes. Raises ContractError
    naming the config field for what it cannot run exactly: attention dropout,
    logit softcapping, attention sinks, chunked or bidirectional attention, layer types
    other than full and sliding attention, encoder-decoder models.
    """
    config = text_config(model)
    _check_config(config)
    modules = attention_modules(model)
    if not modules:
        raise ContractError(
            f"found no Hugging Face attention module (one with .scaling and .is_causal) in {type(model).__name__}"
        )
    for name, module in modules:
        if getattr(module, "sinks", None) is not None:
            _refuse(f"{name}.sinks", "<parameter>", "attention sinks are not supported", "use a model without them")
        if module.is_causal is not True:
            _refuse(f"{name}.is_causal", module.is_causal, "Seq1F1B runs causal attention only",
                    "use a causal decoder")
        window = _layer_window(config, module)
        current = getattr(module, ATTENTION_ATTR, None)
        if not (isinstance(current, ChunkedCausalAttention) and current.window == window
                and current.scale == module.scaling):
            setattr(module, ATTENTION_ATTR, ChunkedCausalAttention(scale=module.scaling, window=window))
    AttentionInterface.register(IMPLEMENTATION, chunked_attention_forward)
    model.set_attn_implementation(IMPLEMENTATION)
    decoder = getattr(model, "base_model", model)
    if getattr(decoder, _HOOK_ATTR, None) is None:
        handle = decoder.register_forward_pre_hook(_inputs_hook, with_kwargs=True)
        object.__setattr__(decoder, _HOOK_ATTR, handle)
    return model

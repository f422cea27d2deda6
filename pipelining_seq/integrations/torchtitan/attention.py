"""torchtitan's inner attentions made chunk-aware.

torchtitan 0.3's language models (llama3, qwen3, deepseek_v3, ...) call an *inner
attention* module ``inner_attention(q_BLNH, k_BLNH, v_BLNH, *, attention_masks=...,
scale=..., enable_gqa=...)`` with ``[batch, length, heads, head_dim]`` tensors:
``FlexAttention`` with a block-causal ``BlockMask`` built for the whole sequence,
``VarlenAttention`` with per-document offsets, or ``ScaledDotProductAttention`` (plain
causal). Under Seq1F1B each of them is wrong: a chunk's queries must also see the
cached keys of the micro-batch's earlier chunks.

:class:`ChunkedAttention` replaces them. It is a torchtitan ``Module`` with a nested
``Config`` (so ``verify_module_protocol``, ``build()`` and the sharding declarations of
``set_gqa_inner_attention_local_map`` apply unchanged: its positional arguments keep the
names ``q_BLNH, k_BLNH, v_BLNH``) and calls :class:`pipelining_seq.ChunkedCausalAttention`
in ``[batch, heads, seq, head_dim]``. Outside a Seq1F1B stage it is the same attention on
the whole sequence, so a baseline run with another schedule can use it too.

Document masks: the model part gets a forward pre-hook (:func:`install_chunk_inputs_hook`)
that turns torchtitan's ``positions`` input (which restarts at 0 at every packed document)
into per-token document ids for the chunk it is running, ``absolute index - position``
(the index of the document's first token), and passes them down as ``attention_masks``.
The same hook supplies the chunk's absolute RoPE positions when the data has none.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import (
    BaseAttention,
    FlexAttention,
    ScaledDotProductAttention,
    VarlenAttention,
)
from torchtitan.models.common.decoder import Decoder
from torchtitan.protocols.module import Module

from ... import _compat
from ...attention import ChunkedCausalAttention
from ...context import ContractError, chunk_positions, current_chunk

__all__ = [
    "ChunkedAttention",
    "SUPPORTS_DOCUMENT_IDS",
    "UnsupportedAttentionError",
    "convert_attention",
    "install_chunk_inputs_hook",
    "uses_document_masking",
]

logger = logging.getLogger(__name__)

# ``ChunkedCausalAttention()(q, k, v, *, document_ids=...)`` (block-causal masks across
# chunks) arrives with the real-data work; until then document masking is refused.
SUPPORTS_DOCUMENT_IDS = "document_ids" in inspect.signature(ChunkedCausalAttention.forward).parameters

_KNOWN = (FlexAttention.Config, VarlenAttention.Config, ScaledDotProductAttention.Config)


class UnsupportedAttentionError(ValueError):
    """A model's attention cannot be made chunk-aware; raised at start-up."""


class ChunkedAttention(Module):
    """Inner attention for torchtitan models, exact under Seq1F1B sequence chunks."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        document_masking: bool = False
        """Block-causal over packed documents (ids from the ``attention_masks`` input)."""
        backend: str = "auto"
        """``ChunkedCausalAttention`` backend."""
        replaces: str = ""
        """The torchtitan inner attention this one stands in for (for messages)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.document_masking = config.document_masking
        self.replaces = config.replaces
        # The kernel is parameter-free and keyed by instance (its K/V cache entry); kept
        # out of the module tree because torchtitan's verify_module_protocol accepts
        # only its own Module subclasses there.
        object.__setattr__(self, "_impl", ChunkedCausalAttention(backend=config.backend))

    def extra_repr(self) -> str:
        return f"document_masking={self.document_masking}, replaces={self.replaces or '-'}"

    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: Any = None,
        scale: float | None = None,
        enable_gqa: bool = False,
        is_causal: bool = True,
        out_transform: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if out_transform is not None or not is_causal:
            raise ContractError(
                f"ChunkedAttention (replacing {self.replaces or 'the inner attention'}) got "
                f"{'out_transform' if out_transform is not None else 'is_causal=False'}: only causal "
                "attention without an LSE epilogue is chunk-aware"
            )
        doc = None
        if attention_masks is not None:
            if not isinstance(attention_masks, torch.Tensor):
                raise ContractError(
                    f"ChunkedAttention got attention_masks of type {type(attention_masks).__name__}: "
                    "the model part's chunk-input hook did not run; call "
                    "pipelining_seq.integrations.torchtitan.enable(config) before config.build()"
                )
            if self.document_masking:
                doc = attention_masks
        dq, dv = q_BLNH.shape[-1], v_BLNH.shape[-1]
        eff_scale = scale if scale is not None else dq**-0.5
        impl = self._impl
        if impl.scale != eff_scale:
            impl.scale = eff_scale
        q, k, v = q_BLNH.transpose(1, 2), k_BLNH.transpose(1, 2), v_BLNH.transpose(1, 2)
        # MLA: value heads narrower (or wider) than query/key heads. Zero columns change
        # neither the scores nor the other output columns, so pad and slice back.
        if dv < dq:
            v = F.pad(v, (0, dq - dv))
        elif dv > dq:
            q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
        out = impl(q, k, v) if doc is None else impl(q, k, v, document_ids=doc)
        return out[..., :dv].transpose(1, 2)


def _describe(cfg: Any) -> str:
    return type(cfg).__qualname__


def _model_class(model_config: Any) -> type | None:
    return getattr(type(model_config), "_owner", None)


def convert_attention(
    model_config: Any, *, document_masking: bool = True, backend: str = "auto"
) -> list[str]:
    """Replace every inner attention of ``model_config`` with :class:`ChunkedAttention`.

    Returns the converted FQNs. Raises :class:`UnsupportedAttentionError` naming the
    module for anything it cannot convert exactly.
    """
    owner = _model_class(model_config)
    if owner is not None and issubclass(owner, Decoder) and owner.get_attention_masks is not Decoder.get_attention_masks:
        raise UnsupportedAttentionError(
            f"{owner.__qualname__} builds its own attention masks ({owner.__qualname__}.get_attention_masks, "
            "e.g. sliding-window or hybrid layers): the Seq1F1B adapter reproduces only torchtitan's "
            "causal and block-causal document masks; use another schedule for this model"
        )
    converted: list[str] = []
    for fqn, cfg, _parent, _attr in model_config.traverse(BaseAttention.Config):
        inner = cfg.inner_attention
        where = f"{fqn}.inner_attention"
        if isinstance(inner, ChunkedAttention.Config):
            continue
        if isinstance(inner, VarlenAttention.Config) and tuple(inner.window_size) != (-1, 0):
            raise UnsupportedAttentionError(
                f"{where}: VarlenAttention with window_size={inner.window_size} (sliding window) is not "
                "chunk-aware; only causal window_size=(-1, 0) is converted"
            )
        if isinstance(inner, (FlexAttention.Config, VarlenAttention.Config)):
            doc = document_masking  # torchtitan masks flex/varlen per document
        elif isinstance(inner, ScaledDotProductAttention.Config):
            doc = False
        else:
            raise UnsupportedAttentionError(
                f"{where} is {_describe(inner)}, which the Seq1F1B converter does not know: it converts "
                "FlexAttention, VarlenAttention and ScaledDotProductAttention. Make it call "
                "pipelining_seq.ChunkedCausalAttention, or use another schedule"
            )
        if doc and not SUPPORTS_DOCUMENT_IDS:
            raise UnsupportedAttentionError(
                f"{where} is {_describe(inner)} with torchtitan's block-causal document mask, but the "
                "installed pipelining_seq.ChunkedCausalAttention has no document_ids argument: upgrade "
                "pipelining_seq, or pass --seq1f1b.no-document-masking to attend across packed documents"
            )
        cfg.inner_attention = ChunkedAttention.Config(
            document_masking=doc,
            backend=backend,
            replaces=_describe(inner),
            param_init=inner.param_init,
            sharding_config=inner.sharding_config,
        )
        converted.append(where)
    check_chunk_aware(model_config)
    if not converted and not any(True for _ in model_config.traverse(ChunkedAttention.Config)):
        raise UnsupportedAttentionError(
            f"{_describe(model_config)} has no attention module the Seq1F1B converter knows "
            "(torchtitan BaseAttention with an inner attention): nothing was made chunk-aware"
        )
    return converted


def check_chunk_aware(model_config: Any) -> None:
    """Refuse attention-like configs that are not (or cannot be made) chunk-aware."""
    for fqn, cfg, _parent, _attr in model_config.traverse(Module.Config, recurse=True):
        if isinstance(cfg, (ChunkedAttention.Config, BaseAttention.Config)):
            continue
        if isinstance(cfg, _KNOWN) or "attention" in type(cfg).__qualname__.lower():
            raise UnsupportedAttentionError(
                f"{fqn or 'model'} is {_describe(cfg)}, an attention the Seq1F1B converter does not make "
                "chunk-aware (it converts the inner attention of torchtitan BaseAttention modules): "
                "it would attend within each chunk only. Use another schedule for this model"
            )


def uses_document_masking(model_config: Any) -> bool:
    return any(c.document_masking for _, c, _, _ in model_config.traverse(ChunkedAttention.Config))


def has_adapter(model_config: Any) -> bool:
    return any(True for _ in model_config.traverse(ChunkedAttention.Config))


def _chunk_inputs(module: torch.nn.Module, args: tuple, kwargs: dict, *, document_masking: bool):
    # Decoder.forward(tokens, positions=None, attention_masks=None)
    names = ("positions", "attention_masks")
    args = list(args)
    for i, name in enumerate(names, start=1):
        if len(args) > i:
            kwargs[name] = args[i]
    args = args[:1]
    positions = kwargs.get("positions")
    ctx = current_chunk()
    offset = ctx.offset if ctx is not None else 0
    doc = None
    if document_masking and positions is not None:
        index = torch.arange(offset, offset + positions.shape[-1], device=positions.device)
        # Positions count up by one inside a document and restart at 0 where one starts
        # (torchtitan's dataloaders), so index - position is the document's first index.
        step_ok = (positions[..., 1:] == positions[..., :-1] + 1) | (positions[..., 1:] == 0)
        _compat.assert_async(
            step_ok.all() & (positions[..., 0] <= offset).all(),
            "positions must restart at 0 at each document and count up by one inside it",
        )
        doc = index - positions
    if positions is None and ctx is not None and args:
        kwargs["positions"] = chunk_positions(ctx.length, device=args[0].device).unsqueeze(0)
    kwargs["attention_masks"] = doc
    return tuple(args), kwargs


def install_chunk_inputs_hook(module: torch.nn.Module, *, document_masking: bool) -> None:
    """Give a torchtitan model part per-chunk document ids and RoPE positions."""
    if getattr(module, "_seq1f1b_chunk_inputs_hook", None) is not None:
        return
    handle = module.register_forward_pre_hook(
        lambda m, a, kw: _chunk_inputs(m, a, kw, document_masking=document_masking), with_kwargs=True
    )
    object.__setattr__(module, "_seq1f1b_chunk_inputs_hook", handle)

"""The one FLOP model: what a chunk of tokens costs, and the chunks that cost the same.

Forward FLOPs of a chunk of ``s`` tokens ending at position ``P`` (a matmul of
``[n, a] x [a, b]`` counts ``2nab``), with ``H`` the hidden size, ``h`` query heads,
``g`` key/value heads, ``d_qk`` the query/key head size, ``d_v`` the value head size,
``F`` the MLP width and ``V`` the vocabulary:

* per layer and token, ``β = 2H·(h·d_qk + g·d_qk + g·d_v) + 2·h·d_v·H + 2·n_mlp·H·F``:
  the Q, K, V and output projections (grouped-query attention shrinks K and V) and the
  MLP (``n_mlp`` = 2 matrices for GELU, 3 for SwiGLU);
* per layer and query/key pair, ``α = (2·d_qk + 2·d_v + 3)·h``: QKᵀ, the softmax
  (3 per score) and AV for every query head. A causal chunk holds ``s·P − s²/2``
  pairs (its queries see the whole prefix and half of their own block);
* the output head, ``2·s·H·V``, and the embedding, which the Seq1F1B paper counts as
  a matmul of the same size: ``4·s·H·V`` together.

``chunk_cost(s, P) = 4sHV + L·[α·(sP − s²/2) + β·s]``. With multi-head attention,
``d_qk = d_v = H/h`` and a GELU MLP this is the paper's model (``α = (4d+3)h``,
``β = 8H² + 4HF``). Training FLOPs (the MFU metric) are 3 x forward, recompute not
counted. ``balanced_partition`` cuts a sequence into chunks of equal modelled cost,
last chunk first, with the closed-form smaller root of the quadratic in ``s``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from .registry import stage_layer_ranges

__all__ = [
    "FlopModel",
    "balanced_partition",
    "check_chunk_counts",
    "chunk_cost",
]

MLP_MATRICES = {"gelu": 2, "swiglu": 3}
"""Weight matrices of each MLP kind (one matmul of ``2·H·F`` per token each)."""


@dataclass(frozen=True, kw_only=True)
class FlopModel:
    """The dimensions the FLOP model needs; ``None`` head sizes and kv heads are filled in."""

    num_layers: int
    """Transformer blocks L."""
    hidden_size: int
    """Model width H."""
    num_heads: int
    """Query heads h."""
    ffn_hidden_size: int
    """MLP width F."""
    vocab_size: int
    """Vocabulary V (output head and embedding)."""
    num_kv_heads: int | None = None
    """Key/value heads g (grouped-query attention); None means num_heads."""
    mlp: str = "gelu"
    """'gelu' (two matrices) or 'swiglu' (three)."""
    head_dim: int | None = None
    """Query/key head size d_qk; None means hidden_size // num_heads."""
    v_head_dim: int | None = None
    """Value head size d_v (MLA-style models differ from d_qk); None means hidden_size // num_heads."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size",
                     "num_kv_heads", "head_dim", "v_head_dim"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1):
                raise ValueError(f"FLOP model: {name}={val!r} must be a positive integer")
            if val is not None:
                # Python ints: numpy's fixed-width integers would overflow in the products below.
                object.__setattr__(self, name, int(val))
        if self.mlp not in MLP_MATRICES:
            raise ValueError(f"FLOP model: mlp={self.mlp!r}: use 'gelu' or 'swiglu'")
        if (self.head_dim is None or self.v_head_dim is None) and self.hidden_size % self.num_heads:
            raise ValueError(
                f"FLOP model: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                "pass head_dim and v_head_dim explicitly"
            )
        # Frozen: fill the defaults in once, so every cost reads plain integers.
        default_head = self.hidden_size // self.num_heads
        object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
        object.__setattr__(self, "head_dim", self.head_dim or default_head)
        object.__setattr__(self, "v_head_dim", self.v_head_dim or default_head)

    def partition_kwargs(self) -> dict:
        """The keyword arguments of :func:`balanced_partition` / :func:`chunk_cost` for this model."""
        return asdict(self)

    # ------------------------------------------------------------------ coefficients
    @property
    def pair_flops(self) -> int:
        """α: one layer's FLOPs per (query, key) pair, all query heads (QKᵀ, softmax, AV)."""
        return (2 * self.head_dim + 2 * self.v_head_dim + 3) * self.num_heads

    @property
    def token_flops(self) -> int:
        """β: one layer's FLOPs per token outside attention scores (projections and MLP)."""
        h, q, g = self.hidden_size, self.num_heads, self.num_kv_heads
        qkv = 2 * h * (q * self.head_dim + g * self.head_dim + g * self.v_head_dim)
        out = 2 * q * self.v_head_dim * h
        return qkv + out + 2 * MLP_MATRICES[self.mlp] * h * self.ffn_hidden_size

    @property
    def vocab_token_flops(self) -> int:
        """Embedding and output head per token, as the paper counts them (``4·H·V``)."""
        return 4 * self.hidden_size * self.vocab_size

    # ------------------------------------------------------------------------- costs
    def layer_cost(self, length: float, end: float) -> float:
        """Forward FLOPs of one layer on a chunk of ``length`` tokens ending at position ``end``."""
        s, p = length, end
        return self.pair_flops * (s * p - s * s / 2) + self.token_flops * s

    def head_cost(self, length: float) -> float:
        """Forward FLOPs of the output projection on ``length`` tokens (``2·s·H·V``)."""
        return 2 * length * self.hidden_size * self.vocab_size

    def chunk_cost(self, length: float, end: float) -> float:
        """Forward FLOPs of the whole model on a chunk: ``4sHV + L·layer_cost(s, P)``."""
        return self.vocab_token_flops * length + self.num_layers * self.layer_cost(length, end)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of a whole ``seq_len`` sequence (attention at ``seq_len/2`` keys on average)."""
        return self.chunk_cost(seq_len, seq_len) / seq_len

    def training_flops_per_token(self, seq_len: int) -> float:
        """3 x forward (forward, input and weight gradients), as the paper's MFU counts; no recompute."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def stage_costs(self, lengths: list[int] | tuple[int, ...], num_stages: int) -> list[list[float]]:
        """Forward FLOPs ``[stage][chunk]`` with the layers split as the model is
        (:func:`~pipelining_seq.registry.stage_layer_ranges`) and the output head on
        the last stage. The embedding is a lookup and costs nothing here."""
        ends = [sum(lengths[: j + 1]) for j in range(len(lengths))]
        return self._per_stage([self.layer_cost(s, e) for s, e in zip(lengths, ends)], lengths, num_stages)

    def stage_weight_grad_costs(self, lengths: list[int] | tuple[int, ...], num_stages: int) -> list[list[float]]:
        """FLOPs ``[stage][chunk]`` of the weight gradients, what a split backward's W
        computes: one product per weight matrix, as many FLOPs as its forward (the
        projections, the MLP, the output head on the last stage). Attention scores have
        no weights, so W's share of a backward falls as the sequence grows."""
        return self._per_stage([self.token_flops * s for s in lengths], lengths, num_stages)

    def _per_stage(self, per_layer: list[float], lengths: list[int] | tuple[int, ...],
                   num_stages: int) -> list[list[float]]:
        out = []
        for st, layers in enumerate(stage_layer_ranges(self.num_layers, num_stages)):
            row = [len(layers) * c for c in per_layer]
            if st == num_stages - 1:
                row = [c + self.head_cost(s) for c, s in zip(row, lengths)]
            out.append(row)
        return out

    # --------------------------------------------------------------------- partition
    def balanced_partition(self, seq_len: int, n_chunks: int, *, multiple_of: int = 1) -> list[int]:
        """Chunk lengths (first to last) whose :meth:`chunk_cost` is equal; see :func:`balanced_partition`."""
        check_chunk_counts(seq_len, n_chunks, multiple_of)
        alpha, beta = self.pair_flops, self.token_flops
        target = self.chunk_cost(seq_len, seq_len) / n_chunks
        # chunk_cost(s, P) = -(Lα/2)·s² + (4HV + L(αP + β))·s: solve chunk_cost = target for s.
        a = self.num_layers * alpha / 2
        parts: list[int] = []
        end = seq_len
        for i in range(n_chunks - 1):
            b = self.vocab_token_flops + self.num_layers * (alpha * end + beta)
            s = (b - math.sqrt(max(b * b - 4 * a * target, 0.0))) / (2 * a)
            # Keep room for the chunks still to place in front, each at least multiple_of.
            remaining_after = n_chunks - 1 - i
            s = min(s, end - remaining_after * multiple_of)
            s = max(multiple_of, int(s // multiple_of) * multiple_of)
            parts.insert(0, s)
            end -= s
        parts.insert(0, end)
        return parts


def check_chunk_counts(seq_len: int, n_chunks: int, multiple_of: int = 1) -> None:
    """Raise unless ``n_chunks`` chunks of whole ``multiple_of`` tokens can cut ``seq_len``."""
    for name, val in (("seq_len", seq_len), ("n_chunks", n_chunks), ("multiple_of", multiple_of)):
        # Checked like the schedules' arguments: a str, bool, float or negative is no count of tokens.
        if not isinstance(val, numbers.Integral) or isinstance(val, bool) or (name == "seq_len" and val < 1):
            raise ValueError(f"partition: {name}={val!r} must be a positive integer")
    if n_chunks < 1:
        raise ValueError(f"n_seq_chunks={n_chunks}: need at least 1 chunk")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be a positive integer")
    if seq_len % multiple_of:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of multiple_of={multiple_of}: "
            "change the sequence length or multiple_of"
        )
    if n_chunks * multiple_of > seq_len:
        raise ValueError(
            f"{n_chunks} chunks of at least {multiple_of} tokens do not fit a sequence of "
            f"{seq_len} tokens: lower n_seq_chunks to at most {seq_len // multiple_of}"
        )


def chunk_cost(length: float, end: float, **sizes: Any) -> float:
    """Modelled forward FLOPs of a chunk of ``length`` tokens ending at position ``end``.

    ``4·s·H·V + L·[α·(s·P − s²/2) + β·s]`` (:class:`FlopModel`; module docs for α and β);
    ``sizes`` are :class:`FlopModel`'s fields (``num_layers``, ``hidden_size``, ...).
    """
    return FlopModel(**sizes).chunk_cost(length, end)


def balanced_partition(
    seq_len: int,
    n_chunks: int,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
    num_kv_heads: int | None = None,
    mlp: str = "gelu",
    head_dim: int | None = None,
    v_head_dim: int | None = None,
    multiple_of: int = 1,
) -> list[int]:
    """Chunk lengths (first to last) whose modelled forward FLOPs are equal.

    Solves from the last chunk backwards: with the chunk ending at ``P``, the length
    ``s`` with ``chunk_cost(s, P) = total / n_chunks`` is the smaller root of a quadratic;
    it is rounded down to ``multiple_of`` and the first chunk takes the remainder.
    ``None`` head sizes mean ``hidden_size // num_heads``; ``num_kv_heads=None`` means
    ``num_heads``. For the paper's 7B GPT at 32k, k=4 and ``multiple_of=8`` this gives
    11024, 8416, 7088, 6240, the paper's own split.
    """
    model = FlopModel(
        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, ffn_hidden_size=ffn_hidden_size,
        vocab_size=vocab_size, num_kv_heads=num_kv_heads, mlp=mlp, head_dim=head_dim, v_head_dim=v_head_dim,
    )
    return model.balanced_partition(seq_len, n_chunks, multiple_of=multiple_of)

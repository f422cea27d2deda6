"""A small GPT for Seq1F1B: RoPE, pre-norm, GELU or SwiGLU MLP, optional GQA.

The only Seq1F1B-specific lines are the two calls into the chunk contract:
``chunk_positions`` for RoPE and ``ChunkedCausalAttention`` for attention. Packed
documents: ``forward(tokens, document_ids=ids)`` (or ``eos_id`` in the config, which
builds the ids from the tokens when the model sees whole sequences) masks attention to
each token's own document; positions stay those of the packed sequence, as in torchtitan. Pruned
modules (``None``/empty ``ModuleDict``) make a pipeline stage: the first stage embeds,
the last stage norms and projects to the vocabulary.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import ChunkedCausalAttention
from ..context import ContractError, chunk_positions, current_chunk
from ..flops import FlopModel
from ..registry import stage_layer_ranges

__all__ = [
    "ATTN_BACKENDS",
    "GPT",
    "GPTConfig",
    "GPTConfigError",
    "balanced_partition_for",
    "cross_entropy_loss",
    "document_ids_from_tokens",
    "flop_model",
    "init_value",
    "init_weights",
    "split_stage",
    "stage_layer_ranges",
]


ATTN_BACKENDS = ("auto", "blockwise", "sdpa", "flash")


class GPTConfigError(ValueError):
    """A model shape that cannot be built; ``errors`` lists every problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of the reference GPT (also the recipe's ``model`` section)."""

    vocab_size: int = 256
    """Vocabulary size; 256 for the built-in byte-level tokenizer, at least the largest token id + 1 for token files."""
    n_layers: int = 4
    """Transformer blocks; must divide evenly over the pipeline stages."""
    dim: int = 64
    """Hidden size."""
    n_heads: int = 4
    """Query heads; dim / n_heads must be even (RoPE)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means n_heads."""
    ffn_dim: int | None = None
    """MLP hidden size; null means 4*dim (gelu) or 8/3*dim rounded up to 8 (swiglu)."""
    mlp: str = "gelu"
    """MLP kind: gelu or swiglu."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    attn_backend: str = "auto"
    """ChunkedCausalAttention backend: auto, blockwise, sdpa or flash (flash needs CUDA and flash-attn)."""
    activation_checkpoint: bool = False
    """Recompute each transformer block in backward (saves activation memory, costs one more forward)."""
    v_head_dim: int | None = None
    """Value head size; None means dim // n_heads (MLA-style attention uses another)."""
    eos_id: int | None = None
    """End-of-document token: without document_ids, a model holding the embedding builds them from it."""
    compile: bool = False
    """torch.compile each transformer block (fullgraph; see GPT.compile_blocks)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise GPTConfigError(problems)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim if self.mlp == "gelu" else 8 * ((8 * self.dim // 3 + 7) // 8)

    def problems(self) -> list[str]:
        """Every reason this shape cannot be built, each naming its ``model.*`` field."""
        errors = [
            f"model.{name}={value!r} must be a positive integer"
            for name, value in (
                ("vocab_size", self.vocab_size), ("n_layers", self.n_layers), ("dim", self.dim),
                ("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads), ("ffn_dim", self.ffn_dim),
                ("v_head_dim", self.v_head_dim),
            )
            if value is not None and (not isinstance(value, int) or value < 1)
        ]
        if self.mlp not in ("gelu", "swiglu"):
            errors.append(f"model.mlp={self.mlp!r}: use 'gelu' or 'swiglu'")
        if self.attn_backend not in ATTN_BACKENDS:
            errors.append(f"model.attn_backend={self.attn_backend!r}: use one of {', '.join(ATTN_BACKENDS)}")
        if errors:
            return errors
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if self.dim % self.n_heads:
            errors.append(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            errors.append(f"head dim {self.dim // self.n_heads} must be even for RoPE: change model.dim or model.n_heads")
        if self.n_heads % kv:
            errors.append(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        return errors

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim


def document_ids_from_tokens(tokens: torch.Tensor, *, eos_id: int) -> torch.Tensor:
    """Document ids ``[batch, seq]`` of packed sequences: each ``eos_id`` ends a document.

    The end token belongs to the document it ends; ids count documents from 0 within
    each row. Build them on whole sequences (a chunk alone would restart the count).
    """
    ends = (tokens == eos_id).to(torch.int64)
    return ends.cumsum(-1) - ends


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # x: [B, H, T, D]; rotate pairs (even, odd) by position-dependent angles.
    d = x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=work) / d)
    ang = positions.to(work)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.to(work)[..., 0::2], x.to(work)[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hd, vd = cfg.head_dim, cfg.value_head_dim
        # Separate projections so tensor parallelism shards whole heads.
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * vd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * vd, cfg.dim, bias=False)
        self.attn = ChunkedCausalAttention(backend=cfg.attn_backend)
        self.head_dim, self.v_head_dim = hd, vd
        self.rope_theta = cfg.rope_theta

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.v_head_dim).transpose(1, 2)
        pos = chunk_positions(t, x.device)
        q, k = _rope(q, pos, self.rope_theta), _rope(k, pos, self.rope_theta)
        y = self.attn(q, k, v, document_ids=document_ids)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False) if self.swiglu else None
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x) if self.swiglu else F.gelu(self.w1(x))
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), document_ids=document_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(tokens, document_ids=None)`` returns logits ``[B, T, vocab]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):  # meta tensors hold no values to set
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise from the global RNG (:func:`init_weights` seeds per parameter name)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_value(name, p.shape, n_layers=self.config.n_layers, std=std, device=p.device))

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place (fullgraph; names unchanged)."""
        for block in self.layers.values():
            block.compile(fullgraph=True)

    def _document_ids(self, tokens: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor | None:
        eos = self.config.eos_id
        if document_ids is not None or eos is None:
            return document_ids
        ctx = current_chunk()
        chunked = ctx is not None and ctx.n_chunks > 1
        if self.tok_embeddings is None or chunked:
            where = "inside a sequence chunk" if chunked else "on a stage without the embedding"
            raise ContractError(
                f"GPT(eos_id={eos}) got no document_ids {where}: ids must be built on whole sequences; pass "
                "document_ids=document_ids_from_tokens(tokens, eos_id=...) to step() on every stage"
            )
        return document_ids_from_tokens(tokens, eos_id=eos)

    def forward(self, h: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        document_ids = self._document_ids(h, document_ids)
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        for block in self.layers.values():
            if self.config.activation_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, document_ids=document_ids, use_reentrant=False)
            else:
                # By keyword: tensor parallelism's input plans count positional inputs.
                h = block(h, document_ids=document_ids)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h


def init_value(
    name: str, shape: torch.Size, *, n_layers: int, std: float = 0.02, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The initial value of parameter ``name``: GPT-2 style normal(0, std) matrices with the
    residual projections (``wo``, ``w2``) scaled by (2 * n_layers)^-0.5, ones for norms."""
    if len(shape) < 2:
        return torch.ones(shape, device=device)
    scale = (2 * n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
    return torch.empty(shape, device=device).normal_(0.0, std * scale, generator=generator)


def init_weights(module: nn.Module, *, seed: int, n_layers: int, std: float = 0.02) -> None:
    """Initialise every parameter from a generator seeded by ``(seed, parameter name)``.

    Seeding by name makes the weights independent of how the model is cut into stages;
    values are drawn on CPU, so a CUDA run starts from the same weights as a CPU run.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))
            p.copy_(init_value(name, p.shape, n_layers=n_layers, std=std, generator=g))


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token mean cross-entropy of ``[B, T, vocab]`` logits (half precision upcast to float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def flop_model(cfg: GPTConfig) -> FlopModel:
    """The FLOP model of this GPT (the one translation of its names into the FLOP model's sizes)."""
    return FlopModel(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, num_heads=cfg.n_heads, ffn_hidden_size=cfg.ffn_dim,
        vocab_size=cfg.vocab_size, num_kv_heads=cfg.n_kv_heads, mlp=cfg.mlp,
        head_dim=cfg.head_dim, v_head_dim=cfg.value_head_dim,
    )


def balanced_partition_for(cfg: GPTConfig, seq_len: int, n_chunks: int, *, multiple_of: int = 1) -> list[int]:
    """FLOP-balanced chunk lengths for this GPT (:meth:`~pipelining_seq.flops.FlopModel.balanced_partition`)."""
    return flop_model(cfg).balanced_partition(seq_len, n_chunks, multiple_of=multiple_of)


def split_stage(model: GPT, stage_index: int, num_stages: int) -> GPT:
    """A copy of ``model`` holding only stage ``stage_index``'s part (FQNs unchanged)."""
    keep = stage_layer_ranges(model.config.n_layers, num_stages)[stage_index]
    part = copy.deepcopy(model)
    for i in list(part.layers.keys()):
        if int(i) not in keep:
            del part.layers[i]
    if stage_index != 0:
        part.tok_embeddings = None
    if stage_index != num_stages - 1:
        part.norm = None
        part.output = None
    return part

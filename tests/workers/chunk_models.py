"""Small hand-made models for the chunk-exactness check: the reference contract
(ChunkedCausalAttention, chunk_positions) and the natural mistakes a model ported from
elsewhere makes, which the attention guard cannot see."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelining_seq import ChunkedCausalAttention, chunk_positions

VOCAB = 48


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class EagerAttention(nn.Module):
    """HF-style "eager" attention: matmul + softmax with a causal mask built over the
    tokens it is given (inside a chunk: the chunk alone)."""

    def forward(self, q, k, v, *, document_ids=None):
        s = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        if document_ids is not None:
            mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, attn: nn.Module, positions: str) -> None:
        super().__init__()
        self.heads, self.positions = heads, positions
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn = attn

    def forward(self, x, document_ids=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The contract: absolute positions of the chunk. The mistake: arange of the
        # chunk's length (what a model does when nobody passes position ids).
        pos = chunk_positions(t, x.device) if self.positions == "chunk" else torch.arange(t, device=x.device)
        q, k = rope(q, pos), rope(k, pos)
        y = self.attn(q, k, v, document_ids=document_ids)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, *, attn: str, positions: str) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads, attn=ChunkedCausalAttention() if attn == "chunked" else EagerAttention(),
                                   positions=positions)
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, document_ids=None):
        x = x + self.attention(self.norm1(x), document_ids=document_ids)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding (first stage), blocks, norm and head (last stage); ``stage`` keeps a part.

    ``attn``: "chunked" (the contract) or "eager" (the mistake); ``positions``: "chunk"
    (chunk_positions) or "arange" (the mistake)."""

    def __init__(self, *, attn: str = "chunked", positions: str = "chunk", n_layers: int = 2, dim: int = 32,
                 heads: int = 4, seed: int = 0, part: tuple[int, int] | None = None, std: float = 0.02) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attn=attn, positions=positions) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
        if part is not None:  # (stage index, number of stages): keep this stage's part
            s, n = part
            per = n_layers // n
            keep = set(range(s * per, (s + 1) * per))
            self.blocks = nn.ModuleList(b for i, b in enumerate(self.blocks) if i in keep)
            if s != 0:
                self.emb = None
            if s != n - 1:
                self.norm = self.head = None

    def forward(self, h, document_ids=None):
        if self.emb is not None:
            h = self.emb(h)
        for block in self.blocks:
            h = block(h, document_ids=document_ids)
        if self.head is not None:
            h = self.head(self.norm(h))
        return h


def ce(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

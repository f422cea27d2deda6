"""What autograd keeps per unit: the activation model behind ``pipelining-seq plan``.

:class:`ActivationModel` counts, tensor by tensor, the bytes this implementation saves
for backward per token of a Seq1F1B unit (per transformer layer, plus the first and
last stage's extras), the K/V cache, and the stage's own I/O buffers. It was derived
from the saved tensors of the reference GPT and checks out byte for byte against
:class:`~pipelining_seq.tools.memory.ActivationMemoryMeter` on CPU (``tests/unit/test_planner.py``)
and within a few percent of ``torch.cuda.max_memory_allocated`` on a GPU
(``pipelining-seq plan --calibrate --device cuda``; docs/planner.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...models.gpt import GPTConfig

__all__ = ["ActivationModel"]


@dataclass(frozen=True, kw_only=True)
class ActivationModel:
    """Bytes autograd keeps for one sequence of one unit, per transformer layer and per stage end.

    Every term names the tensor that holds it; ``t`` is the TP degree and ``t_sp`` is
    ``t`` with sequence parallelism, else 1. Without sequence parallelism Q/K/V share
    one saved input, and so do w1/w3. With it, each column-parallel projection saves
    its own ``1/t`` slice of the gathered input (``input_reshard``) and gathers it again
    in backward, as Megatron does.
    """

    model: GPTConfig
    """The model's shape (hidden size h, heads a, kv heads, MLP kind and width F, vocabulary V),
    its attention backend and whether its blocks recompute in backward."""
    tp: int = 1
    """Tensor-parallel degree t."""
    sequence_parallel: bool = False
    """Norm inputs and the residual stream sharded over the t ranks."""
    act_bytes: int = 2
    """Bytes per activation element (2 for bf16 compute)."""
    device: str = "cuda"
    """cuda: fused RMSNorm saves its input; cpu: the composite RMSNorm saves an (upcast) input and the normalised tensor."""
    attn_backend: str | None = None
    """blockwise keeps one K/V copy per chunk (the cache); flash and sdpa also save each chunk's concatenated
    prefix K/V. None means the model's backend; 'auto' means blockwise."""
    loss_fp32: bool = True
    """The loss upcasts the logits, so log_softmax saves fp32 (4V bytes per token)."""

    def __post_init__(self) -> None:
        # Resolve once (frozen): the planner reports the kernel it assumed, not 'auto'.
        backend = self.attn_backend or self.model.attn_backend
        object.__setattr__(self, "attn_backend", "blockwise" if backend == "auto" else backend)

    @property
    def _t_sp(self) -> int:
        return self.tp if self.sequence_parallel else 1

    @property
    def _acc(self) -> int:  # fp32 statistics (rstd, lse, RoPE tables); fp64 runs keep fp64
        return max(self.act_bytes, 4)

    def _projection_inputs(self) -> float:
        """Saved projection inputs, in units of the hidden state h."""
        if self.sequence_parallel:
            return (3 + (2 if self.model.mlp == "swiglu" else 1)) / self.tp  # wq, wk, wv, w1 (, w3) slices
        return 2  # Q/K/V share one whole input, w1/w3 another

    def layer_saved(self, length: int, chunk: int, batch: int = 1) -> int:
        """Bytes one layer saves for a chunk of ``length`` tokens (chunk index ``chunk``)."""
        e, h, t, tsp, s = self.act_bytes, self.model.dim, self.tp, self._t_sp, length
        if self.model.activation_checkpoint:
            return batch * s * e * h // tsp
        norm = 2 * self._acc if self.device == "cpu" else e  # per element of a norm input
        per_token = (
            2 * (norm * h + self._acc) / tsp  # attention_norm and ffn_norm: input(s) + rstd
            + self._projection_inputs() * e * h
            + 2 * e * h / t  # attention: q (after RoPE) and the output
            + self._acc * self.model.n_heads / t  # attention: logsumexp
            + (2 if self.model.mlp == "gelu" else 4) * e * self.model.ffn_dim / t
        )
        if self.device == "cpu" and self.attn_backend == "blockwise" and chunk == 0:
            per_token += e * h / t  # CPU kernel output is [b,a,s,d]: the out-projection input is a copy
        rope = 4 * (self.model.head_dim // 2) * self._acc * s  # cos/sin for q and k; shared by the batch
        return math.ceil(batch * s * per_token) + rope

    def kv_bytes(self, length: int, batch: int = 1) -> int:
        """K and V of one chunk in one layer's cache (local heads)."""
        return batch * length * 2 * self.act_bytes * self.model.n_kv_heads * self.model.head_dim // self.tp

    def kv_concat(self, prefix_end: int, chunk: int, batch: int = 1) -> int:
        """flash/sdpa: the prefix K/V concatenation a later chunk's kernel saves."""
        if self.attn_backend == "blockwise" or chunk == 0:
            return 0
        return self.kv_bytes(prefix_end, batch)

    def embed_saved(self, length: int, batch: int = 1) -> int:
        """First stage: the token ids the embedding saves (plus the TP mask)."""
        return batch * length * (8 + (1 if self.tp > 1 else 0))

    def head_saved(self, length: int, batch: int = 1) -> int:
        """Last stage: final norm, output-projection input, log_softmax output, targets."""
        e, h, s = self.act_bytes, self.model.dim, length
        norm = 2 * self._acc if self.device == "cpu" else e
        logits = 4 if self.loss_fp32 else e
        return batch * s * ((norm * h + self._acc) // self._t_sp + e * h // self._t_sp + logits * self.model.vocab_size + 8)

    def stage_io(self, length: int, *, first: bool, last: bool, batch: int = 1) -> int:
        """What the pipeline stage itself holds per unit until its backward: the received
        input (unless the first norm saved that very tensor) and the output (the logits on
        the last stage), both whole chunks."""
        e, s = self.act_bytes, length
        out = e * (self.model.vocab_size if last else self.model.dim)
        aliased = self.device == "cpu" and e >= 4 or self.device != "cpu"
        held_in = 0 if first or (aliased and not self.sequence_parallel) or self.model.activation_checkpoint else e * self.model.dim
        return batch * s * (out + held_in)

    def layer_transient(self, length: int, batch: int = 1) -> int:
        """Gradient buffers alive while one layer runs backward (about its saved bytes)."""
        recomputed = dataclasses.replace(self.model, activation_checkpoint=False)
        return dataclasses.replace(self, model=recomputed).layer_saved(length, 1, batch)

    def head_transient(self, length: int, batch: int = 1) -> int:
        """Last stage: the logits gradient in fp32 and in the compute dtype."""
        return batch * length * self.model.vocab_size * (4 + self.act_bytes)

"""Seq1F1B on a Hugging Face Llama: 2 CPU processes (gloo), no recipe, no download.

    python examples/transformers_llama.py [--steps 8] [--chunks 4]

A tiny random-init ``LlamaForCausalLM`` is built from its config on every rank (same
seed), made chunk-aware and cut into two pipeline stages with
``pipelining_seq.integrations.transformers``; ``ScheduleSeq1F1B`` trains it for a few
AdamW steps on packed documents (``position_ids`` that restart at every document, as
Hugging Face packs them), with FLOP-balanced chunk lengths from the config. The last
rank prints the loss of every step.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, p2p
from pipelining_seq.integrations.transformers import balanced_seq_partition, split_causal_lm

VOCAB, SEQ, BATCH, MICROBATCHES = 256, 64, 8, 4


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed documents of counting sequences (token t+1 = token t + stride): learnable."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    positions = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    for row in range(BATCH):
        t = 0
        while t < SEQ + 1:
            n = int(torch.randint(8, 40, (1,), generator=g))
            start, stride = torch.randint(0, VOCAB, (2,), generator=g).tolist()
            span = min(n, SEQ + 1 - t)
            tokens[row, t:t + span] = (start + (stride % 7 + 1) * torch.arange(span)) % VOCAB
            positions[row, t:t + span] = torch.arange(span)
            t += span
    return tokens[:, :-1], tokens[:, 1:], positions[:, :-1]


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def run(rank: int, world: int, port: int, steps: int, chunks: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    stage_module = split_causal_lm(model, rank, world)  # enables chunk-aware attention in place
    stage = SequencePipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = ScheduleSeq1F1B(stage, MICROBATCHES, loss_fn, n_seq_chunks=chunks,
                               seq_partition=balanced_seq_partition(config, chunks))
    optim = torch.optim.AdamW(stage_module.parameters(), lr=3e-3)
    if rank == 0:
        print(f"chunk lengths of a {SEQ}-token sequence: {balanced_seq_partition(config, chunks)(SEQ)}", flush=True)
    for step in range(steps):
        x, y, pos = batch(step)
        optim.zero_grad()
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x, position_ids=pos)
        elif rank == world - 1:
            schedule.step(target=y, losses=losses, position_ids=pos)
        else:
            schedule.step(position_ids=pos)
        optim.step()
        if rank == world - 1:
            print(f"step {step} loss {torch.stack(losses).mean().item():.4f}", flush=True)
    p2p.destroy_process_group()  # torch's, then joins gloo's threads before exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=4, help="sequence chunks per micro-batch (k)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run, args=(2, port, args.steps, args.chunks), nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()

"""Seq1F1B in one file: the reference GPT on 2 CPU ranks, checked against one process.

Run it:  python examples/seq1f1b_minimal.py

Two gloo processes each hold one pipeline stage (2 of the model's 4 layers). Every step
cuts a batch of 8 sequences into 4 micro-batches and every micro-batch into 4 chunks of
16 tokens; ``ScheduleSeq1F1B`` runs the 16 (micro-batch, chunk) units through the pipeline.
After 5 AdamW steps the last rank trains the same model again in a single process, with
no pipeline and no chunks, and prints both losses: in float64 they agree to 1e-10 or better.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelining_seq import ScheduleSeq1F1B, SequencePipelineStage, p2p
from pipelining_seq.models import GPT, GPTConfig, cross_entropy_loss, split_stage

WORLD = 2  # pipeline stages, one per process
STEPS = 5
M, K = 4, 4  # micro-batches per step, sequence chunks per micro-batch
CONFIG = GPTConfig(vocab_size=256, n_layers=4, dim=64, n_heads=4)
TEXT = b"Seq1F1B cuts every micro-batch into chunks along the sequence; chunks are the pipeline's units. "


def make_model() -> GPT:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return GPT(CONFIG).to(torch.float64)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 byte sequences of 64 tokens from TEXT; labels are the next bytes."""
    data = torch.tensor(list(TEXT * 8), dtype=torch.long)
    starts = [(step * 8 + i) * 11 % len(TEXT) for i in range(8)]
    rows = torch.stack([data[s : s + 65] for s in starts])
    return rows[:, :-1], rows[:, 1:]


def train_pipelined(rank: int, world: int) -> list[float]:
    """One process: build this rank's stage and run STEPS optimizer steps; the last rank returns the losses."""
    part = split_stage(make_model(), rank, world)  # this rank's layers
    stage = SequencePipelineStage(part, rank, world, torch.device("cpu"))
    schedule = ScheduleSeq1F1B(stage, n_microbatches=M, loss_fn=cross_entropy_loss,
                               n_seq_chunks=K, seq_partition="uniform")
    optimizer = torch.optim.AdamW(part.parameters(), lr=3e-3)
    step_losses = []
    for step in range(STEPS):
        inputs, labels = batch(step)
        if rank == 0:
            schedule.step(inputs)
        elif rank == world - 1:
            losses = []
            schedule.step(target=labels, losses=losses)  # one loss per micro-batch
            step_losses.append(torch.stack(losses).mean().item())
        else:
            schedule.step()  # middle stages (world > 2) pass nothing
        optimizer.step()
        optimizer.zero_grad()
    return step_losses


def train_single_process() -> list[float]:
    """The same model, data and optimizer in one process, no pipeline and no chunks."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_losses = []
    for step in range(STEPS):
        inputs, labels = batch(step)
        losses = []
        for x, y in zip(inputs.chunk(M), labels.chunk(M)):  # the same micro-batches
            loss = cross_entropy_loss(model(x), y)
            (loss / M).backward()  # ScheduleSeq1F1B also averages gradients over micro-batches
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        step_losses.append(sum(losses) / M)
    return step_losses


def worker(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pipelined = train_pipelined(rank, world)
    finally:
        p2p.destroy_process_group()  # torch's, then joins gloo's threads before exit
    if rank != world - 1:
        return
    reference = train_single_process()
    for step, (a, b) in enumerate(zip(pipelined, reference), 1):
        print(f"step {step}: loss {a:.6f} (single process {b:.6f})")
    diff = max(abs(a - b) for a, b in zip(pipelined, reference))
    if diff > 1e-10:
        sys.exit(f"pipelined losses differ from the single-process run: max |diff| = {diff:.2e}")
    print(f"Seq1F1B on {world} ranks (m={M}, k={K}) equals the single-process run: max |diff| = {diff:.1e}")


def main() -> None:
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(WORLD, port), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()

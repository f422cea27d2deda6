"""ActivationMemoryMeter: counts saved activations once per storage, not parameters,
including FSDP2's unsharded parameter views."""

import torch
from torch.distributed.fsdp import fully_shard

from pipelining_seq.models import GPT, GPTConfig
from pipelining_seq.tools.memory import ActivationMemoryMeter


def _measure(model, x):
    meter = ActivationMemoryMeter(modules=[model])
    with meter:
        loss = model(x).sum()
        live = meter.saved_bytes
        loss.backward()
    return live, meter.saved_bytes, meter.peak_bytes


def test_counts_saved_activations_and_frees_them():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, dim=32, n_heads=4))
    live_short, after, peak = _measure(model, torch.randint(0, 256, (2, 64)))
    assert after == 0 and peak == live_short > 0
    live_long, _, _ = _measure(model, torch.randint(0, 256, (2, 128)))
    # Activations grow with the sequence; parameters (not counted) do not.
    assert 1.9 < live_long / live_short < 2.3


def test_fsdp_unsharded_parameters_are_not_activations(world_of_one):
    # FSDP2 swaps in unsharded parameters (views of its all-gather buffer) for forward;
    # without the meter's refresh they were counted as activations (818688 vs 687616 bytes).
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, dim=32, n_heads=4))
    x = torch.randint(0, 256, (2, 64))
    plain = _measure(model, x)[2]
    model.zero_grad(set_to_none=True)
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    assert _measure(model, x)[2] == plain

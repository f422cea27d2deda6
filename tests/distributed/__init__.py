"""Tests that launch ranks: torch.multiprocessing spawn, torchrun, or a training subprocess."""

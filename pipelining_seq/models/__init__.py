"""Reference models that follow the chunked-attention contract."""

from .gpt import GPT, GPTConfig, cross_entropy_loss, init_weights, split_stage, stage_layer_ranges

__all__ = ["GPT", "GPTConfig", "cross_entropy_loss", "init_weights", "split_stage", "stage_layer_ranges"]

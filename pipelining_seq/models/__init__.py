"""Reference models that follow the chunked-attention contract."""

from .gpt import GPT, GPTConfig, split_stage, stage_layer_ranges

__all__ = ["GPT", "GPTConfig", "split_stage", "stage_layer_ranges"]

"""Reference models that follow the chunked-attention contract."""

from .gpt import (
    GPT,
    GPTConfig,
    cross_entropy_loss,
    document_ids_from_tokens,
    flop_model,
    init_weights,
    split_stage,
    stage_layer_ranges,
)

__all__ = [
    "GPT", "GPTConfig", "cross_entropy_loss", "document_ids_from_tokens", "flop_model", "init_weights", "split_stage",
    "stage_layer_ranges",
]

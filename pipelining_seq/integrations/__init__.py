"""Adapters for training frameworks built on torch.distributed.pipelining."""

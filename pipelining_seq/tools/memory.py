"""An honest CPU measure of a stage's activation memory.

On CPU there is no allocator high-water mark to read, so this counts what a pipeline
schedule actually keeps alive between forward and backward: the tensors autograd saves
for backward (through ``torch.autograd.graph.saved_tensors_hooks``) plus the stage's
K/V cache and the inputs and output gradients its weight-gradient store holds for
pending weight passes, each storage counted once however many tensors view it. Parameters are
excluded (they are not activations). The peak is sampled every time a tensor is saved
and whenever ``sample()`` is called (the schedule-independent moments after a unit).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .. import _compat
from ..context import KVCache

__all__ = ["ActivationMemoryMeter"]


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor has no storage of its own; its bytes on this rank are its local shard's.
    return _compat.local_tensor(t)


class _Packed:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: ActivationMemoryMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        meter = self.meter
        if meter is not None:
            meter._release(self.key)


class ActivationMemoryMeter:
    """Live saved-activation + K/V-cache bytes, and their peak, while installed.

    Use as a context manager around the schedule's ``step``::

        meter = ActivationMemoryMeter(modules=[stage.submod], kv_cache=stage.kv_cache)
        with meter:
            schedule.step(...)
        print(meter.peak_bytes)
    """

    def __init__(self, *, modules: Iterable[nn.Module] = (), kv_cache: KVCache | None = None,
                 weight_grads: Iterable[Any] = ()) -> None:
        self._modules = list(modules)
        self._stores = list(weight_grads)  # WeightGradStore s (pending weight passes)
        self._param_keys: set[int] = set()
        self._refresh_param_keys()
        # FSDP2 swaps in unsharded parameters (views of its all-gather buffer) for forward;
        # with sharded parameters the set is refreshed whenever a new storage is saved.
        self._sharded = any(isinstance(p, DTensor) for m in self._modules for p in m.parameters())
        self.kv_cache = kv_cache
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self.saved_bytes = 0
        self.peak_bytes = 0
        self.peak_saved_bytes = 0
        self.peak_kv_bytes = 0
        self._hooks = None

    def _refresh_param_keys(self) -> None:
        self._param_keys = {
            _local(p).untyped_storage().data_ptr()
            for m in self._modules for p in m.parameters() if p.device.type != "meta"
        }

    def reset_peak(self) -> None:
        self.peak_bytes = self.peak_saved_bytes = self.peak_kv_bytes = 0

    def _kv_extra(self) -> int:
        total = 0
        seen: set[int] = set()
        for store in self._stores:
            for t in store.pending_tensors():
                key = t.untyped_storage().data_ptr()
                if key in seen or key in self._refs:
                    continue
                seen.add(key)
                total += t.untyped_storage().nbytes()
        if self.kv_cache is None:
            return total
        for layers in self.kv_cache._mbs.values():
            for entry in layers.values():
                for t in (*entry.k, *entry.v, *entry.dk, *entry.dv):
                    if t is None:
                        continue
                    key = t.untyped_storage().data_ptr()
                    if key in seen or key in self._refs:
                        continue
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    def sample(self) -> int:
        kv = self._kv_extra()
        now = self.saved_bytes + kv
        if now > self.peak_bytes:
            self.peak_bytes = now
            self.peak_saved_bytes = self.saved_bytes
            self.peak_kv_bytes = kv
        return now

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta" or isinstance(t, nn.Parameter):
            return t
        storage = _local(t).untyped_storage()
        try:
            key = storage.data_ptr()
        except RuntimeError:
            # A storage without data (seen for tensor-parallel norm inputs on CPU): nothing to count.
            return t
        if self._sharded and key not in self._param_keys and key not in self._refs:
            self._refresh_param_keys()
        if key in self._param_keys or storage.nbytes() == 0:
            return t
        count = self._refs.get(key, 0)
        self._refs[key] = count + 1
        if count == 0:
            self._bytes[key] = storage.nbytes()
            self.saved_bytes += storage.nbytes()
            self.sample()
        # Keep a detached alias (same storage, same content, which is all an unpack
        # must return): holding ``t`` itself would tie a saved output to its own
        # grad_fn, a cycle through C++ that nothing frees when only part of the graph
        # is run (a split I/W backward), leaking the rest of the unit's graph.
        return _Packed(t.detach(), key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def _release(self, key: int) -> None:
        count = self._refs.get(key)
        if count is None:
            return
        if count == 1:
            del self._refs[key]
            self.saved_bytes -= self._bytes.pop(key)
        else:
            self._refs[key] = count - 1

    def __enter__(self) -> ActivationMemoryMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self.sample()


"""Deterministic peak-memory tracking of tensor storages created by ATen ops (works on CPU, no profiler).

``StorageTracker`` is a ``TorchDispatchMode``: every op's freshly allocated output storage is counted when it
appears and uncounted when its storage is freed (``weakref.finalize`` on the storage object, which PyTorch
keeps alive exactly as long as the underlying C++ storage). Outputs that alias an input (views, in-place and
``out=`` ops) are not new memory and are skipped. Tensors that existed before the mode was entered are never
counted, so ``peak`` is the peak of memory allocated *inside* the block.

Limits: kernel-internal scratch buffers that never become tensors are invisible, and so are ops run on a
thread that does not carry the mode. CPU autograd runs the backward graph on the thread that calls
``backward()``, and autograd propagates the dispatch-mode stack with its thread-local state, so backward ops
are seen (tests/test_loss_memory.py checks this).

Shared by tests/test_loss_memory.py and benchmarks/bench_loss_memory.py.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree) -> list[torch.UntypedStorage]:
    """Untyped storages of every tensor in a (nested) args/outputs structure."""
    leaves, _ = tree_flatten(tree)
    return [t.untyped_storage() for t in leaves if isinstance(t, torch.Tensor)]


class StorageTracker(TorchDispatchMode):
    """Tracks live and peak bytes of storages allocated by ops run inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # data_ptr -> nbytes
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current live bytes."""
        self.peak = self.current

    def _free(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)

    def _record(self, storage: torch.UntypedStorage, input_ptrs: set[int]) -> None:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._live or ptr in input_ptrs:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        # Keyed by pointer, so the callback must fire before the allocator can hand the address out again;
        # finalize runs during the storage's deallocation, which guarantees that.
        weakref.finalize(storage, self._free, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        input_ptrs = {s.data_ptr() for s in _storages((args, kwargs))}
        out = func(*args, **kwargs)
        for storage in _storages(out):
            self._record(storage, input_ptrs)
        return out


def measure_peak_bytes(fn) -> int:
    """Peak bytes allocated by ops while running ``fn()`` on CPU (inputs created beforehand are not counted).

    Whatever ``fn`` returns is kept alive until the measurement ends, so results count toward the peak.
    """
    with StorageTracker() as tracker:
        result = fn()
        peak = tracker.peak
    del result
    return peak

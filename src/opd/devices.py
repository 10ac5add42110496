"""The accelerator this process trains on (or the CPU), and its peak-memory counters."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def current_device() -> torch.device:
    """verl's device for this rank: ``cuda:<local id>`` on GPU nodes, ``cpu`` on the CPU backend."""
    from verl.utils.device import get_device_id, get_device_name

    name = get_device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, get_device_id())


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """Peak device memory since the last reset on GPU; on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextmanager
def phase_meter() -> Iterator[dict[str, float]]:
    """Measure a phase: yields a dict that holds ``seconds`` and ``peak_gb`` once the block ends."""
    reading: dict[str, float] = {}
    reset_peak_memory()
    started = time.perf_counter()
    try:
        yield reading
    finally:
        reading["seconds"] = time.perf_counter() - started
        reading["peak_gb"] = peak_memory_gb()

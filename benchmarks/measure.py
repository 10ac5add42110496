"""Peak memory and wall time of one benchmark step on CUDA or CPU: one implementation for every benchmark.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` beyond what was allocated before the step; on CPU it
is ``memtrack.measure_peak_bytes`` (storages created inside the step). Times are synchronised wall times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from memtrack import measure_peak_bytes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(step: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``step()`` runs, beyond what existed before it."""
    if device != "cuda":
        return measure_peak_bytes(step)
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def median_seconds(step: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of ``repeats`` synchronised runs of ``step()`` (warm it up beforehand)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

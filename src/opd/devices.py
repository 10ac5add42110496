"""The accelerator this process trains on (or the CPU), and its peak-memory counters."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def current_device() -> torch.device:
    """verl's device for this rank: ``cuda:<local id>`` on GPU nodes, ``cpu`` on the CPU backend."""
    from verl.utils.device import get_device_id, get_device_name

    name = get_device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, get_device_id())


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory() -> None:
    """Start a new peak: the device allocator's on GPU, the process's resident peak on Linux CPUs.

    Without the CPU reset every phase would report the process's lifetime peak (the teacher phase would
    show the student's optimizer state of the step before).
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")  # Linux: reset VmHWM to the current resident size
    except OSError:
        pass  # not Linux, or not allowed: peak_memory_gb then reports the lifetime peak


def peak_memory_gb() -> float:
    """Peak device memory since the last reset on GPU; on CPU the peak resident memory since the last reset
    (Linux), else the process's lifetime peak."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        status = _STATUS.read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20


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

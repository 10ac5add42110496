"""A ``cpu`` platform for verl's platform registry.

verl resolves one platform per process (``verl.plugin.platform.get_platform``) and asks it for the
device name, the torch device module, the collective backend and the Ray resource name. Without an
accelerator it falls back to ``nvidia`` and NCCL. This platform answers ``cpu`` / ``gloo`` instead.

Ray resources: verl's resource pools and rollout replicas count accelerator resources only, so this
platform keeps reporting Ray's ``GPU`` resource; a CPU run gives Ray *logical* GPUs
(``ray_init.num_gpus``), one per training process. Ray then sets ``CUDA_VISIBLE_DEVICES`` in those
processes, which a CPU run ignores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

PLATFORM_NAME = "cpu"


def gpu_available() -> bool:
    """True when this process can see a CUDA/ROCm GPU or an Ascend NPU."""
    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # torch_npu raises when its driver is missing
        return False


class CPUDeviceModule(ModuleType):
    """Stands in for ``torch.cuda`` where verl calls ``get_torch_device().<fn>()``.

    ``torch.cpu`` lacks the memory-statistics, cache and RNG functions verl calls unconditionally;
    here they are no-ops, zeros, or the process-wide CPU RNG. Anything else falls through to
    ``torch.cpu`` (streams, events, ``synchronize``).
    """

    def __init__(self):
        super().__init__("verl_cpu_device")

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        # a string, not 0: verl passes this to ``Tensor.to``, where an int would mean ``cuda:0``
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """(free, total) bytes of host memory, like ``torch.cuda.mem_get_info`` for a GPU."""
        try:
            import psutil

            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        except ImportError:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return int(pages), int(pages)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


CPU_DEVICE_MODULE = CPUDeviceModule()


def _build_platform_class():
    """Define the platform class lazily so importing this module does not import verl."""
    from verl.plugin.platform import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for hosts without an accelerator: device ``cpu``, collectives ``gloo``."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return CPU_DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Auto-detection probes the built-in platforms first; reaching this one means none of
            # them found a device. Still refuse when this process sees one, so a GPU host never
            # silently trains on CPU.
            return not gpu_available()

        def current_device(self) -> str:
            return CPU_DEVICE_MODULE.current_device()

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray assigns the logical GPUs through this variable; see the module docstring.
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return PlatformCPU


_platform_cls = None


def platform_class():
    """The ``PlatformCPU`` class (a ``verl.plugin.platform.PlatformBase`` subclass)."""
    global _platform_cls
    if _platform_cls is None:
        _platform_cls = _build_platform_class()
    return _platform_cls


def register_platform() -> None:
    """Register ``PlatformCPU`` as verl platform ``cpu`` (idempotent).

    Must run before anything calls ``verl.plugin.platform.get_platform()`` in this process, which is
    why the plugin module is loaded through ``VERL_USE_EXTERNAL_MODULES`` during ``import verl``.
    """
    from verl.plugin.platform import PlatformRegistry

    cls = platform_class()
    if PlatformRegistry.get(PLATFORM_NAME) is not cls:
        PlatformRegistry.register(platform=PLATFORM_NAME)(cls)

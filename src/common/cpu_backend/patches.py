"""The four verl behaviours that assume an accelerator, and what the CPU backend does about them.

1. ``initialize_global_process_group_ray`` builds the backend string ``cpu:gloo,<device>:<backend>``,
   which for device ``cpu`` repeats ``cpu`` and torch rejects it; the replacement asks for ``gloo``.
2. The FSDP engines are registered for ``cuda`` / ``npu`` only; they are registered for ``cpu`` too.
3. The FSDP2 engine builds ``CPUOffloadPolicy(pin_memory=True)`` (always for a forward-only ref
   model); pinning needs an accelerator, so the engine gets a policy that never pins.
4. With remove-padding, verl hands the model one packed row and relies on flash-attention's varlen
   kernel to keep the sequences apart; without it, sdpa attends over the whole row under a mask. The
   backend's own attention (``packed_attention``) is registered as soon as transformers' model code is
   imported, so the engines can load models with it.

Each patch runs when its verl module is first imported (see ``_import_hooks``), so processes that
never build an engine pay nothing. Every verl attribute these patches read or replace is listed in
``common.verl_surface``, which the launchers resolve before anything starts.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ._import_hooks import when_imported

DISTRIBUTED_MODULE = "verl.utils.distributed"
ENGINE_WORKERS_MODULE = "verl.workers.engine_workers"
FSDP_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
TRANSFORMERS_MODELING_MODULE = "transformers.modeling_utils"

# (model type, engine class name) pairs of the FSDP engine module to register for device cpu
FSDP_ENGINES = (("language_model", "FSDPEngineWithLMHead"), ("value_model", "FSDPEngineWithValueHead"))
FSDP_BACKENDS = ("fsdp", "fsdp2")

_MARK = "_opd_cpu_backend_patched"


def _cpu_platform_active() -> bool:
    from verl.utils.device import get_device_name

    return get_device_name() == "cpu"


def _gloo_process_group(original):
    """Wrap ``initialize_global_process_group_ray`` so the CPU platform gets plain ``gloo``."""

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None and _cpu_platform_active():
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray.__doc__ = original.__doc__
    setattr(initialize_global_process_group_ray, _MARK, original)
    return initialize_global_process_group_ray


def _patch_distributed(module: ModuleType) -> None:
    current = module.initialize_global_process_group_ray
    if not hasattr(current, _MARK):
        module.initialize_global_process_group_ray = _gloo_process_group(current)


def _rebind_distributed_in(module: ModuleType) -> None:
    """Modules that did ``from verl.utils.distributed import ...`` hold their own reference."""
    import verl.utils.distributed as distributed

    _patch_distributed(distributed)
    if not hasattr(module.initialize_global_process_group_ray, _MARK):
        module.initialize_global_process_group_ray = distributed.initialize_global_process_group_ray


def _unpinned_offload_policy(policy_cls):
    """Subclass of FSDP2's ``CPUOffloadPolicy`` that ignores ``pin_memory=True``."""

    @dataclasses.dataclass
    class UnpinnedCPUOffloadPolicy(policy_cls):
        """``CPUOffloadPolicy`` that never pins host memory (pinning needs an accelerator)."""

        def __post_init__(self):
            self.pin_memory = False

    return UnpinnedCPUOffloadPolicy


def _patch_fsdp_engine(module: ModuleType) -> None:
    if getattr(module, _MARK, False):
        return
    from verl.workers.engine.base import EngineRegistry

    for model_type, class_name in FSDP_ENGINES:
        registered = EngineRegistry._engines.get(model_type, {})
        backends = [b for b in FSDP_BACKENDS if "cpu" not in registered.get(b, {})]
        if backends:
            EngineRegistry.register(model_type=model_type, backend=backends, device="cpu")(
                getattr(module, class_name)
            )
    if _cpu_platform_active():
        module.CPUOffloadPolicy = _unpinned_offload_policy(module.CPUOffloadPolicy)
    setattr(module, _MARK, True)


def _register_packed_attention(_module: ModuleType) -> None:
    from .packed_attention import register

    register()


def install() -> None:
    """Install all patches (idempotent); each applies when its module is imported."""
    when_imported(TRANSFORMERS_MODELING_MODULE, _register_packed_attention)
    when_imported(DISTRIBUTED_MODULE, _patch_distributed)
    when_imported(ENGINE_WORKERS_MODULE, _rebind_distributed_in)
    when_imported(FSDP_ENGINE_MODULE, _patch_fsdp_engine)

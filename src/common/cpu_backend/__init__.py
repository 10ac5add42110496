"""CPU backend for verl 0.9.1: run verl's unmodified trainers on a machine without a GPU.

What it adds to verl, all through verl's own extension points:

* a ``cpu`` platform (``PlatformRegistry``): device ``cpu``, collectives ``gloo``;
* attention that keeps remove-padding's packed sequences apart at their own cost (``packed_attention``);
* the FSDP engines registered for device ``cpu`` (``EngineRegistry``), FSDP2 offload without
  pinned memory, and a ``gloo`` process group (see ``patches``);
* a Hugging Face ``generate`` rollout named :data:`ROLLOUT_NAME` (``RolloutReplicaRegistry`` +
  ``_ROLLOUT_REGISTRY``), with weight sync from the trained actor.

Activation: verl imports every module listed in ``VERL_USE_EXTERNAL_MODULES`` at the end of
``import verl``, in every process (driver, task runner, Ray workers). :data:`PLUGIN_MODULE` calls
:func:`activate` when imported, so a run only needs the environment of :func:`cpu_run_env` and
the overrides of :func:`cpu_hydra_overrides`. The platform is chosen by ``VERL_PLATFORM=cpu`` or,
once registered, automatically when no accelerator is visible.

The private verl names the backend reads or replaces are listed, with every other such name of the
project, in ``common.verl_surface``, which the launchers check before anything starts.

This module itself imports neither torch nor verl, so reading the settings is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

ROLLOUT_NAME = "hf"
PLUGIN_MODULE = "common.cpu_backend.plugin"
# the attention the trained and scoring models use on CPU (``packed_attention``)
PACKED_ATTENTION = "opd_packed_sdpa"
ADAPTER_FQN = "common.cpu_backend.hf_rollout.HFServerAdapter"


def gpu_available() -> bool:
    """True when this process sees a CUDA/ROCm GPU or an Ascend NPU."""
    from .platform import gpu_available as _gpu_available

    return _gpu_available()


def use_cpu_backend() -> bool:
    """Whether runs started from this process should use the CPU backend.

    ``VERL_PLATFORM`` decides when set (``cpu`` or not); otherwise the backend is used exactly when
    no accelerator is visible.
    """
    platform = os.environ.get("VERL_PLATFORM", "").strip().lower()
    if platform:
        return platform == "cpu"
    return not gpu_available()


_activated = False


def activate() -> None:
    """Register the CPU platform, engine patches and the HF rollout in this process (idempotent).

    Cheap: verl modules other than the platform registry are patched only when they get imported.
    """
    global _activated
    if _activated:
        return
    # Set first: registering the platform may trigger ``import verl``, which imports the plugin,
    # which calls activate() again.
    _activated = True
    try:
        from . import patches
        from ._import_hooks import when_imported
        from .platform import register_platform

        register_platform()
        patches.install()
        when_imported("verl.workers.rollout.base", _register_adapter)
        when_imported("verl.workers.rollout.replica", _register_replica)
    except BaseException:
        _activated = False
        raise


def _register_adapter(module) -> None:
    module._ROLLOUT_REGISTRY.setdefault((ROLLOUT_NAME, "async"), ADAPTER_FQN)


def _load_replica_class():
    from .hf_rollout import load_replica_class

    return load_replica_class()


def _register_replica(module) -> None:
    module.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)


def _src_root() -> str | None:
    """Folder holding the ``common`` package when it runs from a source tree, else None.

    An installed package needs no ``PYTHONPATH``, and putting ``site-packages`` on it would move it
    ahead of the standard library.
    """
    root = Path(__file__).resolve().parents[2]
    return None if root.name in ("site-packages", "dist-packages") else str(root)


def _append_csv(existing: str, item: str) -> str:
    parts = [p for p in existing.split(",") if p]
    return ",".join(parts if item in parts else [*parts, item])


def cpu_run_env(base: dict | None = None) -> dict[str, str]:
    """Environment variables a CPU run of verl needs, merged onto ``base`` (default ``os.environ``).

    * ``VERL_PLATFORM=cpu``: select the platform in every process;
    * ``VERL_USE_EXTERNAL_MODULES`` += :data:`PLUGIN_MODULE`: load this backend in every process;
    * ``PYTHONPATH`` += the folder holding ``common`` when running from a source tree: Ray workers
      of a local cluster inherit the driver's environment, so they import the plugin even before
      the project is pip-installed;
    * ``TOKENIZERS_PARALLELISM=false``: avoid fork warnings and oversubscribing the few cores;
    * ``OMP_NUM_THREADS`` = the cores this process may run on, unless set: Ray gives an actor that reserves
      one CPU or none (the training worker, the rollout server) a single torch thread, and the phases of a
      step take turns (generation, then teacher, then student), so each may use every core.
    """
    env = dict(os.environ if base is None else base)
    env["VERL_PLATFORM"] = "cpu"
    env["VERL_USE_EXTERNAL_MODULES"] = _append_csv(env.get("VERL_USE_EXTERNAL_MODULES", ""), PLUGIN_MODULE)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    root = _src_root()
    if root is not None and root not in paths:
        paths.insert(0, root)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    return env


def cpu_hydra_overrides(n_procs: int = 1, ray_cpus: int | None = None) -> list[str]:
    """Hydra overrides for ``verl.trainer.main_ppo`` on CPU with ``n_procs`` training processes.

    Args:
        n_procs: training processes (FSDP ranks) on this host; each gets one logical Ray GPU.
        ray_cpus: logical CPUs for Ray. Placement bundles ask for 3 CPUs per GPU and every helper
            actor (task runner, agent loop, reward, TransferQueue) for 1 more; the default leaves room.
    """
    ray_cpus = ray_cpus if ray_cpus is not None else 3 * n_procs + 8
    arf = "actor_rollout_ref"
    return [
        "trainer.device=cpu",
        "trainer.nnodes=1",
        f"trainer.n_gpus_per_node={n_procs}",
        f"++ray_kwargs.ray_init.num_gpus={n_procs}",
        f"ray_kwargs.ray_init.num_cpus={ray_cpus}",
        # FSDP1 needs a GPU for sync_module_states; FSDP2 runs on gloo.
        f"{arf}.actor.strategy=fsdp2",
        "critic.strategy=fsdp2",
        # flash-attention is the model default and needs a GPU; sdpa per packed sequence instead
        f"++{arf}.model.override_config.attn_implementation={PACKED_ATTENTION}",
        # torch.compile costs minutes of start-up on a few cores
        f"{arf}.actor.use_torch_compile=false",
        f"{arf}.actor.fsdp_config.use_torch_compile=false",
        f"{arf}.ref.fsdp_config.use_torch_compile=false",
        f"{arf}.rollout.name={ROLLOUT_NAME}",
        f"{arf}.rollout.tensor_model_parallel_size=1",
        f"{arf}.rollout.dtype=float32",
        # each of these defaults to 8 processes that start in parallel
        f"{arf}.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]

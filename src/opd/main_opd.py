"""Entry point: ``python -m opd.main_opd [hydra overrides]``.

Composes verl's trainer config with the ``opd:`` block (``config/opd_trainer.yaml``), validates every
``opd`` key and the teacher/student pairing before Ray or any model starts, selects the CPU backend when
no GPU is present, then runs verl's V1 task runner with ``trainer.v1.trainer_mode=opd``.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from opd.config import OPDConfig, OPDConfigError
from opd.pairing import check_pairing

# Imported in every verl process (driver, task runner, workers) so the "opd" trainer is registered.
_EXTERNAL_MODULES = ("opd.trainer",)
_CPU_ENV_KEYS = ("VERL_PLATFORM", "PYTHONPATH", "TOKENIZERS_PARALLELISM")


def validate_before_launch(config: DictConfig) -> OPDConfig:
    """Check the ``opd`` block, the model paths and the unsupported verl switches; fill derived keys."""
    with open_dict(config):
        if config.opd.get("max_length") is None:
            config.opd.max_length = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    opd_config = OPDConfig.from_dict(OmegaConf.to_container(config.opd, resolve=True)).validate()
    student_path = os.path.expanduser(str(config.actor_rollout_ref.model.path))
    if not os.path.isdir(student_path):
        raise OPDConfigError(f"actor_rollout_ref.model.path: no such folder: {student_path} (MODEL_PATH)")
    check_pairing(student_path, os.path.expanduser(opd_config.teacher_model_path))
    _reject_unsupported(config)
    _default_reward_function(config)
    return opd_config


def _default_reward_function(config: DictConfig) -> None:
    """Grade with the project's rewards (``rewards.compute_score``) unless the user chose a function."""
    import rewards.dispatch

    reward_fn = config.reward.custom_reward_function
    if not reward_fn.get("path"):
        with open_dict(config):
            reward_fn.path = rewards.dispatch.__file__
            reward_fn.name = "compute_score"


def _reject_unsupported(config: DictConfig) -> None:
    actor = config.actor_rollout_ref.actor
    unsupported = {
        "actor_rollout_ref.actor.use_kl_loss": actor.use_kl_loss,
        "algorithm.use_kl_in_reward": config.algorithm.use_kl_in_reward,
        "distillation.enabled": config.get("distillation", {}).get("enabled", False),
        "critic.enable": config.critic.get("enable", False),
    }
    for key, enabled in unsupported.items():
        if enabled:
            raise OPDConfigError(
                f"{key}=True is not supported by the OPD trainer (pure OPD needs no ref/critic)"
            )
    sp_size = actor.get("ulysses_sequence_parallel_size", 1)
    if sp_size and int(sp_size) > 1:
        raise OPDConfigError(
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size > 1 is not supported yet"
        )
    if config.trainer.v1.trainer_mode != "opd":
        raise OPDConfigError(f"trainer.v1.trainer_mode must be 'opd', got {config.trainer.v1.trainer_mode!r}")


def _export_env(config: DictConfig, env: dict[str, str]) -> None:
    """Set variables here and in Ray's runtime env, so every actor process sees them."""
    os.environ.update(env)
    with open_dict(config):
        runtime_env = config.ray_kwargs.ray_init.setdefault("runtime_env", {})
        env_vars = runtime_env.setdefault("env_vars", {})
        for key, value in env.items():
            env_vars[key] = value


def _external_modules_env(extra: tuple[str, ...]) -> dict[str, str]:
    present = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    modules = present + [m for m in (*extra, *_EXTERNAL_MODULES) if m not in present]
    return {"VERL_USE_EXTERNAL_MODULES": ",".join(modules)}


def _user_override_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def prepare(config: DictConfig) -> OPDConfig:
    """Everything that must happen before Ray starts: validation, backend choice, environment."""
    opd_config = validate_before_launch(config)
    from common import cpu_backend

    if cpu_backend.gpu_available():
        _export_env(config, _external_modules_env(()))
        return opd_config
    user_keys = _user_override_keys()
    overrides = [o.lstrip("+") for o in cpu_backend.cpu_hydra_overrides()]
    overrides = [o for o in overrides if o.split("=", 1)[0] not in user_keys]
    with open_dict(config):
        config.merge_with(OmegaConf.from_dotlist(overrides))
    cpu_env = cpu_backend.cpu_run_env()
    modules = tuple(m for m in cpu_env["VERL_USE_EXTERNAL_MODULES"].split(",") if m)
    exported = {key: cpu_env[key] for key in _CPU_ENV_KEYS if key in cpu_env}
    _export_env(config, {**exported, **_external_modules_env(modules)})
    return opd_config


@hydra.main(config_path="config", config_name="opd_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        prepare(config)
    except OPDConfigError as error:
        raise SystemExit(f"opd: configuration error: {error}") from None
    validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    run_ppo(config, task_runner_class=TaskRunnerV1)


if __name__ == "__main__":
    main()

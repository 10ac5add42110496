"""Entry point: ``python -m opd.main_opd [hydra overrides]``.

Composes verl's trainer config with the ``opd:`` block (``config/opd_trainer.yaml``), validates every
``opd`` key and the teacher/student pairing before Ray or any model starts, selects the CPU backend when
no GPU is present, then runs verl's V1 task runner with ``trainer.v1.trainer_mode=opd``.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, open_dict

from common.verl_surface import VerlSurfaceError, check_verl_surface
from opd.config import OPDConfig, OPDConfigError
from opd.input_checks import check_inputs, check_override_keys, data_paths
from opd.objectives.policy_gradient import TOKEN_LEVEL_POLICY_LOSSES
from opd.pairing import check_pairing

# Imported in every verl process (driver, task runner, workers) so the "opd" trainer is registered.
_EXTERNAL_MODULES = ("opd.trainer",)


def validate_before_launch(config: DictConfig) -> OPDConfig:
    """Check the ``opd`` block, the model paths and the unsupported verl switches; fill derived keys."""
    with open_dict(config):
        # the worker templates teacher prompts exactly as the dataset templated the student's
        template_kwargs = config.data.get("apply_chat_template_kwargs", {})
        config.actor_rollout_ref.apply_chat_template_kwargs = template_kwargs
        if config.opd.get("max_length") is None:
            config.opd.max_length = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    opd_config = OPDConfig.from_node(config.opd)
    student_path = os.path.expanduser(str(config.actor_rollout_ref.model.path))
    if not os.path.isdir(student_path):
        raise OPDConfigError(f"actor_rollout_ref.model.path: no such folder: {student_path} (MODEL_PATH)")
    check_inputs(config, opd_config, student_path, os.path.expanduser(opd_config.teacher_model_path))
    check_pairing(student_path, os.path.expanduser(opd_config.teacher_model_path))
    _reject_unsupported(config)
    _check_objective_needs(config, opd_config)
    _default_reward_function(config)
    return opd_config


def _default_reward_function(config: DictConfig) -> None:
    """Grade with the project's rewards unless the user chose a function; check prompts and reward agree.

    With the project's rewards, a ``\\boxed{}`` prompt graded by an ``Answer:`` parser (or a data source
    without a scorer) stops the run here instead of scoring every sample 0.
    """
    from rewards.agreement import check_reward_agreement

    reward_fn = config.reward.custom_reward_function
    if reward_fn.get("path"):
        return
    with open_dict(config):
        # by package, not by file: verl loads a file path as a module outside sys.modules
        reward_fn.path = "pkg://rewards.dispatch"
        reward_fn.name = "compute_score"
    try:
        check_reward_agreement([*data_paths(config.data.train_files), *data_paths(config.data.val_files)])
    except (ValueError, FileNotFoundError) as error:
        raise OPDConfigError(f"data.train_files / data.val_files: {error}") from None


def _reject_unsupported(config: DictConfig) -> None:
    actor = config.actor_rollout_ref.actor
    unsupported = {
        "actor_rollout_ref.actor.use_kl_loss": actor.use_kl_loss,
        "algorithm.use_kl_in_reward": config.algorithm.use_kl_in_reward,
        "distillation.enabled": config.get("distillation", {}).get("enabled", False),
        "critic.enable": config.critic.get("enable", False),
        # the OPD trainer marks a checkpoint complete only once every file of it is written
        "actor_rollout_ref.actor.checkpoint.async_save": actor.get("checkpoint", {}).get("async_save", False),
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


def _check_objective_needs(config: DictConfig, opd_config: OPDConfig) -> None:
    """Rollout settings the objective depends on: temperature rule, rollout log-probs, GRPO groups."""
    rollout = config.actor_rollout_ref.rollout
    opd_config.check_rollout_temperature(float(rollout.temperature))
    if opd_config.task_loss_coef > 0 and config.algorithm.adv_estimator == "grpo" and int(rollout.n) < 2:
        raise OPDConfigError(
            "opd.task_loss_coef > 0 with GRPO advantages needs actor_rollout_ref.rollout.n >= 2 "
            "(a group of one response has advantage 0)"
        )
    loss_mode = config.actor_rollout_ref.actor.policy_loss.loss_mode
    if opd_config.needs_rollout_log_probs and loss_mode not in TOKEN_LEVEL_POLICY_LOSSES:
        raise OPDConfigError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: the OPD policy-gradient "
            "terms pack the tokens of many responses into one row, so only token-level modes work: "
            f"{TOKEN_LEVEL_POLICY_LOSSES}"
        )
    if opd_config.needs_rollout_log_probs and not rollout.calculate_log_probs:
        with open_dict(config):
            rollout.calculate_log_probs = True
        print(
            f"[opd] opd.loss_type={opd_config.loss_type}, opd.task_loss_coef={opd_config.task_loss_coef}: "
            "the importance ratio needs rollout log-probs: "
            "actor_rollout_ref.rollout.calculate_log_probs=true",
            flush=True,
        )


def _user_override_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def prepare(config: DictConfig) -> OPDConfig:
    """Everything that must happen before Ray starts: validation, backend choice, environment."""
    opd_config = validate_before_launch(config)
    from common import launch

    launch.apply_to_config(config, _user_override_keys(), extra_modules=_EXTERNAL_MODULES)
    return opd_config


@hydra.main(config_path="config", config_name="opd_trainer", version_base=None)
def main(config: DictConfig) -> None:
    # first, so a verl other than the pinned one stops here with the missing names, not in a worker
    try:
        check_verl_surface()
    except VerlSurfaceError as error:
        raise SystemExit(f"opd: {error}") from None
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
    from opd.checkpoints import stop_on_signals

    # SIGINT / SIGTERM: checkpoint the last finished step, shut Ray down, exit non-zero
    with stop_on_signals(config.trainer.default_local_dir) as stoppable:
        run_ppo(config, task_runner_class=stoppable(TaskRunnerV1))


if __name__ == "__main__":
    # before hydra, which would answer a misspelt opd key with advice to append it
    try:
        check_override_keys(sys.argv[1:])
    except OPDConfigError as error:
        raise SystemExit(f"opd: configuration error: {error}") from None
    main()

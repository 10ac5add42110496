"""GRPO baselines on verl's own main_ppo: the three variants' commands, the backend launcher, and a real
two-step run of train_grpo.sh that is then resumed from its checkpoint."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from script_runs import SCRIPTS, dry_run, run_script, script_env, tiny_training_env
from subprocess_runs import step_metrics
from test_checkpoint import check_step_continues

from common import launch
from common.cpu_backend import use_cpu_backend
from data.arithmetic import write_arithmetic_dataset

ARF = "actor_rollout_ref"
E2E_TIMEOUT_S = 600


@pytest.fixture
def dry_env(tmp_path):
    """Just enough for the scripts' checks: an existing model folder and real data files."""
    (tmp_path / "model").mkdir()
    write_arithmetic_dataset(tmp_path / "data", train_size=4, val_size=2, seed=0)
    return script_env(
        dict(os.environ),
        MODEL_PATH=tmp_path / "model",
        DATA_DIR=tmp_path / "data",
        OUTPUT_ROOT=tmp_path / "out",
        GRPO_DRY_RUN=1,
        MAX_PROMPT_LENGTH=100,
        MAX_RESPONSE_LENGTH=400,
    )


def test_dapo_variant_command(dry_env):
    command, o = dry_run("grpo/train_grpo.sh", [], dry_env)
    assert command[1:3] == ["-m", "verl.trainer.main_ppo"]
    assert o["algorithm.adv_estimator"] == "grpo"
    assert (o[f"{ARF}.actor.clip_ratio_low"], o[f"{ARF}.actor.clip_ratio_high"]) == ("0.2", "0.28")
    assert o[f"{ARF}.actor.use_dynamic_bsz"] == "true"
    assert o[f"{ARF}.actor.ppo_max_token_len_per_gpu"] == "1000"  # 2 x (100 + 400)
    assert o[f"{ARF}.rollout.log_prob_max_token_len_per_gpu"] == "1500"
    assert o[f"{ARF}.actor.use_kl_loss"] == "false" and o["algorithm.use_kl_in_reward"] == "false"


def test_native_variant_command(dry_env):
    _, o = dry_run("grpo/train_grpo_native.sh", [], dry_env)
    assert o[f"{ARF}.actor.use_kl_loss"] == "true"
    assert o[f"{ARF}.actor.kl_loss_type"] == "low_var_kl" and o[f"{ARF}.actor.kl_loss_coef"] == "0.001"
    assert o[f"{ARF}.actor.clip_ratio_high"] == "0.2"
    assert f"{ARF}.actor.use_dynamic_bsz" not in o


def test_native_no_kl_variant_command(dry_env):
    _, o = dry_run("grpo/train_grpo_native_no_kl.sh", [], dry_env)
    assert o[f"{ARF}.actor.use_kl_loss"] == "false" and o["algorithm.use_kl_in_reward"] == "false"
    assert o[f"{ARF}.actor.clip_ratio_high"] == "0.2"
    assert f"{ARF}.actor.kl_loss_type" not in o


def test_environment_variables_and_overrides_reach_the_command(dry_env):
    env = {**dry_env, "TRAIN_BATCH_SIZE": "12", "ROLLOUT_N": "3", "LEARNING_RATE": "3e-6", "TOTAL_STEPS": "5"}
    command, o = dry_run(
        "grpo/train_grpo.sh", ["trainer.save_freq=7", f"{ARF}.actor.clip_ratio_high=0.3"], env
    )
    assert o["data.train_batch_size"] == "12" and o[f"{ARF}.actor.ppo_mini_batch_size"] == "12"
    assert o[f"{ARF}.rollout.n"] == "3" and o[f"{ARF}.actor.optim.lr"] == "3e-6"
    assert o["trainer.total_training_steps"] == "5"
    assert o["reward.custom_reward_function.path"] == "pkg://rewards.dispatch"
    # hydra applies overrides in order: the user's come last and win
    assert command[-2:] == ["trainer.save_freq=7", f"{ARF}.actor.clip_ratio_high=0.3"]
    assert o[f"{ARF}.rollout.name"] == ("hf" if use_cpu_backend() else "vllm")


def test_named_reward_grades_every_row_and_must_agree_with_the_prompts(dry_env):
    _, o = dry_run("grpo/train_grpo.sh", [], {**dry_env, "REWARD_FUNCTION": "arithmetic_reward"})
    assert o["reward.custom_reward_function.path"] == "pkg://eval.scoring"
    assert o["reward.custom_reward_function.name"] == "named_score"
    assert o["reward.custom_reward_function.reward_kwargs.reward"] == "arithmetic_reward"
    # the arithmetic prompts ask for \boxed{}: a reward reading "Answer:" lines would score all 0
    env = {**dry_env, "REWARD_FUNCTION": "dapo_reward"}
    result = subprocess.run(["bash", SCRIPTS / "grpo/train_grpo.sh"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "disagree" in result.stderr


def test_unknown_variant_and_missing_model_stop_the_script(dry_env, tmp_path):
    env = {**dry_env, "MODEL_PATH": str(tmp_path / "missing")}
    result = subprocess.run(["bash", SCRIPTS / "grpo/train_grpo.sh"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and f"MODEL_PATH={tmp_path / 'missing'}" in result.stderr
    snippet = f"source {SCRIPTS / 'lib/grpo.sh'}; run_grpo ppo_of_doom"
    result = subprocess.run(["bash", "-c", snippet], env=dry_env, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown GRPO variant 'ppo_of_doom'" in result.stderr


def test_launch_keeps_user_overrides_and_applies_gpu_defaults_only_on_gpu():
    command = ["python", "-m", "verl.trainer.main_ppo", "trainer.n_gpus_per_node=1", "+x.y=2"]
    final = launch.build_command(command, gpu_defaults=[f"{ARF}.rollout.name=vllm"])
    assert final[:3] == command[:3] and final[-2:] == command[-2:]
    keys = [launch.override_key(arg) for arg in final[3:]]
    assert len(keys) == len(set(keys))  # the user's key replaced the backend's, nothing duplicated
    if use_cpu_backend():
        assert f"{ARF}.rollout.name=hf" in final and "trainer.device=cpu" in final
    else:
        assert f"{ARF}.rollout.name=vllm" in final


@pytest.mark.slow
def test_train_grpo_two_steps_then_resume(isolated_run_env, tmp_path):
    run_dir = tmp_path / "run"
    env, inputs = tiny_training_env(
        isolated_run_env,
        tmp_path,
        SAVE_FREQ=1,
        TEST_FREQ=2,
        TOTAL_STEPS=2,
    )
    common_args = ["trainer.logger=[console]"]
    start = time.monotonic()
    rc, log = run_script(
        "grpo/train_grpo.sh",
        common_args,
        env,
        tmp_path,
        tmp_path / "first.log",
        E2E_TIMEOUT_S,
    )
    print(f"train_grpo.sh, 2 steps: {time.monotonic() - start:.1f}s wall")
    assert rc == 0, log[-6000:]
    metrics = step_metrics(log)
    assert set(metrics) == {0, 1, 2}, sorted(metrics)
    assert "val-core/opd/arithmetic/acc/mean@1" in metrics[0]
    assert float(metrics[2]["actor/grad_norm"]) > 0
    assert "actor/kl_loss" not in metrics[1]  # the DAPO-style variant has no KL term
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (run_dir / "global_step_1" / "actor").is_dir() and (run_dir / "global_step_2" / "actor").is_dir()

    start = time.monotonic()
    rc, log = run_script(
        "grpo/train_grpo.sh",
        [*common_args, "trainer.resume_mode=auto"],
        {**env, "TOTAL_STEPS": "3"},
        tmp_path,
        tmp_path / "resumed.log",
        E2E_TIMEOUT_S,
    )
    print(f"train_grpo.sh resumed for step 3: {time.monotonic() - start:.1f}s wall")
    assert rc == 0, log[-6000:]
    # the step counter continues: validation at the restored step 2, then only step 3 trains
    assert set(step_metrics(log)) == {2, 3}
    assert (run_dir / "global_step_3" / "actor").is_dir()

    # The weights and optimizer state the resumed run started from are the saved step-2 ones: its step 3
    # replays exactly as an AdamW step from them. (Greedy validation answers are no fingerprint of the
    # weights: the rollout server batches prompts as they come, and near-ties flip with the batch.)
    actor = run_dir / "global_step_{}" / "actor"
    check_step_continues(str(actor).format(2), str(actor).format(3), inputs["model"])

"""Running the shell scripts under scripts/ from tests: tiny inputs, a clean environment, dry-run parsing."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from subprocess_runs import run_in_own_group
from tiny_models import build_tiny_model

from data.arithmetic import write_arithmetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# Variables the scripts read: a developer's shell must not leak them into a test.
SCRIPT_VARS = tuple(
    """
    MODEL_PATH TEACHER_MODEL_PATH MODEL_NAME DATA_DIR TRAIN_FILES VAL_FILES EVAL_FILES OUTPUT_ROOT
    RUN_DIR EVAL_DIR TRAIN_BATCH_SIZE PPO_MINI_BATCH_SIZE PPO_MICRO_BATCH_SIZE_PER_GPU LEARNING_RATE
    TOTAL_EPOCHS TOTAL_STEPS MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH ROLLOUT_N TP_SIZE GPU_MEMORY_UTIL
    NNODES N_GPUS_PER_NODE SAVE_FREQ TEST_FREQ VAL_BATCH_SIZE REWARD_FUNCTION REWARD_FUNCTION_NAME
    INSTRUCTION_VARIANT VAL_N VAL_TEMPERATURE VAL_TOP_P VAL_TOP_K GRPO_DRY_RUN EVAL_DRY_RUN
    KL_LOSS_COEF CHECKPOINT_PATH TARGET_DIR PPO_MAX_TOKEN_LEN_PER_GPU LOG_PROB_MAX_TOKEN_LEN_PER_GPU
    """.split()
)

# Sized for a tiny model on 2 cores. The byte tokenizer makes an arithmetic prompt ~230 tokens.
TINY_TRAINING = {
    "TRAIN_BATCH_SIZE": "4",
    "ROLLOUT_N": "2",
    "MAX_PROMPT_LENGTH": "256",
    "MAX_RESPONSE_LENGTH": "16",
    "PPO_MICRO_BATCH_SIZE_PER_GPU": "4",
    "VAL_BATCH_SIZE": "8",
    # a large step, so the weights (and greedy answers) visibly change in one or two steps
    "LEARNING_RATE": "1e-2",
}

# Rewards that depend on the text of a random model's answer, so GRPO advantages and pass@k are not
# all zero (the real rule-based rewards would score every answer 0).
LENGTH_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return min(len(solution_str), 20) / 20.0
"""
PARITY_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return float(len(solution_str.encode()) % 2 == 0)
"""


def write_inputs(root: Path, reward: str = LENGTH_REWARD) -> dict[str, Path]:
    """A tiny model, the arithmetic data (16 train / 8 val prompts) and a reward file under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    reward_file = root / "reward.py"
    reward_file.write_text(reward)
    write_arithmetic_dataset(root / "data", train_size=16, val_size=8, seed=0)
    return {"model": build_tiny_model(root / "model", seed=0), "data": root / "data", "reward": reward_file}


def script_env(base: dict[str, str], **variables: str | Path) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SCRIPT_VARS}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def tiny_training_env(
    base: dict[str, str], tmp_path: Path, **variables: str | Path | int
) -> tuple[dict[str, str], dict[str, Path]]:
    """Environment and inputs of a script run training the tiny model of :func:`write_inputs`."""
    inputs = write_inputs(tmp_path / "inputs")
    env = script_env(
        base,
        MODEL_PATH=inputs["model"],
        DATA_DIR=inputs["data"],
        REWARD_FUNCTION=inputs["reward"],
        OUTPUT_ROOT=tmp_path / "out",
        RUN_DIR=tmp_path / "run",
        **{**TINY_TRAINING, **variables},
    )
    return env, inputs


def run_script(script: str, args, env, cwd: Path, log_path: Path, timeout: float) -> tuple[int, str]:
    """``bash scripts/<script> args`` in its own process group; returns the exit code and the log."""
    rc = run_in_own_group(["bash", str(SCRIPTS / script), *map(str, args)], env, cwd, log_path, timeout)
    return rc, log_path.read_text(errors="replace")


def dry_run(script: str, args, env) -> tuple[list[str], dict[str, str]]:
    """The command a ``*_DRY_RUN=1`` script would run, and its overrides as ``{key: value}`` (last wins)."""
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# backend:"))
    body = [line for line in lines[start + 1 :] if not line.startswith("export ")]
    command = shlex.split(" ".join(line.removesuffix("\\") for line in body))
    overrides = {}
    for arg in command:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            overrides[key.lstrip("+")] = value
    return command, overrides

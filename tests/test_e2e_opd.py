"""``python -m opd.main_opd`` end to end through Ray on tiny models, and its fail-fast config checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from subprocess_runs import run_in_own_group
from tiny_models import build_tiny_model

from data.arithmetic import write_arithmetic_dataset

E2E_TIMEOUT_S = 600
STEPS, PROMPTS_PER_STEP, ROLLOUT_N, RESPONSE_LEN = 2, 4, 2, 16


@pytest.fixture(scope="module")
def pair_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_e2e")
    build_tiny_model(root / "student", num_layers=2, seed=0)
    build_tiny_model(root / "teacher", num_layers=3, seed=1)
    train, val = write_arithmetic_dataset(root / "data", train_size=16, val_size=8, seed=0)
    return root, train, val


def _command(root, train, val, *extra: str) -> list[str]:
    arf = "actor_rollout_ref"
    return [
        sys.executable,
        "-m",
        "opd.main_opd",
        f"data.train_files={train}",
        f"data.val_files={val}",
        f"data.train_batch_size={PROMPTS_PER_STEP}",
        "data.val_batch_size=8",
        "data.max_prompt_length=160",
        f"data.max_response_length={RESPONSE_LEN}",
        f"{arf}.model.path={root / 'student'}",
        f"opd.teacher_model_path={root / 'teacher'}",
        f"{arf}.actor.ppo_mini_batch_size={PROMPTS_PER_STEP}",
        f"{arf}.actor.ppo_micro_batch_size_per_gpu=2",
        f"{arf}.rollout.log_prob_micro_batch_size_per_gpu=2",
        f"{arf}.rollout.n={ROLLOUT_N}",
        f"{arf}.actor.optim.lr=1e-3",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.save_freq={STEPS}",
        f"trainer.test_freq={STEPS}",
        f"trainer.default_local_dir={root / 'run'}",
        "opd.val_num_prompts=4",
        "opd.val_max_new_tokens=8",
        *extra,
    ]


@pytest.mark.slow
def test_two_opd_steps_through_ray(pair_and_data, isolated_run_env, tmp_path):
    root, train, val = pair_and_data
    log_path = tmp_path / "opd.log"
    start = time.monotonic()
    rc = run_in_own_group(_command(root, train, val), isolated_run_env, tmp_path, log_path, E2E_TIMEOUT_S)
    print(f"OPD {STEPS} steps through Ray on CPU: {time.monotonic() - start:.1f}s wall")
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-6000:]

    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert set(by_step) == {0, 1, 2}
    for step in (1, 2):
        # rollout.n honoured: every prompt sampled n times, each sample in the update
        assert by_step[step]["opd/num_samples"] == PROMPTS_PER_STEP * ROLLOUT_N
        assert 0 < by_step[step]["opd/num_tokens"] <= PROMPTS_PER_STEP * ROLLOUT_N * RESPONSE_LEN
        assert by_step[step]["opd/loss"] > 0
    for step in (0, 2):
        assert by_step[step]["val-opd/reverse_kl"] > 0
        assert by_step[step]["val-opd/teacher_answer_nll"] > 0
    assert "[opd] step 2/2" in log and "held-out summary" in log
    assert (root / "run" / "global_step_2" / "actor").is_dir()
    assert (root / "run" / "training_curves.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("opd.loss_type=kl_of_doom", "opd.loss_type"),
        ("actor_rollout_ref.actor.use_kl_loss=true", "use_kl_loss"),
    ],
)
def test_bad_config_fails_before_ray_starts(pair_and_data, isolated_run_env, override, message):
    root, train, val = pair_and_data
    result = subprocess.run(
        _command(root, train, val, override),
        env=isolated_run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "ray init kwargs" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "extra", "cache_bytes"),
    [
        ("forward_kl_topk", ("opd.topk=8",), 8 * 8 + 8),
        ("sampled_rkl_pg", ("opd.tip_keep_fraction=0.5",), 4),
        ("iw_opd", ("opd.task_loss_coef=0.5", "opd.tip_score=entropy_plus_divergence"), 4),
    ],
)
def test_compact_signal_objectives_through_ray(
    pair_and_data, isolated_run_env, tmp_path, objective, extra, cache_bytes
):
    """Each compact teacher signal in a real run; for the policy-gradient objectives the rollout's own
    log-probs reach the importance ratio, and GRPO advantages reach the task loss."""
    root, train, val = pair_and_data
    run_dir = tmp_path / "run"
    overrides = (
        f"opd.loss_type={objective}",
        "trainer.total_training_steps=1",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        f"trainer.default_local_dir={run_dir}",
        *extra,
    )
    log_path = tmp_path / "opd.log"
    start = time.monotonic()
    rc = run_in_own_group(
        _command(root, train, val, *overrides), isolated_run_env, tmp_path, log_path, E2E_TIMEOUT_S
    )
    print(f"{objective} 1 step through Ray on CPU: {time.monotonic() - start:.1f}s wall")
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-6000:]
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["opd/cache_bytes_per_token"] == cache_bytes and record["opd/skipped_step"] == 0
    assert record["opd/grad_norm"] > 0
    if objective == "forward_kl_topk":
        assert 0 < record["opd/teacher_topk_mass"] <= 1
        return
    assert "calculate_log_probs=true" in log
    # the rollout engine samples from the same weights: the ratio starts at 1 (up to bf16 noise)
    assert abs(record["opd/pg/ppo_kl"]) < 0.05
    assert 0.5 <= record["opd/kept_token_fraction"] <= (0.75 if "tip_keep" in " ".join(extra) else 1.0)
    if objective == "iw_opd":
        assert 1.0 <= record["opd/iw_opd/weight_min"] <= record["opd/iw_opd/weight_max"] <= 1.5 + 1e-6
        assert "opd/task/pg_clipfrac" in record


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["template", "column"])
def test_privileged_teacher_prompt_through_ray(pair_and_data, isolated_run_env, tmp_path, mode):
    """Self-distillation with a privileged teacher prompt: one step and the held-out trace gaps."""
    root, _, _ = pair_and_data
    train, val = write_arithmetic_dataset(
        tmp_path / "data", train_size=8, val_size=4, seed=0, teacher_context="solution"
    )
    run_dir = tmp_path / "run"
    command = _command(root, train, val, f"opd.teacher_prompt={mode}", "trainer.total_training_steps=1")
    # the student is its own teacher: only the teacher's prompt differs
    command = [arg.replace(str(root / "teacher"), str(root / "student")) for arg in command]
    # the teacher's prompt (answer or worked solution) is longer than the student's
    command += ["opd.max_length=1024", "trainer.save_freq=-1", "trainer.test_freq=1"]
    command += [f"trainer.default_local_dir={run_dir}"]
    rc = run_in_own_group(command, isolated_run_env, tmp_path, tmp_path / "opd.log", E2E_TIMEOUT_S)
    assert rc == 0, (tmp_path / "opd.log").read_text(errors="replace")[-6000:]
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # the same weights on both sides: only the privileged prompt makes the divergence non-zero
    assert records[1]["opd/loss"] > 1e-4
    for step in (0, 1):
        assert (
            "val-opd/teacher_trace_nll_gap" in records[step] and "val-opd/final_answer_gap" in records[step]
        )

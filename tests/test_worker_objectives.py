"""Every objective selected by config in the real worker: verl FSDP engines, tiny models, padded teacher."""

import pytest
import torch
from opd_harness import full_state, rollout_batch, tiny_worker, with_advantages, with_rollout_log_probs
from test_worker import models  # noqa: F401  (module-scoped fixture: student, padded-vocabulary teacher)

from opd.objectives.divergences import LOSS_REGISTRY
from opd.objectives.policy_gradient import PG_OBJECTIVES
from opd.objectives.topk import TOPK_LOSS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL_OBJECTIVES = sorted({*LOSS_REGISTRY, TOPK_LOSS, *PG_OBJECTIVES})


def _batch(student: str, seed: int, temperature: float = 1.0):
    return with_rollout_log_probs(rollout_batch(4, seed=seed), student, temperature)


@pytest.mark.parametrize("loss_type", ALL_OBJECTIVES)
def test_each_objective_trains_a_step(models, loss_type):  # noqa: F811
    student, teacher = models
    worker = tiny_worker(student, teacher, f"opd.loss_type={loss_type}", "opd.topk=8")
    before = full_state(worker.student.module)
    metrics = worker.update_actor(_batch(student, seed=20))["metrics"]
    after = full_state(worker.student.module)
    assert metrics["opd/skipped_step"] == 0 and metrics["opd/grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert metrics["opd/kept_token_fraction"] == 1.0
    assert metrics["opd/teacher_floored_fraction"] == 0  # reported by every objective; no -inf here


def test_cache_bytes_per_token_follow_the_signal(models):  # noqa: F811
    student, teacher = models
    data = _batch(student, seed=21)
    cost = {
        loss: tiny_worker(student, teacher, f"opd.loss_type={loss}", "opd.topk=8").update_actor(data)[
            "metrics"
        ]["opd/cache_bytes_per_token"]
        for loss in ("reverse_kl", TOPK_LOSS, "sampled_rkl_pg")
    }
    # hidden (the default for a plain linear teacher head): bf16 over H = 64; top-k: 8 x (id + log-prob)
    # + tail + sampled; sampled: fp32
    assert cost == {"reverse_kl": 2 * 64, TOPK_LOSS: 8 * 8 + 8, "sampled_rkl_pg": 4}


@pytest.mark.parametrize("loss_type", PG_OBJECTIVES)
def test_rollout_log_probs_stay_aligned_per_row(models, loss_type):  # noqa: F811
    """Prompts of different lengths in one batch: the ratio is 1 up to bf16 noise only if rows align."""
    student, teacher = models
    data = _batch(student, seed=22)
    assert len({p.numel() for p in data["prompts"].unbind()}) > 1
    metrics = tiny_worker(student, teacher, f"opd.loss_type={loss_type}").update_actor(data)["metrics"]
    assert abs(metrics["opd/pg/ppo_kl"]) < 1e-3 and metrics["opd/pg/pg_clipfrac"] == 0
    shifted = data.clone()
    rows = [row.roll(1) for row in data["rollout_log_probs"].unbind()]
    shifted["rollout_log_probs"] = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    bad = tiny_worker(student, teacher, f"opd.loss_type={loss_type}").update_actor(shifted)["metrics"]
    assert abs(bad["opd/pg/ppo_kl"]) > 100 * abs(metrics["opd/pg/ppo_kl"])


def test_iw_opd_reports_its_prefix_weights(models):  # noqa: F811
    student, teacher = models
    worker = tiny_worker(student, teacher, "opd.loss_type=iw_opd", "opd.iw_opd_gamma=0.5")
    metrics = worker.update_actor(_batch(student, seed=23))["metrics"]
    assert 1.0 <= metrics["opd/iw_opd/weight_min"] < metrics["opd/iw_opd/weight_mean"]
    assert metrics["opd/iw_opd/weight_mean"] < metrics["opd/iw_opd/weight_max"] <= 1.5 + 1e-6
    assert metrics["opd/iw_opd/abs_advantage_mean"] > 0


def test_policy_gradient_objective_without_rollout_log_probs_fails_clearly(models):  # noqa: F811
    student, teacher = models
    worker = tiny_worker(student, teacher, "opd.loss_type=iw_opd")
    with pytest.raises(ValueError, match="calculate_log_probs=true"):
        worker.update_actor(rollout_batch(4, seed=24))


def test_iw_opd_rejects_a_loss_temperature_other_than_the_rollouts(models):  # noqa: F811
    from opd.config import OPDConfigError

    student, teacher = models
    with pytest.raises(OPDConfigError, match="rollout.temperature"):
        tiny_worker(student, teacher, "opd.loss_type=iw_opd", "actor_rollout_ref.rollout.temperature=0.7")


def test_tip_keeps_the_configured_fraction_of_tokens(models):  # noqa: F811
    student, teacher = models
    data = rollout_batch(4, seed=25)
    lr0 = "actor_rollout_ref.actor.optim.lr=0"
    full = tiny_worker(student, teacher, lr0).update_actor(data)["metrics"]
    tip = tiny_worker(student, teacher, lr0, "opd.tip_keep_fraction=0.5").update_actor(data)["metrics"]
    # ceil(0.5 * n) per response: at least half, a little more for odd lengths
    assert 0.5 <= tip["opd/kept_token_fraction"] < 0.7
    assert tip["opd/num_tokens"] == full["opd/num_tokens"]
    # the kept tokens are the uncertain ones: their mean divergence differs from the all-token mean
    assert tip["opd/loss"] != pytest.approx(full["opd/loss"], rel=1e-3)
    both = tiny_worker(
        student, teacher, lr0, "opd.tip_keep_fraction=0.5", "opd.tip_score=entropy_plus_divergence"
    )
    assert 0.5 <= both.update_actor(data)["metrics"]["opd/kept_token_fraction"] < 0.7


def test_grpo_plus_opd_adds_the_task_policy_loss(models):  # noqa: F811
    student, teacher = models
    task_only = ("opd.distill_loss_coef=0", "opd.task_loss_coef=1.0")
    # no task signal and the distillation loss off: nothing moves
    flat = with_advantages(_batch(student, seed=26), [0.0, 0.0, 0.0, 0.0])
    assert tiny_worker(student, teacher, *task_only).update_actor(flat)["metrics"]["opd/grad_norm"] == 0
    data = with_advantages(_batch(student, seed=26), [1.0, -1.0, 0.5, -0.5])
    task = tiny_worker(student, teacher, *task_only).update_actor(data)["metrics"]
    assert task["opd/grad_norm"] > 0 and "opd/task/pg_clipfrac" in task
    pure = tiny_worker(student, teacher).update_actor(data)["metrics"]
    mixed = tiny_worker(student, teacher, "opd.task_loss_coef=1.0").update_actor(data)["metrics"]
    assert mixed["opd/grad_norm"] != pytest.approx(pure["opd/grad_norm"], rel=1e-3)
    assert mixed["opd/loss"] == pytest.approx(pure["opd/loss"], rel=1e-5)

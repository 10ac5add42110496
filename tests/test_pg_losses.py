"""Sampled-token policy-gradient objectives (opd.objectives.policy_gradient, opd.objectives) against float64
references."""

from __future__ import annotations

import pytest
import torch
from test_losses import make_inputs

from opd.config import OPDConfig
from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective
from opd.objectives.divergences import LOSS_REGISTRY
from opd.objectives.policy_gradient import (
    IW_OPD,
    PG_OBJECTIVES,
    SAMPLED_RKL_PG,
    chunked_token_logp,
    iw_opd_prefix_weights,
    policy_gradient_loss,
    sampled_token_stats,
)
from opd.objectives.teacher_signal import CachedSignal, teacher_sampled_logp, teacher_topk_signal
from opd.objectives.topk import TOPK_LOSS

CLIP = 0.2


@pytest.fixture(scope="module")
def policy_config():
    from inprocess import compose_opd_config
    from verl.utils.config import omega_conf_to_dataclass

    config = compose_opd_config(
        "student", "teacher", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"
    )
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.clip_ratio == CLIP and actor.policy_loss.loss_mode == "vanilla"
    return actor


def ref_token_logp(logits, ids, temperature, vocab):
    return (
        torch.log_softmax(logits[:, :vocab].double() / temperature, -1).gather(-1, ids[:, None]).squeeze(-1)
    )


def ref_ppo_clip(logp, old, adv, weights):
    """Textbook PPO-clip with dual clip 3, per-token weights; float64 scalar."""
    ratio = torch.exp((logp - old).clamp(-20, 20))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    per_token = torch.where(adv < 0, torch.minimum(-adv * 3.0, clipped), clipped)
    return (per_token * weights).sum()


def ref_prefix_weights(adv, lengths, gamma, eps):
    out, start = [], 0
    for length in lengths:
        d = adv[start : start + length].abs().tolist()
        total = max(sum(d), eps)
        out += [1 + gamma * (1 - sum(d[:t]) / total) for t in range(length)]
        start += length
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize(("n", "chunk"), [(13, 4), (8, 64)])
def test_chunked_token_logp_value_and_gradient(temperature, n, chunk):
    student, _, ids, _ = make_inputs(n, 37, 31, seed=3)
    grad_out = torch.randn(n, dtype=torch.float64)
    grad_out[1] = 0.0
    x = student.clone().requires_grad_(True)
    got = chunked_token_logp(x, ids, temperature=temperature, chunk_size=chunk, vocab=31)
    (got.double() * grad_out).sum().backward()
    ref_x = student.double().requires_grad_(True)
    want = ref_token_logp(ref_x, ids, temperature, 31)
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-6)
    # columns past the shared vocabulary get exactly zero gradient
    assert torch.count_nonzero(x.grad[:, 31:]) == 0


def test_sampled_token_stats_match_the_reference():
    student, _, ids, _ = make_inputs(11, 23, dtype=torch.float64, seed=4)
    logp, entropy = sampled_token_stats(student, ids, temperature=0.8, chunk_size=3, vocab=23)
    full = torch.log_softmax(student / 0.8, -1)
    torch.testing.assert_close(logp, full.gather(-1, ids[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))


def test_iw_opd_prefix_weights_known_values():
    # the strict prefix: the first token always gets 1 + gamma
    weights = iw_opd_prefix_weights(torch.tensor([0.2, -0.3, 0.5]), [3], gamma=0.5, epsilon=1e-8)
    torch.testing.assert_close(weights, torch.tensor([1.5, 1.4, 1.25]))


def test_iw_opd_prefix_weights_per_response_against_the_reference():
    g = torch.Generator().manual_seed(5)
    lengths = [4, 1, 7, 3]
    adv = torch.randn(sum(lengths), generator=g, dtype=torch.float64)
    adv[5:7] = 0.0  # masked tokens carry no discrepancy
    got = iw_opd_prefix_weights(adv, lengths, gamma=0.7, epsilon=1e-8)
    torch.testing.assert_close(got, ref_prefix_weights(adv, lengths, 0.7, 1e-8))
    assert bool(((got >= 1) & (got <= 1.7 + 1e-12)).all())
    for row in got.split(lengths):  # never rises along a response
        assert bool((row[1:] <= row[:-1] + 1e-12).all())
    # a response without discrepancy keeps 1 + gamma everywhere; gamma 0 is plain sampled-token OPD
    assert torch.equal(
        iw_opd_prefix_weights(torch.zeros(3), [3], gamma=0.5, epsilon=1e-8), torch.full((3,), 1.5)
    )
    assert torch.equal(iw_opd_prefix_weights(adv, lengths, gamma=0.0, epsilon=1e-8), torch.ones_like(adv))


def test_policy_gradient_loss_is_verls_ppo_clip_with_token_weights(policy_config):
    g = torch.Generator().manual_seed(6)
    n = 40
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[::5] = 0.0
    old_with_junk = old.clone()
    old_with_junk[::5] = float("nan")  # masked rows may hold anything
    loss, metrics = policy_gradient_loss(logp, old_with_junk, adv, weights, policy_config)
    ref_logp = logp.detach().clone().requires_grad_(True)
    want = ref_ppo_clip(ref_logp, old, adv, weights)
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    assert set(metrics) >= {"pg_clipfrac", "ppo_kl"} and 0 < metrics["pg_clipfrac"] < 1


# ------------------------------------------------------------------------------------------------------------
# Objectives through the common interface
# ------------------------------------------------------------------------------------------------------------


def _tokens(student, ids, lengths, rollout_logp, rollout_temperature, chunk=5):
    return MicroBatchTokens(
        student=student,
        token_ids=ids,
        mask=torch.ones(ids.shape[0]),
        lengths=lengths,
        rollout_logp=rollout_logp,
        chunk_size=chunk,
        rollout_temperature=rollout_temperature,
    )


def _signal(loss_type, teacher, ids, temperature, vocab) -> CachedSignal:
    options = dict(temperature=temperature, chunk_size=4, vocab_limit=vocab)
    if loss_type in PG_OBJECTIVES:
        return CachedSignal(sampled_logp=teacher_sampled_logp(teacher, ids, **options))
    if loss_type == TOPK_LOSS:
        return CachedSignal(
            topk=teacher_topk_signal(teacher, 6, **options),
            sampled_logp=teacher_sampled_logp(teacher, ids, **options),
        )
    return CachedSignal(logits=teacher.to(torch.bfloat16))


def _objective(loss_type, student, teacher, ids, *, temperature, rollout_temperature, policy_config, lengths):
    """(loss, grad of the student logits, output) of one objective; the rollout log-probs are exact."""
    config = OPDConfig(teacher_model_path="unused", loss_type=loss_type, temperature=temperature)
    ctx = ObjectiveContext(
        config, step=1, rollout_temperature=rollout_temperature, policy_config=policy_config
    )
    x = student.clone().requires_grad_(True)
    rollout_logp = ref_token_logp(student, ids, rollout_temperature, student.shape[1]).float()
    tokens = _tokens(x, ids, lengths, rollout_logp, rollout_temperature)
    signal = _signal(loss_type, teacher, ids, temperature, student.shape[1])
    weights = torch.full((ids.shape[0],), 1.0 / ids.shape[0])
    out = distillation_objective(tokens, signal, weights, ctx)
    out.loss.backward()
    return out.loss.detach(), x.grad, out


ALL_OBJECTIVES = sorted({*LOSS_REGISTRY, TOPK_LOSS, *PG_OBJECTIVES})


@pytest.mark.parametrize("loss_type", ALL_OBJECTIVES)
@pytest.mark.parametrize(
    ("temperature", "rollout_temperature"), [(1.0, 1.0), (1.0, 0.6), (0.7, 0.7), (1.5, 1.0)]
)
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(
    loss_type, temperature, rollout_temperature, policy_config
):
    if loss_type == IW_OPD and temperature != rollout_temperature:
        pytest.skip("iw_opd requires opd.temperature == rollout temperature (checked at launch)")
    logits, _, ids, _ = make_inputs(12, 29, seed=7)
    # bf16-representable logits, so the full-vocabulary teacher cache holds exactly the student
    logits = logits.to(torch.bfloat16).float()
    loss, grad, _ = _objective(
        loss_type,
        logits,
        logits,
        ids,
        temperature=temperature,
        rollout_temperature=rollout_temperature,
        policy_config=policy_config,
        lengths=[5, 7],
    )
    assert abs(float(loss)) < 1e-6
    assert float(grad.abs().max()) < 1e-6


@pytest.mark.parametrize("loss_type", PG_OBJECTIVES)
def test_policy_gradient_objectives_against_the_reference(loss_type, policy_config):
    """At ratio 1 the gradient is -sum_t w_t A_t d log p_Tr(y_t) / d z, A from the float64 reference."""
    student, teacher, ids, _ = make_inputs(12, 29, seed=8)
    lengths = [5, 7]
    temperature = rollout_temperature = 0.8
    loss, grad, out = _objective(
        loss_type,
        student,
        teacher,
        ids,
        temperature=temperature,
        rollout_temperature=rollout_temperature,
        policy_config=policy_config,
        lengths=lengths,
    )
    s = ref_token_logp(student, ids, temperature, 29)
    q = ref_token_logp(teacher, ids, temperature, 29)
    r = ref_token_logp(student, ids, rollout_temperature, 29)
    adv = q - s if loss_type == SAMPLED_RKL_PG else (q - r) * ref_prefix_weights(q - r, lengths, 0.5, 1e-8)
    weights = torch.full((12,), 1.0 / 12, dtype=torch.float64)
    x = student.double().requires_grad_(True)
    want = ref_ppo_clip(ref_token_logp(x, ids, rollout_temperature, 29), r, adv, weights)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.divergence.double(), s - q, rtol=1e-5, atol=1e-6)
    if loss_type == IW_OPD:
        assert set(out.token_metrics) >= {"iw_opd/weight_mean", "iw_opd/abs_advantage_mean"}


def test_rollout_temperature_changes_the_ratio_not_the_distillation_signal(policy_config):
    """sampled_rkl_pg at T=1: the advantage (and so the loss at ratio 1) ignores the rollout temperature."""
    student, teacher, ids, _ = make_inputs(12, 29, seed=9)
    runs = [
        _objective(
            SAMPLED_RKL_PG,
            student,
            teacher,
            ids,
            temperature=1.0,
            rollout_temperature=t_r,
            policy_config=policy_config,
            lengths=[12],
        )
        for t_r in (1.0, 0.6)
    ]
    (loss_a, grad_a, out_a), (loss_b, grad_b, out_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(
        out_a.token_metrics["pg/advantage_mean"], out_b.token_metrics["pg/advantage_mean"]
    )
    # the score function is taken at the rollout temperature, where the samples came from
    assert not torch.allclose(grad_a, grad_b)


def test_missing_rollout_log_probs_name_the_switch(policy_config):
    student, teacher, ids, _ = make_inputs(6, 17, seed=10)
    config = OPDConfig(teacher_model_path="unused", loss_type=SAMPLED_RKL_PG)
    ctx = ObjectiveContext(config, step=1, rollout_temperature=1.0, policy_config=policy_config)
    tokens = _tokens(student, ids, [6], None, 1.0)
    with pytest.raises(ValueError, match="calculate_log_probs"):
        distillation_objective(tokens, _signal(SAMPLED_RKL_PG, teacher, ids, 1.0, 17), torch.ones(6), ctx)


@pytest.mark.parametrize("loss_type", PG_OBJECTIVES)
def test_minus_infinity_teacher_entries_never_make_nan(loss_type, policy_config):
    """-inf teacher logits off the sampled tokens, and on the sampled token of a masked row."""
    student, teacher, ids, _ = make_inputs(10, 19, seed=11)
    teacher[:, 15:] = float("-inf")
    ids = ids.clamp(max=14)
    teacher[3, ids[3]] = float("-inf")
    config = OPDConfig(teacher_model_path="unused", loss_type=loss_type)
    ctx = ObjectiveContext(config, step=1, rollout_temperature=1.0, policy_config=policy_config)
    x = student.clone().requires_grad_(True)
    rollout_logp = ref_token_logp(student, ids, 1.0, 19).float()
    tokens = _tokens(x, ids, [4, 6], rollout_logp, 1.0)
    tokens.mask[3] = 0.0
    weights = tokens.mask / tokens.mask.sum()
    out = distillation_objective(tokens, _signal(loss_type, teacher, ids, 1.0, 19), weights, ctx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and bool(torch.isfinite(x.grad).all())
    assert torch.count_nonzero(x.grad[3]) == 0

"""Teacher log-probs of -inf on weighted tokens: every objective floors them, stays finite and counts them.

The rule (``opd.objectives.teacher_signal``): after the log-softmax at the loss temperature, every teacher
log-prob an objective reads is raised to ``TEACHER_LOGP_FLOOR``. The float64 references here apply that floor
and nothing else; the helpers also serve ``test_padded_heads.py`` and ``test_fused_head.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_losses import _ref_divergence, _ref_kl, make_inputs
from test_pg_losses import policy_config, ref_ppo_clip, ref_prefix_weights  # noqa: F401
from test_skew_losses import _ref_skew

from opd.config import OPDConfig
from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective
from opd.objectives.divergences import LOSS_REGISTRY
from opd.objectives.policy_gradient import PG_OBJECTIVES, SAMPLED_RKL_PG
from opd.objectives.teacher_signal import TEACHER_LOGP_FLOOR, SignalSpec, signal_from_logits
from opd.objectives.topk import TOPK_LOSS

NEG_INF = float("-inf")
TEMPERATURE = 0.8  # loss and rollout temperature alike: iw_opd requires them equal
CHUNK = 5
LENGTHS = [5, 7]
STEP = 1  # with paced_blend_steps = 2 forward_then_reverse_kl weighs both KLs by 0.5
FLOORED = "teacher_floored_fraction"
ALL_OBJECTIVES = sorted({*LOSS_REGISTRY, TOPK_LOSS, *PG_OBJECTIVES})


def make_config(loss_type: str, **overrides) -> OPDConfig:
    return OPDConfig(
        teacher_model_path="unused",
        loss_type=loss_type,
        temperature=TEMPERATURE,
        topk=6,
        paced_blend_steps=2,
        **overrides,
    )


def rollout_logp(student: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float64 log-probs of ``ids`` over the student's whole head, where the rollout sampled them; -> [n]."""
    logp = torch.log_softmax(student.double() / TEMPERATURE, -1)
    return logp.gather(-1, ids[:, None]).squeeze(-1)


def run_objective(config, student, teacher, ids, weights, policy_config):  # noqa: F811
    """(loss, student-logit grad, ObjectiveOutput, CachedSignal): teacher phase's signal, then the loss."""
    spec = SignalSpec(
        kind=config.teacher_signal,
        topk=config.topk,
        temperature=config.temperature,
        chunk_size=CHUNK,
        vocab_limit=student.shape[1],
    )
    signal = signal_from_logits(teacher, ids, spec)
    x = student.clone().requires_grad_(True)
    tokens = MicroBatchTokens(
        student=x,
        token_ids=ids,
        mask=(weights != 0).float(),
        lengths=LENGTHS,
        rollout_logp=rollout_logp(student, ids).float(),
        chunk_size=CHUNK,
        rollout_temperature=TEMPERATURE,
    )
    ctx = ObjectiveContext(config, step=STEP, rollout_temperature=TEMPERATURE, policy_config=policy_config)
    out = distillation_objective(tokens, signal, weights, ctx)
    out.loss.backward()
    return out.loss.detach(), x.grad, out, signal


def teacher_logp(teacher: torch.Tensor, vocab: int) -> torch.Tensor:
    """Float64 ``log q`` on the first ``vocab`` ids, not floored; [n, V_t] -> [n, vocab]."""
    return torch.log_softmax(teacher[:, :vocab].double() / TEMPERATURE, -1)


def _ref_full(config, s, t):
    """Per-token divergence of a full-vocabulary objective; [n, V] x2 -> [n]."""
    params = config.loss_params(STEP)
    if config.loss_type in ("reverse_kl", "forward_kl", "jsd"):
        return _ref_divergence(s, t, config.loss_type, config.beta)
    if config.loss_type in ("skew_kl", "skew_reverse_kl"):
        return _ref_skew(s, t, config.loss_type, params["alpha"])
    assert config.loss_type == "forward_then_reverse_kl", config.loss_type
    w = params["reverse_weight"]
    return (1 - w) * _ref_kl(t, s) + w * _ref_kl(s, t)


def _ref_topk(s, t, raw, top_ids):
    """Top-k + tail forward KL: floored teacher log-probs on the top-k ids, the exact tail; -> [n]."""
    inside = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top_ids, True)
    log_q_tail = raw.masked_fill(inside, NEG_INF).logsumexp(-1)
    log_p_tail = s.masked_fill(inside, NEG_INF).logsumexp(-1)
    has_tail = log_q_tail > NEG_INF
    safe = torch.where(has_tail, log_q_tail, 0.0)  # keeps 0 * inf out of the backward of the unused branch
    tail = torch.where(has_tail, safe.exp() * (safe - log_p_tail), 0.0)
    return _ref_kl(t.gather(-1, top_ids), s.gather(-1, top_ids)) + tail


def _ref_policy_gradient(config, x, s, t, ids, w):
    """verl's PPO clip at ratio 1 with the sampled-token advantages; x the float64 student leaf."""
    rows = torch.arange(ids.shape[0])
    in_loss = w != 0
    q = t[rows, ids]
    r = rollout_logp(x.detach(), ids)
    if config.loss_type == SAMPLED_RKL_PG:
        adv = torch.where(in_loss, q - s[rows, ids].detach(), 0.0)
    else:
        raw = torch.where(in_loss, q - r, 0.0)
        adv = raw * ref_prefix_weights(raw, LENGTHS, config.iw_opd_gamma, config.iw_opd_epsilon)
    # the ratio's numerator spans the student's whole head: that is what the rollout sampled from
    ratio_logp = torch.log_softmax(x / TEMPERATURE, -1)[rows, ids]
    return ref_ppo_clip(ratio_logp, r, adv, w)


def reference(config, student, teacher, ids, weights, signal):
    """Float64 (loss, grad of the student logits) with both sides on the shared ids, the teacher floored."""
    vocab = min(student.shape[1], teacher.shape[1])
    x = student.detach().double().requires_grad_(True)
    s = torch.log_softmax(x[:, :vocab] / TEMPERATURE, -1)
    raw = teacher_logp(teacher, vocab)
    t = raw.clamp(min=TEACHER_LOGP_FLOOR)
    keep, w = weights != 0, weights.double()
    if config.loss_type in PG_OBJECTIVES:
        loss = _ref_policy_gradient(config, x, s, t, ids, w)
    elif config.loss_type == TOPK_LOSS:
        loss = (w[keep] * _ref_topk(s[keep], t[keep], raw[keep], signal.topk.ids.long()[keep])).sum()
    else:
        loss = (w[keep] * _ref_full(config, s[keep], t[keep])).sum()
    loss.backward()
    return loss.detach(), x.grad


def expected_floored(config, teacher, ids, weights, signal, vocab):
    """[n] 1.0 on weighted tokens where a teacher log-prob the objective reads lies below the floor."""
    raw = teacher_logp(teacher, vocab)
    below = raw < TEACHER_LOGP_FLOOR
    sampled = below.gather(-1, ids[:, None]).squeeze(-1)
    if config.teacher_signal == "full":
        hit = below.any(-1)
    elif config.teacher_signal == "topk":
        hit = below.gather(-1, signal.topk.ids.long()).any(-1) | sampled
    else:
        hit = sampled
    return (hit & (weights != 0)).float()


def neg_inf_inputs():
    """Student [12, 29], bf16-exact teacher with -inf and far-below-floor entries on weighted rows."""
    student, teacher, ids, weights = make_inputs(12, 29, seed=60)
    teacher = teacher.bfloat16().float()  # the full signal is cached in bf16; the reference sees the same
    teacher[:, 22:] = NEG_INF  # ids without teacher mass in every row
    teacher[2, :19] = NEG_INF  # a one-hot row: with k = 6 the top-k itself holds zero-probability ids
    teacher[2, 20:] = NEG_INF
    ids[1] = 25  # a sampled token the teacher gives zero probability
    teacher[4, 3], ids[4] = -1000.0, 3  # finite, but its log-prob is far below the floor
    weights[[6, 9]] = 0.0
    ids[6] = 24  # -inf on a masked row: out of the loss, the gradient and the count
    return student, teacher, ids, weights / weights.sum()


CASES = [(name, {}) for name in ALL_OBJECTIVES] + [
    ("skew_kl", {"skew_alpha": 0.0}),
    ("skew_reverse_kl", {"skew_alpha": 0.0}),
]


@pytest.mark.parametrize(
    ("loss_type", "overrides"), CASES, ids=[n + ("-alpha0" if o else "") for n, o in CASES]
)
def test_neg_inf_teacher_on_weighted_tokens_is_floored(loss_type, overrides, policy_config):  # noqa: F811
    config = make_config(loss_type, **overrides)
    student, teacher, ids, weights = neg_inf_inputs()
    loss, grad, out, signal = run_objective(config, student, teacher, ids, weights, policy_config)
    keep = weights != 0
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    assert bool(torch.isfinite(out.divergence[keep]).all())
    assert torch.all(grad[~keep] == 0)
    ref_loss, ref_grad = reference(config, student, teacher, ids, weights, signal)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    floored = teacher_logp(teacher, 29).clamp(min=TEACHER_LOGP_FLOOR).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(out.teacher_logp.double()[keep], floored[keep], rtol=1e-5, atol=1e-5)
    want = expected_floored(config, teacher, ids, weights, signal, 29)
    assert want.sum() >= 2  # the inputs really put floored entries on weighted tokens
    torch.testing.assert_close(out.token_metrics[FLOORED], want)


@pytest.mark.parametrize("loss_type", ALL_OBJECTIVES)
def test_student_equal_to_teacher_below_the_floor_gives_zero(loss_type, policy_config):  # noqa: F811
    logits, _, ids, weights = make_inputs(12, 29, seed=61)
    logits = logits.bfloat16().float()
    logits[:, 24:] = -1000.0  # log-probs far below the floor on both sides
    ids = ids % 24
    config = make_config(loss_type)
    loss, grad, out, _ = run_objective(config, logits, logits, ids, weights, policy_config)
    assert abs(float(loss)) < 1e-6 and float(grad.abs().max()) < 1e-6
    assert out.divergence.abs().max() < 1e-6
    if config.teacher_signal == "full":
        assert torch.all(out.token_metrics[FLOORED] == 1)  # the floor was in play on every token

"""Skew KL losses (skew_kl, skew_reverse_kl) of opd.objectives.divergences against a naive float64
reference."""

from __future__ import annotations

import pytest
import torch
from test_losses import make_inputs

from opd.objectives.divergences import LOSS_REGISTRY, chunked_distill_loss, get_loss, register_loss
from opd.objectives.teacher_signal import TEACHER_LOGP_FLOOR

SKEW_TYPES = ["skew_kl", "skew_reverse_kl"]


def _ref_skew(s_logp, t_logp, loss_type, alpha):
    """Textbook float64 formula with explicit mixture probabilities; [n, V] x2 -> [n]."""
    p, q = s_logp.exp(), t_logp.exp()
    a, log_a, b = (q, t_logp, p) if loss_type == "skew_kl" else (p, s_logp, q)
    m = alpha * a + (1 - alpha) * b
    return torch.where(a > 0, a * (log_a - m.log()), torch.zeros_like(a)).sum(-1)


def reference(student, teacher, weights, loss_type, alpha, temperature=1.0):
    """Float64 loss, grad wrt student and per-token divergence; only unmasked rows enter the graph.

    The teacher's log-probs are raised to the floor, as every objective does.
    """
    vocab = min(student.shape[1], teacher.shape[1])
    s = student.detach().double().requires_grad_(True)
    s_logp = torch.log_softmax(s[:, :vocab] / temperature, -1)
    t_logp = torch.log_softmax(teacher[:, :vocab].double() / temperature, -1).clamp(min=TEACHER_LOGP_FLOOR)
    keep = weights != 0
    loss = (weights.double()[keep] * _ref_skew(s_logp[keep], t_logp[keep], loss_type, alpha)).sum()
    loss.backward()
    return loss.detach(), s.grad, _ref_skew(s_logp, t_logp, loss_type, alpha).detach()


def run(student, teacher, ids, weights, loss_type, alpha, **kw):
    """Chunked loss, grad wrt student and stats, from a fresh leaf."""
    s = student.detach().clone().requires_grad_(True)
    loss, stats = chunked_distill_loss(
        s, teacher, ids, weights, loss_type=loss_type, loss_params={"alpha": alpha}, **kw
    )
    loss.backward()
    return loss, s.grad, stats


def assert_matches(student, teacher, ids, weights, loss_type, alpha, rtol=1e-4, atol=1e-6, **kw):
    loss, grad, stats = run(student, teacher, ids, weights, loss_type, alpha, **kw)
    ref_loss, ref_grad, ref_div = reference(
        student, teacher, weights, loss_type.removeprefix("autograd_"), alpha, kw.get("temperature", 1.0)
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    keep = weights != 0
    torch.testing.assert_close(stats.divergence.double()[keep], ref_div[keep], rtol=rtol, atol=atol * 100)


@pytest.fixture
def autograd_skew():
    """The skew losses registered again without a closed-form gradient, as "autograd_<name>"."""
    for name in SKEW_TYPES:
        register_loss(f"autograd_{name}")(get_loss(name))
    yield
    for name in SKEW_TYPES:
        LOSS_REGISTRY.pop(f"autograd_{name}")


def test_registered_with_closed_form_gradient():
    assert all(LOSS_REGISTRY[name].logit_grad is not None for name in SKEW_TYPES)


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(loss_type, alpha, temperature):
    student, teacher, ids, weights = make_inputs(29, 40, v_t=44, seed=20)
    weights[[3, 11]] = 0.0
    assert_matches(student, teacher, ids, weights, loss_type, alpha, chunk_size=6, temperature=temperature)


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
def test_alpha_zero_is_plain_kl(loss_type):
    student, teacher, ids, weights = make_inputs(13, 32, seed=21)
    plain = {"skew_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}[loss_type]
    loss, grad, stats = run(student, teacher, ids, weights, loss_type, 0.0, chunk_size=5)
    s = student.clone().requires_grad_(True)
    ref_loss, ref_stats = chunked_distill_loss(s, teacher, ids, weights, loss_type=plain, chunk_size=5)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.divergence, ref_stats.divergence, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
def test_default_alpha_is_0_1(loss_type):
    student, teacher, ids, weights = make_inputs(7, 16, seed=22)
    default, _ = chunked_distill_loss(student, teacher, ids, weights, loss_type=loss_type, chunk_size=4)
    explicit, _ = chunked_distill_loss(
        student, teacher, ids, weights, loss_type=loss_type, loss_params={"alpha": 0.1}, chunk_size=4
    )
    assert default.item() == explicit.item()


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_identical_distributions_give_zero(loss_type, temperature):
    student, _, ids, weights = make_inputs(17, 100, seed=23, scale=5.0)
    s = student.clone().requires_grad_(True)
    loss, stats = chunked_distill_loss(
        s, student, ids, weights, loss_type=loss_type, chunk_size=5, temperature=temperature
    )
    loss.backward()
    assert stats.divergence.abs().max() < 1e-6 and loss.abs() < 1e-6
    assert s.grad.abs().max() < 1e-6


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("alpha", [0.2, 0.0])
def test_teacher_zero_mass_stays_finite(loss_type, alpha):
    # For alpha > 0 both skews are finite where q = 0 (the reverse one is bounded by -log alpha there); at
    # alpha = 0 skew_reverse_kl is reverse KL, finite only through the teacher floor.
    student, teacher, ids, weights = make_inputs(16, 40, seed=24)
    teacher[:, 20:] = float("-inf")
    teacher[3, :19] = float("-inf")  # one-hot teacher row
    weights[5] = 0.0
    teacher[5] = float("nan")  # garbage under the mask
    loss, grad, stats = run(student, teacher, ids % 20, weights, loss_type, alpha, chunk_size=5)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.all(grad[5] == 0)
    keep = weights != 0
    assert torch.isfinite(stats.divergence[keep]).all()
    assert_matches(student, teacher, ids % 20, weights, loss_type, alpha, chunk_size=5)


@pytest.mark.usefixtures("autograd_skew")
@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_closed_form_equals_autograd(loss_type, alpha):
    student, teacher, ids, weights = make_inputs(13, 32, seed=25)
    teacher[:, 20:] = -30.0  # tiny teacher probabilities stress the closed forms
    kw = {"chunk_size": 5, "temperature": 1.3}
    _, closed, _ = run(student, teacher, ids, weights, loss_type, alpha, **kw)
    _, auto, _ = run(student, teacher, ids, weights, f"autograd_{loss_type}", alpha, **kw)
    torch.testing.assert_close(closed, auto, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_gradcheck(loss_type, alpha):
    student, teacher, ids, weights = make_inputs(5, 7, v_t=8, dtype=torch.float64, seed=26, scale=1.0)
    weights = weights.double()
    weights[2] = 0.0
    student.requires_grad_(True)

    def fn(x):
        return chunked_distill_loss(
            x, teacher, ids, weights, loss_type=loss_type, chunk_size=2, temperature=0.8,
            loss_params={"alpha": alpha},
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", SKEW_TYPES)
@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_invalid_alpha_names_alpha(loss_type, alpha):
    student, teacher, ids, weights = make_inputs(4, 8)
    with pytest.raises(ValueError, match="alpha"):
        chunked_distill_loss(
            student, teacher, ids, weights, loss_type=loss_type, loss_params={"alpha": alpha}, chunk_size=4
        )


def test_alpha_check_is_only_for_skew_losses():
    # Other losses ignore an alpha meant for someone else, as they ignore unknown params generally.
    student, teacher, ids, weights = make_inputs(4, 8)
    chunked_distill_loss(
        student, teacher, ids, weights, loss_type="jsd", loss_params={"alpha": 5.0}, chunk_size=4
    )


def test_check_params_hook_runs_before_any_chunk():
    calls = []

    def check(gamma=1.0):
        calls.append(gamma)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")

    @register_loss("test_checked", check_params=check)
    def checked(student_logp, teacher_logp, gamma=1.0):
        return gamma * (student_logp - teacher_logp).pow(2).mean(-1)

    try:
        assert LOSS_REGISTRY["test_checked"].check_params is check
        student, teacher, ids, weights = make_inputs(4, 8)
        chunked_distill_loss(student, teacher, ids, weights, loss_type="test_checked", chunk_size=4)
        with pytest.raises(ValueError, match="gamma"):  # even with no tokens, so no chunk ever runs
            chunked_distill_loss(
                student[:0], teacher[:0], ids[:0], weights[:0], loss_type="test_checked",
                loss_params={"gamma": -1.0}, chunk_size=4,
            )  # fmt: skip
        assert calls == [1.0, -1.0]
    finally:
        LOSS_REGISTRY.pop("test_checked")

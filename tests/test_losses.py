"""The full-vocabulary divergences (opd.objectives.divergences) against a naive float64 reference (full
log-softmax, plain autograd)."""

from __future__ import annotations

import pytest
import torch

from opd.objectives.divergences import (
    LOSS_REGISTRY,
    TokenStats,
    chunked_distill_loss,
    get_loss,
    register_loss,
)
from opd.objectives.teacher_signal import TEACHER_LOGP_FLOOR

LOSS_TYPES = ["reverse_kl", "forward_kl", "jsd"]
BETA = 0.3  # not 0.5, so a swapped p/q in the JSD mixture would be caught


# ------------------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------------------


def _ref_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) per row, [n, V] -> [n]; terms with a == 0 are dropped."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _ref_divergence(s_logp, t_logp, loss_type, beta):
    """Straightforward textbook formulas, independent of the module's helpers; [n, V] x2 -> [n]."""
    if loss_type == "reverse_kl":
        return _ref_kl(s_logp, t_logp)
    if loss_type == "forward_kl":
        return _ref_kl(t_logp, s_logp)
    m = beta * t_logp.exp() + (1 - beta) * s_logp.exp()
    log_m = m.log()
    return beta * _ref_kl(t_logp, log_m) + (1 - beta) * _ref_kl(s_logp, log_m)


def reference(student, teacher, ids, weights, loss_type, temperature=1.0, beta=BETA):
    """Float64 loss, grad wrt student (in float64) and stats; only unmasked rows enter the graph.

    The teacher's log-probs are raised to the floor, the one departure from the textbook formulas.
    """
    vocab = min(student.shape[1], teacher.shape[1])
    s = student.detach().double().requires_grad_(True)
    s_logp = torch.log_softmax(s[:, :vocab] / temperature, dim=-1)
    raw_t_logp = torch.log_softmax(teacher[:, :vocab].double() / temperature, dim=-1)
    t_logp = raw_t_logp.clamp(min=TEACHER_LOGP_FLOOR)
    keep = weights != 0
    div_kept = _ref_divergence(s_logp[keep], t_logp[keep], loss_type, beta)
    loss = (weights.double()[keep] * div_kept).sum()
    loss.backward()
    with torch.no_grad():
        stats = TokenStats(
            divergence=_ref_divergence(s_logp, t_logp, loss_type, beta),
            student_logp=s_logp.gather(-1, ids[:, None]).squeeze(-1),
            teacher_logp=t_logp.gather(-1, ids[:, None]).squeeze(-1),
            student_entropy=-(s_logp.exp() * s_logp).sum(-1),
            teacher_floored=(raw_t_logp < TEACHER_LOGP_FLOOR).any(-1).double(),
        )
    return loss.detach(), s.grad, stats


def run(student, teacher, ids, weights, loss_type, **kw):
    """Chunked loss + grad wrt student, from a fresh leaf."""
    kw.setdefault("beta", BETA)
    kw.setdefault("chunk_size", 8)
    s = student.detach().clone().requires_grad_(True)
    loss, stats = chunked_distill_loss(s, teacher, ids, weights, loss_type=loss_type, **kw)
    loss.backward()
    return loss, s.grad, stats


def make_inputs(n, v_s, v_t=None, dtype=torch.float32, seed=0, scale=3.0):
    """Random logits (student [n, v_s], teacher [n, v_t]), ids [n] below the shared vocab, weights [n]."""
    g = torch.Generator().manual_seed(seed)
    v_t = v_s if v_t is None else v_t
    student = (torch.randn(n, v_s, generator=g) * scale).to(dtype)
    teacher = (torch.randn(n, v_t, generator=g) * scale).to(dtype)
    ids = torch.randint(0, min(v_s, v_t), (n,), generator=g)
    weights = torch.rand(n, generator=g) + 0.1
    return student, teacher, ids, weights / weights.sum()


def assert_matches(student, teacher, ids, weights, loss_type, rtol=1e-4, atol=1e-6, ref_type=None, **kw):
    """Loss, grad and every stat of the chunked loss equal the float64 reference (of ``ref_type``)."""
    loss, grad, stats = run(student, teacher, ids, weights, loss_type, **kw)
    ref_loss, ref_grad, ref_stats = reference(
        student, teacher, ids, weights, ref_type or loss_type, temperature=kw.get("temperature", 1.0)
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    keep = weights != 0
    for field in ("divergence", "student_logp", "teacher_logp", "student_entropy", "teacher_floored"):
        got, want = getattr(stats, field), getattr(ref_stats, field)
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got.double()[keep], want[keep], rtol=rtol, atol=atol * 100)


# ------------------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    ("n", "chunk_size"),
    [(37, 8), (5, 64), (7, 1), (64, 16)],
    ids=["ragged-last-chunk", "chunk-gt-n", "chunk-1", "exact-multiple"],
)
def test_matches_reference(loss_type, n, chunk_size):
    student, teacher, ids, weights = make_inputs(n, 50)
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=chunk_size)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature(loss_type, temperature):
    student, teacher, ids, weights = make_inputs(23, 40, seed=1)
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=6, temperature=temperature)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nonuniform_weights(loss_type):
    student, teacher, ids, _ = make_inputs(30, 40, seed=2)
    weights = torch.linspace(0.0, 3.0, 30) ** 2  # includes an exact 0 at row 0
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_rows_contribute_nothing(loss_type):
    student, teacher, ids, weights = make_inputs(20, 32, seed=3)
    weights[[0, 5, 6, 19]] = 0.0
    teacher[5, :10] = float("-inf")  # masked row whose divergence may be inf (reverse_kl)
    teacher[6] = float("nan")  # garbage teacher row under the mask
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=4)
    loss, grad, _ = run(student, teacher, ids, weights, loss_type, chunk_size=4)
    assert torch.isfinite(loss)
    assert torch.all(grad[[0, 5, 6, 19]] == 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_chunk_still_has_stats(loss_type):
    student, teacher, ids, weights = make_inputs(12, 16, seed=4)
    weights[4:8] = 0.0  # exactly the second chunk
    loss, grad, stats = run(student, teacher, ids, weights, loss_type, chunk_size=4)
    _, _, ref_stats = reference(student, teacher, ids, weights, loss_type)
    assert torch.all(grad[4:8] == 0)
    torch.testing.assert_close(stats.divergence.double(), ref_stats.divergence, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stats.student_entropy.double(), ref_stats.student_entropy, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_inputs(loss_type):
    student, teacher, ids, weights = make_inputs(33, 64, dtype=torch.bfloat16, seed=5)
    # The reference sees the same bf16-rounded values, so the error is only bf16 rounding of the gradient.
    assert_matches(student, teacher, ids, weights, loss_type, rtol=2e-2, atol=1e-4, chunk_size=8)


def test_mixed_dtypes():
    student, teacher, ids, weights = make_inputs(9, 32, seed=6)
    assert_matches(
        student.half(), teacher.bfloat16(), ids, weights, "jsd", rtol=2e-2, atol=1e-4, chunk_size=4
    )


# ------------------------------------------------------------------------------------------------------------
# Special inputs
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_identical_distributions_give_zero(loss_type, temperature):
    student, _, ids, weights = make_inputs(17, 100, seed=7, scale=5.0)
    loss, stats = chunked_distill_loss(
        student, student.clone(), ids, weights, loss_type=loss_type, chunk_size=5, temperature=temperature
    )
    assert stats.divergence.abs().max() < 1e-6
    assert loss.abs() < 1e-6


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_teacher_neg_inf_entries_are_finite(loss_type):
    student, teacher, ids, weights = make_inputs(16, 40, seed=8)
    teacher[:, 20:] = float("-inf")  # e.g. a top-k filtered teacher: zero mass on half the vocab
    teacher[3, :19] = float("-inf")  # a one-hot teacher row (only id 19 has mass)
    ids = ids % 20
    ids[3] = 19
    loss, grad, stats = run(student, teacher, ids, weights, loss_type, chunk_size=5)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(stats.divergence).all() and torch.isfinite(stats.teacher_logp).all()
    assert torch.all(stats.teacher_floored == 1)
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_reverse_kl_zero_teacher_mass_is_floored(temperature):
    """Where the teacher gives an id zero mass, log q is raised to the floor: finite, with a large cost."""
    student, teacher, ids, weights = make_inputs(4, 10, seed=9)
    teacher[1, 5] = float("-inf")
    teacher[2, 7] = -500.0  # finite, but below the floor after the log-softmax
    ids[1] = 5
    loss, grad, stats = run(student, teacher, ids, weights, "reverse_kl", temperature=temperature)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert stats.teacher_logp[1] == TEACHER_LOGP_FLOOR
    assert stats.teacher_floored.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert_matches(student, teacher, ids, weights, "reverse_kl", temperature=temperature)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_teacher_larger_vocab(loss_type):
    student, teacher, ids, weights = make_inputs(19, 48, v_t=56, seed=10)
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=6)
    # The reference itself slices and renormalises; check slicing really changes the answer.
    full = torch.log_softmax(teacher.double(), -1).gather(-1, ids[:, None]).squeeze(-1)
    _, stats = chunked_distill_loss(student, teacher, ids, weights, loss_type=loss_type, chunk_size=6)
    assert not torch.allclose(stats.teacher_logp.double(), full, atol=1e-3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_student_larger_vocab_pads_get_zero_grad(loss_type):
    student, teacher, ids, weights = make_inputs(11, 56, v_t=48, seed=11)
    assert_matches(student, teacher, ids, weights, loss_type, chunk_size=4)
    _, grad, _ = run(student, teacher, ids, weights, loss_type, chunk_size=4)
    assert torch.all(grad[:, 48:] == 0)


def test_no_grad_to_teacher_ids_weights():
    student, teacher, ids, weights = make_inputs(8, 16, seed=12)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    weights.requires_grad_(True)
    loss, stats = chunked_distill_loss(student, teacher, ids, weights, chunk_size=3)
    loss.backward()
    assert student.grad is not None and teacher.grad is None and weights.grad is None
    assert all(not t.requires_grad for t in vars(stats).values())


def test_grad_output_scaling():
    student, teacher, ids, weights = make_inputs(10, 16, seed=13)
    _, grad, _ = run(student, teacher, ids, weights, "jsd", chunk_size=3)
    s = student.clone().requires_grad_(True)
    loss, _ = chunked_distill_loss(s, teacher, ids, weights, loss_type="jsd", chunk_size=3, beta=BETA)
    (loss * -2.5).backward()
    torch.testing.assert_close(s.grad, grad * -2.5)


def test_empty_input():
    student = torch.zeros(0, 16, requires_grad=True)
    loss, stats = chunked_distill_loss(
        student, torch.zeros(0, 16), torch.zeros(0, dtype=torch.long), torch.zeros(0), chunk_size=4
    )
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.grad_fn is not None
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in vars(stats).values())
    loss.backward()
    assert student.grad.shape == (0, 16)


# ------------------------------------------------------------------------------------------------------------
# Autograd fallback (losses registered without a closed-form logit_grad)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def autograd_aliases():
    """The built-in divergences registered again without logit_grad, as "autograd_<name>"."""
    for name in LOSS_TYPES:
        register_loss(f"autograd_{name}")(get_loss(name))
    assert all(LOSS_REGISTRY[f"autograd_{name}"].logit_grad is None for name in LOSS_TYPES)
    yield
    for name in LOSS_TYPES:
        LOSS_REGISTRY.pop(f"autograd_{name}")


@pytest.mark.usefixtures("autograd_aliases")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_autograd_fallback_matches_reference(loss_type):
    student, teacher, ids, weights = make_inputs(21, 40, v_t=44, seed=16)
    weights[[2, 3, 20]] = 0.0
    teacher[3, :7] = float("-inf")  # masked row with a possibly infinite divergence
    teacher[[0, 1], 30:] = float("-inf")
    kw = {"chunk_size": 4, "temperature": 0.7}
    assert_matches(student, teacher, ids, weights, f"autograd_{loss_type}", ref_type=loss_type, **kw)
    teacher[[0, 1], 30:] = 0.0
    assert_matches(student, teacher, ids, weights, f"autograd_{loss_type}", ref_type=loss_type, **kw)
    _, grad, _ = run(student, teacher, ids, weights, f"autograd_{loss_type}", **kw)
    assert torch.all(grad[[2, 3, 20]] == 0)


@pytest.mark.usefixtures("autograd_aliases")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_closed_form_equals_autograd(loss_type):
    student, teacher, ids, weights = make_inputs(13, 32, seed=17)
    teacher[:, 20:] = -30.0  # very small teacher probabilities stress the closed forms
    _, closed, _ = run(student, teacher, ids, weights, loss_type, chunk_size=5, temperature=1.3)
    _, auto, _ = run(student, teacher, ids, weights, f"autograd_{loss_type}", chunk_size=5, temperature=1.3)
    torch.testing.assert_close(closed, auto, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# gradcheck
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("autograd_aliases")
@pytest.mark.parametrize("loss_type", LOSS_TYPES + [f"autograd_{name}" for name in LOSS_TYPES])
def test_gradcheck(loss_type):
    student, teacher, ids, weights = make_inputs(5, 7, v_t=8, dtype=torch.float64, seed=14, scale=1.0)
    weights = weights.double()
    weights[2] = 0.0
    student.requires_grad_(True)

    def fn(x):
        return chunked_distill_loss(
            x, teacher, ids, weights, loss_type=loss_type, chunk_size=2, temperature=0.8, beta=BETA
        )[0]

    assert fn(student).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------------------
# Registry and validation
# ------------------------------------------------------------------------------------------------------------


def test_registry_contents_and_unknown_name():
    assert set(LOSS_TYPES) <= set(LOSS_REGISTRY)
    assert all(LOSS_REGISTRY[name].logit_grad is not None for name in LOSS_TYPES)
    assert get_loss("jsd") is LOSS_REGISTRY["jsd"].fn
    with pytest.raises(ValueError, match="bogus") as err:
        get_loss("bogus")
    for name in LOSS_TYPES:
        assert name in str(err.value)
    student, teacher, ids, weights = make_inputs(3, 8)
    with pytest.raises(ValueError, match="reverse_kl"):
        chunked_distill_loss(student, teacher, ids, weights, loss_type="bogus", chunk_size=4)


def test_register_new_loss_is_used():
    @register_loss("test_total_variation")
    def total_variation(student_logp, teacher_logp):
        return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)

    try:
        student, teacher, ids, weights = make_inputs(9, 12, seed=15)
        _, grad, stats = run(student, teacher, ids, weights, "test_total_variation", chunk_size=4, beta=0.0)
        p, q = torch.softmax(student.double(), -1), torch.softmax(teacher.double(), -1)
        torch.testing.assert_close(
            stats.divergence.double(), 0.5 * (p - q).abs().sum(-1), rtol=1e-5, atol=1e-6
        )
        assert grad.abs().sum() > 0
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_total_variation")(total_variation)
    finally:
        LOSS_REGISTRY.pop("test_total_variation")


def test_register_loss_params_reach_only_losses_that_take_them():
    seen = {}

    @register_loss("test_kwargs")
    def with_kwargs(student_logp, teacher_logp, **params):
        seen["kwargs"] = params
        return (student_logp - teacher_logp).pow(2).mean(-1)

    @register_loss("test_named")
    def with_named(student_logp, teacher_logp, alpha=1.0):
        seen["named"] = alpha
        return alpha * (student_logp - teacher_logp).pow(2).mean(-1)

    try:
        student, teacher, ids, weights = make_inputs(4, 8)
        extra = {"alpha": 3.0, "gamma": "x"}
        chunked_distill_loss(
            student,
            teacher,
            ids,
            weights,
            loss_type="test_kwargs",
            beta=0.25,
            loss_params=extra,
            chunk_size=4,
        )
        chunked_distill_loss(
            student, teacher, ids, weights, loss_type="test_named", loss_params=extra, chunk_size=4
        )
        assert seen == {"kwargs": {"beta": 0.25, "alpha": 3.0, "gamma": "x"}, "named": 3.0}
        with pytest.raises(ValueError, match="beta"):
            chunked_distill_loss(
                student, teacher, ids, weights, loss_type="jsd", loss_params={"beta": 0.2}, chunk_size=4
            )
    finally:
        LOSS_REGISTRY.pop("test_kwargs")
        LOSS_REGISTRY.pop("test_named")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "jsd", "beta": 0.0}, "beta"),
        ({"loss_type": "jsd", "beta": 1.0}, "beta"),
        ({"loss_type": "jsd", "beta": -0.5}, "beta"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -4}, "chunk_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_invalid_scalars(kwargs, match):
    student, teacher, ids, weights = make_inputs(4, 8)
    with pytest.raises(ValueError, match=match):
        chunked_distill_loss(student, teacher, ids, weights, **{"chunk_size": 4, **kwargs})


def test_beta_ignored_by_losses_without_it():
    student, teacher, ids, weights = make_inputs(4, 8)
    chunked_distill_loss(student, teacher, ids, weights, loss_type="reverse_kl", beta=0.0, chunk_size=4)


@pytest.mark.parametrize("bad", ["teacher_rows", "ids_len", "weights_len", "ids_float", "weights_bool", "1d"])
def test_invalid_tensors(bad):
    student, teacher, ids, weights = make_inputs(6, 8)
    if bad == "teacher_rows":
        teacher = teacher[:5]
    elif bad == "ids_len":
        ids = ids[:5]
    elif bad == "weights_len":
        weights = torch.ones(7)
    elif bad == "ids_float":
        ids = ids.float()
    elif bad == "weights_bool":
        weights = weights > 0
    else:
        student = student[0]
    with pytest.raises(ValueError):
        chunked_distill_loss(student, teacher, ids, weights, chunk_size=4)


def test_forward_then_reverse_kl_blends_the_two_kls():
    from opd.objectives.schedule import reverse_kl_weight

    torch.manual_seed(0)
    student, teacher = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64)
    ids, weights = torch.randint(0, 11, (7,)), torch.rand(7, dtype=torch.float64)

    def loss(name, **params):
        logits = student.clone().requires_grad_()
        value, _ = chunked_distill_loss(
            logits, teacher, ids, weights, loss_type=name, chunk_size=3, loss_params=params
        )
        value.backward()
        return value.detach(), logits.grad

    forward, reverse = loss("forward_kl"), loss("reverse_kl")
    for w in (0.0, 0.3, 1.0):
        blended = loss("forward_then_reverse_kl", reverse_weight=w)
        for got, fkl, rkl in zip(blended, forward, reverse, strict=True):
            assert torch.allclose(got, (1 - w) * fkl + w * rkl, atol=1e-10)
    with pytest.raises(ValueError, match="reverse_weight"):
        loss("forward_then_reverse_kl", reverse_weight=1.5)
    assert [reverse_kl_weight(s, switch_step=3, blend_steps=0) for s in (1, 2, 3, 9)] == [0, 0, 1, 1]
    assert [reverse_kl_weight(s, switch_step=3, blend_steps=4) for s in (2, 3, 4, 6, 7)] == [
        0,
        0.25,
        0.5,
        1,
        1,
    ]

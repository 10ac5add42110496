"""Teacher top-k signal (opd.objectives.teacher_signal) and the top-k + tail forward KL (opd.objectives.topk)
against float64 references."""

from __future__ import annotations

import pytest
import torch
from test_losses import make_inputs

from opd.objectives.divergences import chunked_distill_loss
from opd.objectives.teacher_signal import (
    TEACHER_LOGP_FLOOR,
    TopKSignal,
    teacher_sampled_logp,
    teacher_topk_signal,
)
from opd.objectives.topk import TopKTokenStats, chunked_topk_forward_kl

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------------------


def ref_teacher_logp(teacher, vocab, temperature=1.0):
    """Float64 log q over the first ``vocab`` columns; [n, V_t] -> [n, vocab]."""
    return torch.log_softmax(teacher[:, :vocab].double() / temperature, -1)


def ref_topk_loss(student, teacher, ids, token_ids, weights, temperature=1.0, vocab=None):
    """Float64 loss, grad, per-token D and stats for the teacher's id sets ``ids`` [n, k].

    q comes from the teacher logits directly (not from the module's signal), and both tails are the textbook
    1 - sum over the top-k, so nothing is shared with the implementation but the id sets.
    """
    vocab = vocab or min(student.shape[1], teacher.shape[1])
    ids = ids.long()
    t_logp = ref_teacher_logp(teacher, vocab, temperature)
    s = student.detach().double().requires_grad_(True)
    s_logp = torch.log_softmax(s[:, :vocab] / temperature, -1)
    raw_log_q, log_p = t_logp.gather(-1, ids), s_logp.gather(-1, ids)
    # the reference may clamp the tail: that only decides which terms are 0
    q_tail = (1 - raw_log_q.exp().sum(-1)).clamp(min=0)
    log_q = raw_log_q.clamp(min=TEACHER_LOGP_FLOOR)  # the teacher floor, on the per-id log-probs only
    q = log_q.exp()
    p_tail = 1 - log_p.exp().sum(-1)
    top = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
    has_tail = q_tail > 1e-12
    tail = torch.where(has_tail, q_tail * (q_tail.log() - torch.where(has_tail, p_tail, 1.0).log()), 0.0)
    div = top + tail
    keep = weights != 0
    loss = (weights.double()[keep] * div[keep]).sum()
    loss.backward()
    with torch.no_grad():
        stats = TopKTokenStats(
            divergence=div.detach(),
            student_logp=s_logp.gather(-1, token_ids[:, None]).squeeze(-1),
            teacher_topk_mass=raw_log_q.exp().sum(-1),
            sampled_in_topk=(ids == token_ids[:, None]).any(-1).double(),
            student_entropy=-(s_logp.exp() * s_logp).sum(-1),
            teacher_floored=(raw_log_q < TEACHER_LOGP_FLOOR).any(-1).double(),
        )
    return loss.detach(), s.grad, stats


def run(student, signal, token_ids, weights, **kw):
    """Top-k loss + grad wrt student, from a fresh leaf."""
    s = student.detach().clone().requires_grad_(True)
    kw.setdefault("chunk_size", 4)
    loss, stats = chunked_topk_forward_kl(s, signal, token_ids, weights, **kw)
    loss.backward()
    return loss, s.grad, stats


def assert_matches(student, teacher, token_ids, weights, k, rtol=1e-4, atol=1e-6, chunk_size=8, **kw):
    """Signal + loss + grad + every stat equal the float64 reference; returns the signal."""
    vocab = kw.get("vocab_limit") or min(student.shape[1], teacher.shape[1])
    temperature = kw.get("temperature", 1.0)
    signal = teacher_topk_signal(
        teacher, k, temperature=temperature, chunk_size=chunk_size, vocab_limit=vocab
    )
    loss, grad, stats = run(student, signal, token_ids, weights, chunk_size=chunk_size, **kw)
    ref_loss, ref_grad, ref_stats = ref_topk_loss(
        student, teacher, signal.ids, token_ids, weights, temperature, vocab
    )
    assert loss.dim() == 0 and loss.dtype == (
        torch.float64 if student.dtype == torch.float64 else torch.float32
    )
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    keep = weights != 0
    fields = ("divergence", "student_logp", "teacher_topk_mass", "sampled_in_topk", "student_entropy")
    for field in (*fields, "teacher_floored"):
        got, want = getattr(stats, field), getattr(ref_stats, field)
        assert got.dtype == torch.float32 and not got.requires_grad and got.shape == weights.shape
        torch.testing.assert_close(got.double()[keep], want[keep], rtol=rtol, atol=atol * 100)
    return signal


# ------------------------------------------------------------------------------------------------------------
# Signal extraction
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("k", "scale"), [(1, 3.0), (5, 3.0), (7, 20.0)], ids=["k1", "k5", "k7-tiny-tail"])
def test_signal_matches_float64_topk(k, scale, temperature):
    _, teacher, token_ids, _ = make_inputs(37, 50, seed=30, scale=scale)
    signal = teacher_topk_signal(teacher, k, temperature=temperature, chunk_size=8)
    assert signal.ids.dtype == torch.int32 and signal.ids.shape == (37, k)
    assert signal.logp.dtype == torch.float32 and signal.logp.shape == (37, k)
    assert signal.tail_logp.dtype == torch.float32 and signal.tail_logp.shape == (37,)
    t_logp = ref_teacher_logp(teacher, 50, temperature)
    ref = t_logp.topk(k, dim=-1)
    assert torch.equal(signal.ids.long(), ref.indices)
    torch.testing.assert_close(signal.logp.double(), ref.values, rtol=1e-5, atol=1e-5)
    # The tail is the log of the excluded mass, accurate even when that mass is tiny (scale 20).
    ref_tail = torch.logsumexp(t_logp.scatter(-1, ref.indices, NEG_INF), -1)
    torch.testing.assert_close(signal.tail_logp.double(), ref_tail, rtol=1e-5, atol=1e-5)
    if scale == 3.0:  # and it equals log(1 - sum of the top-k) where that is well conditioned
        torch.testing.assert_close(
            signal.tail_logp.double(), torch.log1p(-ref.values.exp().sum(-1)), rtol=1e-5, atol=1e-5
        )


def test_signal_tail_is_neg_inf_when_topk_holds_all_mass():
    _, teacher, _, _ = make_inputs(9, 12, seed=31)
    full = teacher_topk_signal(teacher, 12, chunk_size=4)
    assert torch.all(full.tail_logp == NEG_INF)
    teacher[:, 3:] = NEG_INF  # only three ids have mass
    three = teacher_topk_signal(teacher, 3, chunk_size=4)
    assert torch.all(three.tail_logp == NEG_INF)
    assert torch.equal(three.ids.sort(-1).values, torch.arange(3, dtype=torch.int32).expand(9, 3))
    four = teacher_topk_signal(teacher, 4, chunk_size=4)  # a zero-probability id inside the top-k
    assert torch.all(four.logp[:, 3] == NEG_INF) and torch.all(four.tail_logp == NEG_INF)


def test_signal_vocab_limit_ignores_extra_columns():
    _, teacher, _, _ = make_inputs(10, 56, seed=32)
    teacher[:, 48:] = 50.0  # huge logits in the padded columns must not leak into the signal
    signal = teacher_topk_signal(teacher, 4, chunk_size=3, vocab_limit=48)
    ref = ref_teacher_logp(teacher, 48).topk(4, dim=-1)
    assert torch.equal(signal.ids.long(), ref.indices) and int(signal.ids.max()) < 48
    torch.testing.assert_close(signal.logp.double(), ref.values, rtol=1e-5, atol=1e-5)


def test_vocab_limit_above_the_teacher_rows_keeps_them_all():
    """A student head larger than the teacher's: the signal covers every teacher row, nothing raises."""
    _, teacher, token_ids, _ = make_inputs(10, 48, seed=33)
    wide = teacher_topk_signal(teacher, 4, chunk_size=3, vocab_limit=56)
    exact = teacher_topk_signal(teacher, 4, chunk_size=3)
    for got, want in zip(vars(wide).values(), vars(exact).values(), strict=True):
        assert torch.equal(got, want)
    sampled = teacher_sampled_logp(teacher, token_ids, chunk_size=3, vocab_limit=56)
    assert torch.equal(sampled, teacher_sampled_logp(teacher, token_ids, chunk_size=3))


def test_signal_of_float64_logits_is_float64():
    _, teacher, _, _ = make_inputs(5, 9, dtype=torch.float64, seed=33)
    signal = teacher_topk_signal(teacher, 3, chunk_size=4)
    assert signal.logp.dtype == signal.tail_logp.dtype == torch.float64
    ref = ref_teacher_logp(teacher, 9).topk(3, dim=-1)
    torch.testing.assert_close(signal.logp, ref.values, rtol=1e-12, atol=1e-12)


def test_signal_cache_size_per_token():
    vocab, k = 151936, 64  # a real LLM vocabulary: the full bf16 cache would be 2 * V bytes per token
    teacher = torch.randn(3, vocab)
    signal = teacher_topk_signal(teacher, k, chunk_size=2)
    assert signal.bytes_per_token == k * 8 + 4 == 516
    stored = sum(t.numel() * t.element_size() for t in (signal.ids, signal.logp, signal.tail_logp))
    assert stored == 3 * signal.bytes_per_token
    assert signal.bytes_per_token * 500 < 2 * vocab


def test_signal_rows_and_to():
    _, teacher, _, _ = make_inputs(6, 10, seed=34)
    signal = teacher_topk_signal(teacher, 2, chunk_size=4)
    part = signal[2:5].to("cpu")
    assert isinstance(part, TopKSignal) and part.k == 2
    assert torch.equal(part.ids, signal.ids[2:5]) and torch.equal(part.tail_logp, signal.tail_logp[2:5])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_sampled_logp(temperature):
    _, teacher, token_ids, _ = make_inputs(21, 56, seed=35)
    token_ids = token_ids % 48
    got = teacher_sampled_logp(teacher, token_ids, temperature=temperature, chunk_size=5, vocab_limit=48)
    want = ref_teacher_logp(teacher, 48, temperature).gather(-1, token_ids[:, None]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (21,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Loss values and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 49])
@pytest.mark.parametrize(
    ("n", "chunk_size"),
    [(37, 8), (5, 64), (16, 4)],
    ids=["ragged-last-chunk", "chunk-gt-n", "exact-multiple"],
)
def test_matches_reference(k, n, chunk_size):
    student, teacher, token_ids, weights = make_inputs(n, 50, seed=40)
    assert_matches(student, teacher, token_ids, weights, k, chunk_size=chunk_size)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature_applies_to_both_sides(temperature):
    student, teacher, token_ids, weights = make_inputs(23, 40, seed=41)
    signal = assert_matches(student, teacher, token_ids, weights, 6, chunk_size=6, temperature=temperature)
    # The same signal with the student at T = 1 is a different loss: T really reaches the student side.
    loss_t, _ = chunked_topk_forward_kl(
        student, signal, token_ids, weights, temperature=temperature, chunk_size=4
    )
    loss_1, _ = chunked_topk_forward_kl(student, signal, token_ids, weights, chunk_size=4)
    assert not torch.allclose(loss_t, loss_1, rtol=1e-3)


def test_k_equal_to_vocab_is_the_full_forward_kl():
    student, teacher, token_ids, weights = make_inputs(19, 32, seed=42)
    teacher[2, 10:] = NEG_INF  # zero-probability ids inside the "top-k"
    signal = teacher_topk_signal(teacher, 32, temperature=0.8, chunk_size=5)
    assert torch.all(signal.tail_logp == NEG_INF)
    loss, grad, stats = run(student, signal, token_ids, weights, chunk_size=5, temperature=0.8)
    s = student.clone().requires_grad_(True)
    full_loss, full_stats = chunked_distill_loss(
        s, teacher, token_ids, weights, loss_type="forward_kl", chunk_size=5, temperature=0.8
    )
    full_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(stats.divergence).all()
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.divergence, full_stats.divergence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.student_logp, full_stats.student_logp)
    torch.testing.assert_close(stats.student_entropy, full_stats.student_entropy)
    assert torch.all(stats.sampled_in_topk == 1.0)
    torch.testing.assert_close(stats.teacher_topk_mass, torch.ones(19))


def test_topk_divergence_is_at_most_full_forward_kl():
    # Coarsening both distributions to (top-k, tail) can only lose information.
    student, teacher, token_ids, weights = make_inputs(30, 40, seed=43)
    _, full = chunked_distill_loss(student, teacher, token_ids, weights, loss_type="forward_kl", chunk_size=4)
    previous = torch.zeros(30)
    for k in (1, 4, 16, 39, 40):
        _, stats = chunked_topk_forward_kl(
            student, teacher_topk_signal(teacher, k, chunk_size=4), token_ids, weights, chunk_size=4
        )
        assert torch.all(stats.divergence <= full.divergence + 1e-5)
        assert torch.all(stats.divergence >= previous - 1e-5)  # refining the partition can only add
        previous = stats.divergence


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_identical_distributions_give_zero(k, temperature):
    student, _, token_ids, weights = make_inputs(17, 20, seed=44, scale=5.0)
    signal = teacher_topk_signal(student, k, temperature=temperature, chunk_size=5)
    loss, grad, stats = run(student, signal, token_ids, weights, chunk_size=5, temperature=temperature)
    assert stats.divergence.abs().max() < 1e-6 and loss.abs() < 1e-6
    assert grad.abs().max() < 1e-6


def test_masked_rows_contribute_nothing():
    student, teacher, token_ids, weights = make_inputs(20, 32, seed=45)
    weights[[0, 5, 6, 19]] = 0.0
    signal = teacher_topk_signal(teacher, 4, chunk_size=4)
    signal.tail_logp[0] = 0.0  # inconsistent row: all mass claimed twice
    signal.logp[5] = NEG_INF  # all-zero teacher row
    signal.tail_logp[5] = NEG_INF
    signal.logp[6] = float("nan")  # garbage
    signal.tail_logp[19] = float("inf")
    loss, grad, stats = run(student, signal, token_ids, weights, chunk_size=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all(grad[[0, 5, 6, 19]] == 0)
    keep = weights != 0
    ref_loss, ref_grad, _ = ref_topk_loss(student, teacher, signal.ids, token_ids, weights)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double()[keep], ref_grad[keep], rtol=1e-4, atol=1e-6)


def test_fully_masked_chunk_still_has_stats():
    student, teacher, token_ids, weights = make_inputs(12, 16, seed=46)
    weights[4:8] = 0.0  # exactly the second chunk, skipped in backward
    signal = teacher_topk_signal(teacher, 3, chunk_size=4)
    _, grad, stats = run(student, signal, token_ids, weights, chunk_size=4)
    _, _, ref_stats = ref_topk_loss(student, teacher, signal.ids, token_ids, weights)
    assert torch.all(grad[4:8] == 0)
    torch.testing.assert_close(stats.divergence.double(), ref_stats.divergence, rtol=1e-4, atol=1e-5)


def test_teacher_neg_inf_entries_are_finite():
    student, teacher, token_ids, weights = make_inputs(16, 40, seed=47)
    teacher[:, 20:] = NEG_INF  # e.g. a filtered teacher: half the vocabulary has no mass
    teacher[3, :19] = NEG_INF  # one-hot row
    for k in (1, 8, 25):  # k = 25: top-k includes zero-probability ids and the tail is empty
        signal = assert_matches(student, teacher, token_ids, weights, k, chunk_size=5)
        assert torch.all(signal.tail_logp[3] == NEG_INF)


def test_teacher_larger_vocab():
    student, teacher, token_ids, weights = make_inputs(19, 48, v_t=56, seed=48)
    signal = assert_matches(student, teacher, token_ids, weights, 5, chunk_size=6, vocab_limit=48)
    assert int(signal.ids.max()) < 48
    # Without the limit the teacher renormalises over 56 ids: a different signal.
    assert not torch.allclose(
        teacher_topk_signal(teacher, 5, chunk_size=4).tail_logp, signal.tail_logp, atol=1e-3
    )


def test_student_larger_vocab_pads_get_zero_grad():
    student, teacher, token_ids, weights = make_inputs(11, 56, v_t=48, seed=49)
    assert_matches(student, teacher, token_ids, weights, 5, chunk_size=4, vocab_limit=48)
    signal = teacher_topk_signal(teacher, 5, chunk_size=4)
    _, grad, _ = run(student, signal, token_ids, weights, chunk_size=4, vocab_limit=48)
    assert torch.all(grad[:, 48:] == 0) and grad[:, :48].abs().sum() > 0


def test_bf16_student():
    student, teacher, token_ids, weights = make_inputs(33, 64, dtype=torch.bfloat16, seed=50)
    assert_matches(student, teacher.float(), token_ids, weights, 8, rtol=2e-2, atol=1e-4, chunk_size=8)


def test_grad_output_scaling_and_no_grad_elsewhere():
    student, teacher, token_ids, weights = make_inputs(10, 16, seed=51)
    signal = teacher_topk_signal(teacher, 3, chunk_size=4)
    _, grad, _ = run(student, signal, token_ids, weights, chunk_size=3)
    s = student.clone().requires_grad_(True)
    weights.requires_grad_(True)
    signal.logp.requires_grad_(True)
    loss, stats = chunked_topk_forward_kl(s, signal, token_ids, weights, chunk_size=3)
    (loss * -2.5).backward()
    torch.testing.assert_close(s.grad, grad * -2.5)
    assert weights.grad is None and signal.logp.grad is None
    assert all(not t.requires_grad for t in vars(stats).values())


@pytest.mark.parametrize("k", [1, 3, 7])  # k = 7 = V: empty tail
def test_gradcheck(k):
    student, teacher, token_ids, weights = make_inputs(5, 7, dtype=torch.float64, seed=52, scale=1.0)
    weights = weights.double()
    weights[2] = 0.0
    teacher[4, 5:] = NEG_INF  # zero teacher mass inside or outside the top-k, depending on k
    signal = teacher_topk_signal(teacher, k, temperature=0.8, chunk_size=4)
    student.requires_grad_(True)

    def fn(x):
        return chunked_topk_forward_kl(x, signal, token_ids, weights, chunk_size=2, temperature=0.8)[0]

    assert fn(student).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8)


def test_empty_input():
    student = torch.zeros(0, 16, requires_grad=True)
    signal = teacher_topk_signal(torch.zeros(0, 16), 4, chunk_size=4)
    assert signal.ids.shape == (0, 4)
    loss, stats = chunked_topk_forward_kl(
        student, signal, torch.zeros(0, dtype=torch.long), torch.zeros(0), chunk_size=4
    )
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in vars(stats).values())
    loss.backward()
    assert student.grad.shape == (0, 16)


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must"),
        ({"k": 17}, "k must"),
        ({"k": 4, "vocab_limit": 0}, "vocab_limit"),
        ({"k": 4, "vocab_limit": 3}, "k must"),
        ({"k": 4, "chunk_size": 0}, "chunk_size"),
        ({"k": 4, "temperature": 0.0}, "temperature"),
    ],
)
def test_signal_invalid_arguments(kwargs, match):
    _, teacher, _, _ = make_inputs(4, 16)
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=match):
        teacher_topk_signal(teacher, k, **{"chunk_size": 4, **kwargs})


@pytest.mark.parametrize(
    "bad", ["ids_rows", "logp_k", "tail_len", "token_ids_len", "weights_len", "k_gt_vocab"]
)
def test_loss_invalid_tensors(bad):
    student, teacher, token_ids, weights = make_inputs(6, 8)
    signal = teacher_topk_signal(teacher, 3, chunk_size=4)
    kw = {}
    if bad == "ids_rows":
        signal = TopKSignal(signal.ids[:5], signal.logp, signal.tail_logp)
    elif bad == "logp_k":
        signal = TopKSignal(signal.ids, signal.logp[:, :2], signal.tail_logp)
    elif bad == "tail_len":
        signal = TopKSignal(signal.ids, signal.logp, signal.tail_logp[:5])
    elif bad == "token_ids_len":
        token_ids = token_ids[:5]
    elif bad == "weights_len":
        weights = torch.ones(7)
    else:
        kw["vocab_limit"] = 2
    with pytest.raises(ValueError):
        chunked_topk_forward_kl(student, signal, token_ids, weights, chunk_size=4, **kw)

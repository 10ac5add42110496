"""Every objective's extra memory is at most two [chunk, V] float32 buffers, whatever the number of tokens N.

Memory is tracked on CPU with ``benchmarks/memtrack.StorageTracker`` (a dispatch mode counting live tensor
storages), which is deterministic, unlike process RSS. "Extra" memory is the peak during forward + backward
minus what the call must produce: the gradient of its student rows (the logits ``[N, V]``, or with the fused
head the hidden states ``[N, H]`` and the head ``[V, H]``). Inputs exist before the measurement starts. What
is left besides the chunk buffers is a handful of ``[N]`` and ``[chunk, k]`` vectors, allowed as ``SLACK``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_pg_losses import policy_config  # noqa: F401  (module-scoped fixture: verl's actor config)
from torch.utils._pytree import tree_flatten

# The tracker and the naive baseline live with the benchmark script (conftest.py puts src/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_loss_memory import naive_distill_loss  # noqa: E402
from memtrack import StorageTracker, measure_peak_bytes  # noqa: E402

from opd.config import OPDConfig  # noqa: E402
from opd.objectives import (  # noqa: E402
    MicroBatchTokens,
    ObjectiveContext,
    distillation_objective,
    task_policy_loss,
)
from opd.objectives.divergences import LOSS_REGISTRY, chunked_distill_loss, get_loss, register_loss  # noqa: E402
from opd.objectives.engine import OutputHead  # noqa: E402
from opd.objectives.policy_gradient import PG_OBJECTIVES  # noqa: E402
from opd.objectives.teacher_signal import (  # noqa: E402
    CachedSignal,
    teacher_sampled_logp,
    teacher_topk_signal,
)
from opd.objectives.topk import TOPK_LOSS  # noqa: E402

VOCAB = 4096
HIDDEN = 64
CHUNK = 128
CHUNK_BYTES = CHUNK * VOCAB * 4  # one [chunk, V] fp32 buffer
SLACK = CHUNK_BYTES // 16  # [N] stats, [chunk, k] top-k rows, [chunk, H] hidden rows, one-row copies
BOUND = 2 * CHUNK_BYTES + SLACK
TOKEN_COUNTS = (256, 1024)
FULL_VOCABULARY = sorted(name for name, divergence in LOSS_REGISTRY.items() if divergence.buffers is not None)
TOPK = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: the numbers do not depend on it, and on a busy small CPU it is several times
    faster than threads contending for cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def in_chunks(extras: dict) -> dict:
    return {key: round(extra / CHUNK_BYTES, 3) for key, extra in extras.items()}


def assert_bounded(extras: dict[int, int], bound: int = BOUND) -> None:
    """At every N the extra peak is within ``bound``, and it does not grow with N (beyond ``SLACK``)."""
    smallest = extras[min(extras)]
    for extra in extras.values():
        assert extra <= bound, in_chunks(extras)
        assert extra <= smallest + SLACK, in_chunks(extras)


def assert_flat_extras(extras: dict[int, int], max_chunks: float) -> None:
    """Extra peak at every N within 1.5x of the smallest N's (or of one chunk buffer, whichever is larger)
    and below ``max_chunks`` chunk buffers; ``extras`` maps N to bytes."""
    smallest = extras[min(extras)]
    for extra in extras.values():
        assert extra <= 1.5 * max(smallest, CHUNK_BYTES), in_chunks(extras)
        assert extra < max_chunks * CHUNK_BYTES, in_chunks(extras)


# ------------------------------------------------------------------------------------------------------------
# Inputs: the student's rows (logits, or hidden states and head) and the teacher's signal
# ------------------------------------------------------------------------------------------------------------

STUDENTS = ("logits-bf16", "logits-fp32", "fused-bf16", "fused-fp32")


class Student:
    """One way of passing the student's rows, built fresh (with gradient) for every run."""

    def __init__(self, kind: str, n: int, seed: int, hidden: int = HIDDEN):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind.startswith("logits"):
            dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
            self.logits = (torch.randn(n, VOCAB, generator=g) * 3).to(dtype)
        else:
            self.hidden = torch.randn(n, hidden, generator=g)
            self.weight = torch.randn(VOCAB, hidden, generator=g) * 3 / hidden**0.5
            self.matmul_dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32

    def rows(self):
        """A fresh differentiable student: logits [n, V] or an OutputHead."""
        if self.kind.startswith("logits"):
            return self.logits.detach().requires_grad_(True)
        hidden = self.hidden.detach().requires_grad_(True)
        weight = self.weight.detach().requires_grad_(True)
        return OutputHead(hidden, weight, self.matmul_dtype)

    def gradient_bytes(self) -> int:
        """The gradients the call must produce."""
        if self.kind.startswith("logits"):
            return self.logits.numel() * self.logits.element_size()
        return self.hidden.numel() * 4 + self.weight.numel() * 4

    def cast_bytes(self) -> int:
        """Fused with a bf16 matmul: the fp32 head cast to bf16, which each pass holds once (as autocast
        holds it for the model's own head)."""
        fused_bf16 = self.kind.startswith("fused") and self.matmul_dtype == torch.bfloat16
        return self.weight.numel() * 2 if fused_bf16 else 0


def make_tokens(n: int, seed: int = 0):
    """Token ids [n] and token-mean weights [n] with a masked tail."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    weights = torch.ones(n)
    weights[-n // 8 :] = 0.0
    return ids, weights / weights.sum()


def teacher_logits(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n + 7)
    return (torch.randn(n, VOCAB, generator=g) * 3).bfloat16()


def teacher_signal(kind: str, n: int, ids: torch.Tensor) -> CachedSignal:
    """The cached signal of one micro-batch as the teacher phase leaves it (bf16 on the host)."""
    if kind == "hidden":
        g = torch.Generator().manual_seed(n + 8)
        hidden = torch.randn(n, HIDDEN, generator=g).bfloat16()
        head = (torch.randn(VOCAB, HIDDEN, generator=g) * 3 / HIDDEN**0.5).bfloat16()
        return CachedSignal(hidden=hidden, head=head)
    logits = teacher_logits(n)
    if kind == "full":
        return CachedSignal(logits=logits)
    sampled = teacher_sampled_logp(logits, ids, chunk_size=CHUNK)
    if kind == "topk":
        return CachedSignal(topk=teacher_topk_signal(logits, TOPK, chunk_size=CHUNK), sampled_logp=sampled)
    return CachedSignal(sampled_logp=sampled)


def extra_peak(forward, student: Student) -> int:
    """The larger of the forward's and the backward's extra peak, ``forward()`` returning a scalar loss.

    Forward: the peak while it runs, less the gradients the call must produce where forward leaves them
    alive (a weighted sum computes its gradient in forward; ``test_forward_saves_no_chunk_intermediates``
    checks that nothing else stays). Backward: the peak while it runs beyond what was alive when it started
    and the gradients it produces.
    """
    with StorageTracker() as tracker:
        loss = forward()
        forward_peak = tracker.peak - student.cast_bytes() - min(tracker.current, student.gradient_bytes())
        tracker.reset_peak()
        alive = tracker.current
        loss.backward()
        backward_peak = tracker.peak - alive - student.gradient_bytes() - student.cast_bytes()
    return max(forward_peak, backward_peak)


def objective_extra(loss_type: str, signal_kind: str, student_kind: str, n: int, policy_config, **config):  # noqa: F811
    """Extra peak of one ``distillation_objective`` call with backward (the student step's own path)."""
    student = Student(student_kind, n, seed=n)
    ids, weights = make_tokens(n)
    signal = teacher_signal(signal_kind, n, ids)
    config = OPDConfig(teacher_model_path="unused", loss_type=loss_type, chunk_size=CHUNK, **config)
    ctx = ObjectiveContext(config, step=1, rollout_temperature=1.0, policy_config=policy_config)
    # rollout log-probs near the student's own, so the ratio is unclipped and every row has a gradient
    rollout_logp = torch.full((n,), -float(torch.log(torch.tensor(VOCAB))))

    def forward():
        tokens = MicroBatchTokens(student.rows(), ids, (weights != 0).float(), [n], rollout_logp, CHUNK, 1.0)
        return distillation_objective(tokens, signal, weights, ctx).loss

    return extra_peak(forward, student)


# ------------------------------------------------------------------------------------------------------------
# The bound, for every objective
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_kind", ["full", "hidden"])
@pytest.mark.parametrize("loss_type", FULL_VOCABULARY)
@pytest.mark.parametrize("student_kind", ["logits-bf16", "fused-bf16"])
def test_full_vocabulary_divergences_stay_within_two_chunk_buffers(
    loss_type,
    signal_kind,
    student_kind,
    policy_config,  # noqa: F811
):
    extras = {
        n: objective_extra(loss_type, signal_kind, student_kind, n, policy_config, paced_blend_steps=2)
        for n in TOKEN_COUNTS
    }
    assert_bounded(extras)


@pytest.mark.parametrize("student_kind", STUDENTS)
@pytest.mark.parametrize(
    ("loss_type", "signal_kind"),
    [("reverse_kl", "full"), (TOPK_LOSS, "topk"), *((name, "sampled") for name in PG_OBJECTIVES)],
)
def test_every_signal_and_student_stays_within_two_chunk_buffers(
    loss_type,
    signal_kind,
    student_kind,
    policy_config,  # noqa: F811
):
    extras = {
        n: objective_extra(loss_type, signal_kind, student_kind, n, policy_config) for n in TOKEN_COUNTS
    }
    assert_bounded(extras)


@pytest.mark.parametrize("loss_type", ["reverse_kl", "jsd"])
def test_a_head_wider_than_the_chunk_stays_within_two_chunk_buffers(loss_type):
    """H > chunk: the head's gradient ``g^T @ hidden`` ([V, H]) would outgrow the chunk's gradient, so it is
    summed a slice of vocabulary rows at a time."""
    extras = {}
    for n in TOKEN_COUNTS:
        student = Student("fused-bf16", n, seed=n, hidden=2 * CHUNK)
        ids, weights = make_tokens(n)
        teacher = teacher_logits(n)

        def forward(student=student, ids=ids, weights=weights, teacher=teacher):
            rows = student.rows()
            return chunked_distill_loss(rows, teacher, ids, weights, loss_type=loss_type, chunk_size=CHUNK)[0]

        extras[n] = extra_peak(forward, student)
    assert_bounded(extras)


@pytest.mark.parametrize("student_kind", ["logits-bf16", "fused-bf16"])
@pytest.mark.parametrize(("loss_type", "signal_kind"), [("jsd", "hidden"), (TOPK_LOSS, "topk")])
def test_tip_probe_stays_within_two_chunk_buffers(loss_type, signal_kind, student_kind, policy_config):  # noqa: F811
    """TIP's no-grad probe: a forward of the objective, nothing kept but the stats."""
    extras = {}
    for n in TOKEN_COUNTS:
        student = Student(student_kind, n, seed=n)
        ids, weights = make_tokens(n)
        signal = teacher_signal(signal_kind, n, ids)
        ctx = ObjectiveContext(
            OPDConfig(teacher_model_path="unused", loss_type=loss_type, chunk_size=CHUNK),
            1,
            1.0,
            policy_config,
        )
        tokens = MicroBatchTokens(student.rows(), ids, (weights != 0).float(), [n], None, CHUNK, 1.0)

        def probe(tokens=tokens, signal=signal, weights=weights, ctx=ctx):
            with torch.no_grad():
                return distillation_objective(tokens, signal, weights, ctx)

        extras[n] = measure_peak_bytes(probe) - student.cast_bytes()
    assert_bounded(extras)


@pytest.mark.parametrize("student_kind", ["logits-bf16", "fused-bf16"])
def test_task_loss_stays_within_two_chunk_buffers(student_kind, policy_config):  # noqa: F811
    """GRPO + OPD's task term alone: verl's policy loss on the chunked rollout-temperature log-probs."""
    config = OPDConfig(teacher_model_path="unused", chunk_size=CHUNK)
    extras = {}
    for n in TOKEN_COUNTS:
        student = Student(student_kind, n, seed=n)
        ids, weights = make_tokens(n)
        advantages = torch.linspace(-1, 1, n)

        rollout_logp = torch.full((n,), -float(torch.log(torch.tensor(VOCAB))))

        def forward(
            student=student, ids=ids, weights=weights, advantages=advantages, n=n, rollout=rollout_logp
        ):
            tokens = MicroBatchTokens(student.rows(), ids, (weights != 0).float(), [n], rollout, CHUNK, 0.7)
            ctx = ObjectiveContext(config, 1, 0.7, policy_config)
            return task_policy_loss(tokens, advantages, weights, ctx)[0]

        extras[n] = extra_peak(forward, student)
    assert_bounded(extras)


def test_forward_saves_no_chunk_intermediates():
    """Between forward and backward only the per-token values and stats and the student's gradients (computed
    in forward) may be alive, for every divergence and with either student."""
    n = 1024
    ids, weights = make_tokens(n)
    teacher = teacher_logits(n)
    for student_kind in ("logits-bf16", "fused-bf16"):
        student = Student(student_kind, n, seed=1)
        for loss_type in FULL_VOCABULARY:
            rows = student.rows()
            with StorageTracker() as tracker:
                loss, _stats = chunked_distill_loss(
                    rows, teacher, ids, weights, loss_type=loss_type, chunk_size=CHUNK
                )
                kept = tracker.current - student.gradient_bytes()
                assert kept <= 16 * n * 4, (student_kind, loss_type, kept)
                peak = tracker.peak - student.cast_bytes() - student.gradient_bytes()
                assert peak <= BOUND, (student_kind, loss_type, in_chunks({"peak": peak}))
                loss.backward()


# ------------------------------------------------------------------------------------------------------------
# The measurement has teeth
# ------------------------------------------------------------------------------------------------------------


def test_tracker_sees_forward_and_backward_allocations():
    x = torch.randn(64, 64, requires_grad=True)
    block = x.numel() * 4
    with StorageTracker() as tracker:
        y = (x * 2).exp().sum()
        assert tracker.current >= block  # exp's saved output
        tracker.reset_peak()
        before = tracker.current
        y.backward()  # allocations here happen inside the autograd engine
        assert tracker.peak - before >= block
        del y
    assert x.grad is not None
    assert tracker.current == block  # only x.grad is still alive


def naive_extra(n: int) -> int:
    """Extra peak of the unchunked baseline (whole-batch log-softmax, plain autograd)."""
    student = Student("logits-fp32", n, seed=n)
    teacher = teacher_logits(n)
    _, weights = make_tokens(n)

    def forward():
        return naive_distill_loss(student.rows(), teacher, weights, loss_type="reverse_kl", temperature=0.9)

    return extra_peak(forward, student)


def test_naive_extra_peak_grows_with_tokens():
    # The same measurement must flag an unchunked loss, or the bounds above would prove nothing.
    small, large = naive_extra(256), naive_extra(1024)
    assert large >= 3.5 * small
    assert large > 4 * BOUND


def test_an_unfused_head_holds_n_by_v_logits():
    """The fused bound excludes [N, V]: the model head's own logits (hidden @ W^T through autograd, then the
    chunked loss) exceed it by their [N, V] logits and gradient, and more so with more tokens."""
    extras = {}
    for n in TOKEN_COUNTS:
        student = Student("fused-fp32", n, seed=n)
        ids, weights = make_tokens(n)
        teacher = teacher_logits(n)

        def forward(student=student, ids=ids, weights=weights, teacher=teacher):
            head = student.rows()
            logits = head.hidden @ head.weight.t()
            return chunked_distill_loss(logits, teacher, ids, weights, chunk_size=CHUNK)[0]

        extras[n] = extra_peak(forward, student)
    # 768 more tokens: 768 * V * 4 bytes more logits, i.e. 6 chunk buffers
    assert extras[1024] > 4 * BOUND and extras[1024] - extras[256] > 5 * CHUNK_BYTES, in_chunks(extras)


def test_a_divergence_without_closed_forms_is_flat_but_unbounded():
    """Registered without ``value`` and ``logit_grad``: forward and backward run its ``fn`` (autograd on
    each recomputed chunk), so its own temporaries count, but still per chunk, never per N."""
    register_loss("memtest_autograd_jsd")(get_loss("jsd"))
    try:
        extras = {}
        for n in TOKEN_COUNTS:
            student = Student("logits-fp32", n, seed=n)
            ids, weights = make_tokens(n)
            teacher = teacher_logits(n)

            def forward(student=student, ids=ids, weights=weights, teacher=teacher):
                return chunked_distill_loss(
                    student.rows(), teacher, ids, weights, loss_type="memtest_autograd_jsd", chunk_size=CHUNK
                )[0]

            extras[n] = extra_peak(forward, student)
        assert_flat_extras(extras, max_chunks=16)
        assert max(extras.values()) > BOUND  # this one is not held to the closed forms' bound
    finally:
        LOSS_REGISTRY.pop("memtest_autograd_jsd")


def test_topk_signal_extraction_is_flat_in_tokens():
    extras = {}
    for n in TOKEN_COUNTS:
        teacher = teacher_logits(n)
        peak = measure_peak_bytes(lambda t=teacher: teacher_topk_signal(t, TOPK, chunk_size=CHUNK))
        extras[n] = peak - n * (TOPK * 8 + 4)  # minus the signal itself
    assert_bounded(extras)


# ------------------------------------------------------------------------------------------------------------
# Host-resident teacher rows
# ------------------------------------------------------------------------------------------------------------


def row_reading(tensor: torch.Tensor, reads: list[int]) -> torch.Tensor:
    """``tensor`` as a subclass that appends to ``reads`` the row count of every op that reads it.

    Slicing is a view and reads nothing, so it is not logged and keeps the subclass. Everything else is
    logged, including a ``.to(device)`` that is a no-op on a CPU-only host: that is how a whole-tensor copy to
    the device shows here, where host and device are the same memory.
    """

    class RowReads(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
                rows = [t.shape[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, RowReads)]
            if func in (torch.Tensor.__getitem__, torch.Tensor.detach):
                return out.as_subclass(cls)
            if isinstance(out, torch.Tensor):  # shape, device and dtype queries return no tensor
                reads.append(max(rows))
            return out

    return tensor.as_subclass(RowReads)


@pytest.mark.parametrize("student_kind", ["logits-fp32", "fused-bf16"])
def test_full_signal_copies_one_chunk_of_teacher_rows_at_a_time(student_kind):
    """The cached bf16 teacher rows stay on the host; forward reads them a chunk at a time, and only once."""
    n, chunk = 256, 32
    student = Student(student_kind, n, seed=3)
    ids, weights = make_tokens(n)
    reads: list[int] = []
    cached = CachedSignal(logits=row_reading(teacher_logits(n), reads))
    tokens = MicroBatchTokens(student.rows(), ids, (weights != 0).float(), [n], None, chunk, 1.0)
    config = OPDConfig(teacher_model_path="unused", chunk_size=chunk, temperature=0.9)
    out = distillation_objective(tokens, cached, weights, ObjectiveContext(config, 1, 1.0))
    forward_reads = len(reads)
    out.loss.backward()
    # at most a chunk of rows at a time, each row once: one read serves the value and the gradient
    assert sum(reads) == n and max(reads) <= chunk, reads
    assert len(reads) == forward_reads, reads

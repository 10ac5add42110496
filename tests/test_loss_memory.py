"""The chunked loss's extra memory is bounded by the chunk size, not by the number of tokens N.

Memory is tracked on CPU with ``benchmarks/memtrack.StorageTracker`` (a dispatch mode counting live tensor
storages), which is deterministic, unlike process RSS. "Extra" memory is the peak during forward + backward
minus what any implementation must hold: the student-logits gradient [N, V] and the five [N] stats vectors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

# The tracker and the naive baseline live with the benchmark script (conftest.py puts src/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_loss_memory import naive_distill_loss  # noqa: E402
from memtrack import StorageTracker, measure_peak_bytes  # noqa: E402

from opd.config import OPDConfig  # noqa: E402
from opd.losses import LOSS_REGISTRY, chunked_distill_loss, register_loss  # noqa: E402
from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective  # noqa: E402
from opd.pg_losses import chunked_token_logp, sampled_token_stats  # noqa: E402
from opd.teacher import CachedSignal  # noqa: E402
from opd.topk_losses import chunked_topk_forward_kl, teacher_sampled_logp, teacher_topk_signal  # noqa: E402

VOCAB = 4096
CHUNK = 128
CHUNK_BYTES = CHUNK * VOCAB * 4  # one [chunk, V] fp32 buffer
TOKEN_COUNTS = (256, 1024, 4096)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: the numbers do not depend on it, and on a busy small CPU it is several times
    faster than threads contending for cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(n: int, dtype=torch.float32):
    """student [n, VOCAB] leaf, teacher [n, VOCAB], ids [n], token-mean weights [n] with a masked tail."""
    g = torch.Generator().manual_seed(n)
    student = (torch.randn(n, VOCAB, generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, VOCAB, generator=g) * 3).to(dtype)
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    weights = torch.ones(n)
    weights[-n // 8 :] = 0.0
    return student, teacher, ids, weights / weights.sum()


def chunked_step(loss_type: str):
    """Forward + backward of the chunked loss; returns what a caller would keep (loss, stats)."""

    def step(student, teacher, ids, weights):
        loss, stats = chunked_distill_loss(
            student, teacher, ids, weights, loss_type=loss_type, chunk_size=CHUNK, temperature=0.9
        )
        loss.backward()
        return loss, stats

    return step


def naive_step(student, teacher, ids, weights):
    """Forward + backward of the unchunked baseline."""
    loss = naive_distill_loss(student, teacher, weights, loss_type="reverse_kl", temperature=0.9)
    loss.backward()
    return loss


def extra_peak_bytes(step, n: int, dtype=torch.float32) -> int:
    """Peak bytes allocated by ``step`` beyond the student grad [n, V] and the stats vectors [5, n]."""
    student, teacher, ids, weights = make_inputs(n, dtype)
    peak = measure_peak_bytes(lambda: step(student, teacher, ids, weights))
    unavoidable = student.numel() * student.element_size() + 5 * n * 4
    return peak - unavoidable


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


def test_forward_saves_no_chunk_intermediates():
    n = 1024
    student, teacher, ids, weights = make_inputs(n)
    with StorageTracker() as tracker:
        loss, _stats = chunked_distill_loss(student, teacher, ids, weights, chunk_size=CHUNK)
        # Between forward and backward only the loss scalar and the five [N] stats may be alive.
        assert tracker.current <= 5 * n * 4 + 64
        assert tracker.peak < 8 * CHUNK_BYTES
        loss.backward()


def assert_flat_extras(extras: dict[int, int], max_chunks: float) -> None:
    """Extra peak at every N within 1.5x of the smallest N's (or of one chunk buffer, whichever is larger)
    and below ``max_chunks`` chunk buffers; ``extras`` maps N to bytes."""
    in_chunks = {n: round(e / CHUNK_BYTES, 2) for n, e in extras.items()}  # shown on failure
    smallest = extras[min(extras)]
    for extra in extras.values():
        assert extra <= 1.5 * max(smallest, CHUNK_BYTES), in_chunks
        assert extra < max_chunks * CHUNK_BYTES, in_chunks


def assert_flat(loss_type: str, token_counts, dtype=torch.float32, max_chunks: float = 8) -> None:
    """The chunked loss's extra peak is flat in N (see :func:`assert_flat_extras`)."""
    assert_flat_extras(
        {n: extra_peak_bytes(chunked_step(loss_type), n, dtype) for n in token_counts}, max_chunks
    )


def test_chunked_extra_peak_is_flat_in_tokens():
    assert_flat("reverse_kl", TOKEN_COUNTS)


# The other losses and bf16 share the chunk loop; two sizes keep the file fast on a small CPU.
@pytest.mark.parametrize(
    ("loss_type", "dtype"),
    [("forward_kl", torch.float32), ("jsd", torch.float32), ("reverse_kl", torch.bfloat16)],
    ids=["forward_kl", "jsd", "reverse_kl-bf16"],
)
def test_other_losses_and_bf16_are_flat(loss_type, dtype):
    assert_flat(loss_type, TOKEN_COUNTS[:2], dtype)


def test_autograd_fallback_is_flat():
    # A loss registered without a closed-form gradient recomputes its chunk under autograd in backward.
    register_loss("memtest_autograd_jsd")(LOSS_REGISTRY["jsd"])
    try:
        assert_flat("memtest_autograd_jsd", TOKEN_COUNTS[:2], max_chunks=16)
    finally:
        LOSS_REGISTRY.pop("memtest_autograd_jsd")


def test_naive_extra_peak_grows_with_tokens():
    # The same measurement must flag an unchunked loss, or the flat result above would prove nothing.
    small, large = extra_peak_bytes(naive_step, 256), extra_peak_bytes(naive_step, 1024)
    assert large >= 3.5 * small
    assert large > 16 * CHUNK_BYTES  # i.e. it would fail the bounds above


# ------------------------------------------------------------------------------------------------------------
# Skew KLs and the top-k signal path
# ------------------------------------------------------------------------------------------------------------

TOPK = 64


@pytest.mark.parametrize("loss_type", ["skew_kl", "skew_reverse_kl"])
def test_skew_losses_are_flat(loss_type):
    assert_flat(loss_type, TOKEN_COUNTS[:2])


def topk_extra_peak_bytes(n: int) -> int:
    """Peak bytes of top-k loss forward + backward beyond the student grad [n, V] and the 6 stats [n]."""
    student, teacher, ids, weights = make_inputs(n)
    signal = teacher_topk_signal(teacher, TOPK, temperature=0.9, chunk_size=CHUNK)
    del teacher  # the point of the signal: the full teacher logits are not needed by the loss

    def step():
        loss, stats = chunked_topk_forward_kl(
            student, signal, ids, weights, chunk_size=CHUNK, temperature=0.9
        )
        loss.backward()
        return loss, stats

    peak = measure_peak_bytes(step)
    return peak - (student.numel() * student.element_size() + 6 * n * 4)


def test_topk_loss_extra_peak_is_flat_in_tokens():
    assert_flat_extras({n: topk_extra_peak_bytes(n) for n in TOKEN_COUNTS}, max_chunks=6)


def test_topk_signal_extra_peak_is_flat_in_tokens():
    extras = {}
    for n in TOKEN_COUNTS[:2]:
        _, teacher, _, _ = make_inputs(n)
        peak = measure_peak_bytes(lambda t=teacher: teacher_topk_signal(t, TOPK, chunk_size=CHUNK))
        extras[n] = peak - n * (TOPK * 8 + 4)  # minus the signal itself
    in_chunks = {n: round(e / CHUNK_BYTES, 2) for n, e in extras.items()}
    assert extras[TOKEN_COUNTS[1]] <= 1.5 * extras[TOKEN_COUNTS[0]], in_chunks
    assert max(extras.values()) < 6 * CHUNK_BYTES, in_chunks


def test_topk_forward_saves_no_chunk_intermediates():
    n = 1024
    student, teacher, ids, weights = make_inputs(n)
    signal = teacher_topk_signal(teacher, TOPK, chunk_size=CHUNK)
    with StorageTracker() as tracker:
        loss, _stats = chunked_topk_forward_kl(student, signal, ids, weights, chunk_size=CHUNK)
        # Between forward and backward only the loss scalar and the six [N] stats may be alive.
        assert tracker.current <= 6 * n * 4 + 64
        assert tracker.peak < 6 * CHUNK_BYTES
        loss.backward()


# ------------------------------------------------------------------------------------------------------------
# Sampled-token policy-gradient path
# ------------------------------------------------------------------------------------------------------------


def pg_extra_peak_bytes(n: int) -> int:
    """Peak of the policy-gradient path (stats, differentiable sampled log-probs, a ratio-times-advantage
    loss, backward) beyond the student grad [n, V] and a few dozen [n] vectors."""
    student, teacher, ids, weights = make_inputs(n)
    teacher_logp = teacher_sampled_logp(teacher, ids, chunk_size=CHUNK)
    del teacher

    def step():
        student_logp, entropy = sampled_token_stats(
            student, ids, temperature=1.0, chunk_size=CHUNK, vocab=VOCAB
        )
        logp = chunked_token_logp(student, ids, temperature=0.9, chunk_size=CHUNK, vocab=VOCAB)
        advantages = teacher_logp - student_logp
        loss = -(weights * advantages * torch.exp(logp - logp.detach())).sum()
        loss.backward()
        return loss, entropy

    peak = measure_peak_bytes(step)
    return peak - (student.numel() * student.element_size() + 32 * n * 4)


def test_policy_gradient_path_extra_peak_is_flat_in_tokens():
    assert_flat_extras({n: pg_extra_peak_bytes(n) for n in TOKEN_COUNTS}, max_chunks=4)


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
            if func is torch.Tensor.__getitem__:
                return out.as_subclass(cls)
            if isinstance(out, torch.Tensor):  # shape, device and dtype queries return no tensor
                reads.append(max(rows))
            return out

    return tensor.as_subclass(RowReads)


def test_full_signal_copies_one_chunk_of_teacher_rows_at_a_time():
    """The cached bf16 teacher rows stay on the host; forward and backward each take one chunk at a time."""
    n, chunk = 256, 32
    student, teacher, ids, weights = make_inputs(n)
    reads: list[int] = []
    cached = CachedSignal(logits=row_reading(teacher.bfloat16(), reads))
    tokens = MicroBatchTokens(
        logits=student,
        token_ids=ids,
        mask=(weights != 0).float(),
        lengths=[n],
        rollout_logp=None,
        chunk_size=chunk,
        rollout_temperature=1.0,
    )
    config = OPDConfig(teacher_model_path="unused", chunk_size=chunk, temperature=0.9)
    out = distillation_objective(tokens, cached, weights, ObjectiveContext(config, 1, 1.0))
    forward_reads = len(reads)
    out.loss.backward()
    assert forward_reads >= n // chunk and max(reads) <= chunk, reads
    # backward reads its chunks again rather than keeping a copy of the rows from forward
    assert len(reads) - forward_reads >= (n - n // 8) // chunk, reads

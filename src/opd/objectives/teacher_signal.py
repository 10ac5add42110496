"""The teacher signal: what the teacher phase caches per response token, and how the objectives read it.

Kinds (:class:`SignalKind`): the teacher's full logits, its final hidden states (the logits rebuilt with its
output head, chunk by chunk), its top-k log-probs plus a tail bucket, or the sampled token's log-prob.
:func:`signal_from_logits` turns the teacher's logits into a cached signal on the host;
:class:`CachedSignal` holds one micro-batch of it; :class:`CachedLogits` and :class:`HiddenTimesHead` give
the full-vocabulary objectives the teacher's logits one chunk of rows at a time.

Teacher floor (every objective, every signal): a teacher log-prob below ``TEACHER_LOGP_FLOOR``, ``-inf``
included, is raised to it after the log-softmax at the loss temperature, before an objective reads it.
Without it a weighted token whose teacher gives zero probability to an id the student can produce makes the
reverse-KL family ``+inf`` with NaN gradients and the sampled-token advantages infinite or NaN. The weighted
tokens where the floor changed something are counted (``opd/teacher_floored_fraction``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from opd.config.schema import DEFAULT_CHUNK_SIZE
from opd.objectives.engine import (
    Chunk,
    ChunkMath,
    copy_into_,
    log_softmax_,
    logsumexp_,
    matmul_into_,
    run_chunked,
)
from opd.objectives.policy_gradient import chunked_token_logp

TEACHER_LOGP_FLOOR = -100.0
"""Lowest teacher log-prob (nats) any objective reads; see the module docstring.

A probability of e^-100 (about 4e-44) is below float32's smallest normal number and far below anything a
model assigns to a token it could emit, so raising a log-prob to it changes no real distribution, while it
bounds what one such token can add: a reverse KL of at most 100 nats, a sampled log-ratio of the same order,
like the worst finite tokens. The float32 minimum (-3.4e38) would be finite too, but would make that token's
loss and gradient astronomically large and swamp the rest of the batch.
"""


class SignalKind(str, enum.Enum):
    """What the teacher phase keeps per response token; the values are the ``opd.teacher_signal`` names."""

    FULL = "full"
    """bf16 logits over the teacher's whole vocabulary (2 * V bytes per token)."""
    HIDDEN = "hidden"
    """bf16 final hidden states (2 * H bytes per token); the loss rebuilds the logits with the teacher's
    output head, which stays on the device for the student phase."""
    TOPK = "topk"
    """Top-k ids and log-probs, a tail bucket and the sampled token's log-prob (k * 8 + 8 bytes)."""
    SAMPLED = "sampled"
    """The sampled token's log-prob only (4 bytes)."""


@dataclass(frozen=True)
class SignalSpec:
    """What the teacher phase keeps per response token: the signal the loss needs, nothing more."""

    kind: SignalKind = SignalKind.FULL
    """The signal (a :class:`SignalKind` or its name)."""

    topk: int = 64
    """Entries per token of the 'topk' signal."""

    temperature: float = 1.0
    """Temperature of the 'topk' and 'sampled' log-probs: the loss temperature, as on the student side."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Tokens per chunk when turning logits into the 'topk' or 'sampled' signal."""

    vocab_limit: int | None = None
    """Student output rows: the 'topk' and 'sampled' log-probs are normalised over the first
    ``min(V_t, vocab_limit)`` ids, the ones both heads have, whichever head is larger."""

    def __post_init__(self):
        object.__setattr__(self, "kind", SignalKind(self.kind))


# ----------------------------------------------------------------------------------------------------
# Full-vocabulary rows: cached logits or hidden states times the head
# ----------------------------------------------------------------------------------------------------


class TeacherRows(Protocol):
    """Where a full-vocabulary objective reads the teacher's logits from, one chunk of rows at a time."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, V_t)``: tokens and teacher output rows."""

    def logits_into(self, buffer: torch.Tensor, rows: slice) -> None:
        """Write the raw (T = 1) logits of the tokens ``rows`` (first ``V`` ids) into ``buffer`` [c, V]."""


@dataclass(frozen=True)
class CachedLogits:
    """The teacher's logits themselves, ``[N, V_t]`` on any device (the 'full' signal)."""

    logits: torch.Tensor

    def __post_init__(self):
        if self.logits.dim() != 2 or not self.logits.is_floating_point():
            raise ValueError(
                f"teacher_logits must be a 2-D [N, V_t] float tensor, got {tuple(self.logits.shape)} "
                f"{self.logits.dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.logits.shape)

    def logits_into(self, buffer: torch.Tensor, rows: slice) -> None:
        copy_into_(buffer, self.logits[rows].detach())


@dataclass(frozen=True)
class HiddenTimesHead:
    """The teacher's logits rebuilt as ``hidden @ head^T`` (the 'hidden' signal).

    ``hidden``: ``[N, H]`` final (post-norm) hidden states, on any device (the host cache); ``head``: the
    output head's weight ``[V_t, H]`` on the student's device. Valid for a head that is a plain linear map
    (no bias, no soft-capping or scaling after it), which ``opd.teacher`` checks before choosing this signal.
    """

    hidden: torch.Tensor
    head: torch.Tensor

    def __post_init__(self):
        hidden, head = self.hidden, self.head
        if hidden.dim() != 2 or head.dim() != 2 or hidden.shape[1] != head.shape[1]:
            raise ValueError(
                f"hidden states [N, H] and output head [V_t, H] do not fit: {tuple(hidden.shape)} and "
                f"{tuple(head.shape)}"
            )
        if not (hidden.is_floating_point() and head.is_floating_point()):
            raise ValueError(
                f"hidden states and output head must be floating point, got {hidden.dtype} and {head.dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden.shape[0], self.head.shape[0]

    def logits_into(self, buffer: torch.Tensor, rows: slice) -> None:
        hidden = self.hidden[rows].detach().to(buffer.device, non_blocking=True)
        # in the head's dtype, as the teacher's own output layer computes them: bf16 in, bf16 logits out
        matmul_into_(buffer, hidden, self.head.detach()[: buffer.shape[1]])


def teacher_log_probs_(teacher: TeacherRows, rows: slice, buffer: torch.Tensor, temperature: float):
    """Floored teacher log-probs of ``rows`` at ``T`` into ``buffer`` ``[c, V]``; -> ``[c]`` bool, True
    where the floor raised one of the row's log-probs."""
    teacher.logits_into(buffer, rows)
    log_softmax_(buffer, temperature)
    floored = buffer.amin(dim=-1) < TEACHER_LOGP_FLOOR
    buffer.clamp_(min=TEACHER_LOGP_FLOOR)
    return floored


def floor_teacher_logp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs raised to ``TEACHER_LOGP_FLOOR`` and 1.0 where that changed them; [N] -> [N], [N]."""
    return logp.clamp(min=TEACHER_LOGP_FLOOR), (logp < TEACHER_LOGP_FLOOR).to(torch.float32)


# ----------------------------------------------------------------------------------------------------
# Compact signals: top-k + tail, sampled token
# ----------------------------------------------------------------------------------------------------


@dataclass
class TopKSignal:
    """The teacher's top-k log-probs of every token, at the loss temperature, on the shared vocabulary."""

    ids: torch.Tensor
    """[N, k] int32: the k most likely ids, most likely first."""
    logp: torch.Tensor
    """[N, k] float32 (float64 for float64 teacher logits): ``log q`` at ``ids``."""
    tail_logp: torch.Tensor
    """[N] same dtype as ``logp``: ``log q_tail = log(1 - sum_j q_j)``; ``-inf`` when the top-k has it all."""

    @property
    def k(self) -> int:
        """Number of entries per token."""
        return self.ids.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        """Cache size of one token: ``k * (id + logp) + tail``, i.e. ``k * 8 + 4`` in the default dtypes."""
        return self.k * (self.ids.element_size() + self.logp.element_size()) + self.tail_logp.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopKSignal:
        """The same signal on ``device``."""
        return TopKSignal(
            ids=self.ids.to(device, non_blocking=non_blocking),
            logp=self.logp.to(device, non_blocking=non_blocking),
            tail_logp=self.tail_logp.to(device, non_blocking=non_blocking),
        )

    def __getitem__(self, rows) -> TopKSignal:
        """The signal of a subset of tokens (slice, index tensor or mask over the N rows)."""
        return TopKSignal(ids=self.ids[rows], logp=self.logp[rows], tail_logp=self.tail_logp[rows])


def shared_vocab(logits: torch.Tensor, vocab_limit: int | None) -> int:
    """Columns to use of ``logits`` [N, V]: all of them, or the first ``min(V, vocab_limit)``.

    ``vocab_limit`` is the other model's output rows, so either head may be the larger one.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor [N, V], got {logits.dtype} {tuple(logits.shape)}"
        )
    if vocab_limit is None:
        return logits.shape[1]
    if isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) or not 0 < vocab_limit:
        raise ValueError(f"vocab_limit must be a positive int or None, got {vocab_limit!r}")
    return min(vocab_limit, logits.shape[1])


class _TopKOfRows(ChunkMath):
    """Top-k of each row's log-probs (stats) and the log of the mass outside them (values)."""

    def __init__(self, k: int):
        self.k = k

    def forward(self, chunk: Chunk):
        logp = chunk.student_logp
        top = torch.topk(logp, self.k, dim=-1, sorted=True)
        # the excluded entries summed directly, not 1 - sum over the top-k: full relative precision for a
        # tiny tail, and exactly -inf when nothing is left
        tail = logsumexp_(logp.scatter_(-1, top.indices, float("-inf")), chunk.new_buffer())
        return tail, (top.indices.to(torch.int32), top.values)


@torch.no_grad()
def teacher_topk_signal(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> TopKSignal:
    """Top-k of ``log_softmax(teacher_logits[:, :V] / T)`` per row, with the log of the remaining mass.

    Args:
        teacher_logits: [N, V_t], any float dtype.
        k: entries kept per token, 1 <= k <= V.
        chunk_size: rows at a time; at most two [chunk_size, V] buffers in the compute dtype exist at once.
        temperature: T, the same one the loss will use (project temperature rule).
        vocab_limit: the student's output rows; the signal covers the shared vocabulary, the first
            ``V = min(V_t, vocab_limit)`` ids (all V_t for None), renormalised there.

    Returns:
        ``TopKSignal`` with ids [N, k] int32, logp [N, k] and tail_logp [N] (float32, float64 for float64
        logits; ``tail_logp = log sum_{v not in top-k} q_v``, -inf when the top-k has all the mass).
    """
    vocab = shared_vocab(teacher_logits, vocab_limit)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int with 1 <= k <= V = {vocab}, got {k!r}")
    tail, (ids, logp) = run_chunked(
        _TopKOfRows(k), teacher_logits.detach(), chunk_size=chunk_size, temperature=temperature, vocab=vocab
    )
    return TopKSignal(ids=ids, logp=logp, tail_logp=tail)


@torch.no_grad()
def teacher_sampled_logp(
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """``log q(token_ids[i])`` at temperature T on the first ``V = min(V_t, vocab_limit)`` columns.

    teacher_logits [N, V_t], token_ids [N] (each < V) -> [N] float32 (float64 for float64 logits).

    The top-k signal cannot answer this for sampled tokens outside the top-k, so it is cached alongside
    (4 bytes per token) for the teacher-NLL / sampled-KL diagnostics.
    """
    vocab = shared_vocab(teacher_logits, vocab_limit)
    return chunked_token_logp(
        teacher_logits.detach(), token_ids, temperature=temperature, chunk_size=chunk_size, vocab=vocab
    )


# ----------------------------------------------------------------------------------------------------
# The cached signal of one micro-batch
# ----------------------------------------------------------------------------------------------------


@dataclass
class CachedSignal:
    """The teacher signal of one micro-batch, on the host."""

    logits: torch.Tensor | None = None
    """'full': ``[sum R_i, V_t]`` bf16 (pinned when a GPU exists)."""

    hidden: torch.Tensor | None = None
    """'hidden': ``[sum R_i, H]`` bf16 final hidden states (pinned when a GPU exists)."""

    head: torch.Tensor | None = None
    """'hidden': the teacher's output head weight ``[V_t, H]`` bf16 on the device, one tensor shared by every
    micro-batch of the update. Not host memory, so not in :meth:`num_bytes`."""

    topk: TopKSignal | None = None
    """'topk': ids ``[sum R_i, k]``, log-probs ``[sum R_i, k]`` and tail ``[sum R_i]``."""

    sampled_logp: torch.Tensor | None = None
    """'topk' and 'sampled': ``[sum R_i]`` teacher log-prob of each sampled token."""

    vocab: int | None = None
    """'topk' and 'sampled': the ids their log-probs are normalised over, ``min(V_t, V_s)``; None for a
    signal built over the student's own rows. The student side renormalises on the same ids."""

    def num_bytes(self) -> int:
        """Host bytes of the signal."""
        parts = [self.logits, self.hidden, self.sampled_logp] + (
            [self.topk.ids, self.topk.logp, self.topk.tail_logp] if self.topk is not None else []
        )
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def num_tokens(self) -> int:
        rows = next(t for t in (self.logits, self.hidden, self.sampled_logp) if t is not None)
        return rows.shape[0]

    def teacher_rows(self) -> TeacherRows | None:
        """The full-vocabulary teacher logits ('full' or 'hidden') for the loss; None for other signals."""
        if self.logits is not None:
            return CachedLogits(self.logits)
        if self.hidden is not None:
            return HiddenTimesHead(self.hidden, self.head)
        return None


def to_host(rows: torch.Tensor) -> torch.Tensor:
    """A bf16 host copy of ``rows`` [n, D], pinned when a GPU exists (the loss copies chunks back async)."""
    pin = torch.cuda.is_available()
    host = torch.empty(rows.shape, dtype=torch.bfloat16, pin_memory=pin)
    return host.copy_(rows, non_blocking=pin)


def signal_from_logits(logits: torch.Tensor, token_ids: torch.Tensor, spec: SignalSpec) -> CachedSignal:
    """The host-side signal ``spec`` asks for, from the teacher's response logits ``[n, V_t]`` on the device
    and the sampled tokens ``[n]`` ('hidden' is cached from hidden states, not from logits)."""
    if spec.kind == SignalKind.FULL:
        return CachedSignal(logits=to_host(logits))
    if spec.kind not in (SignalKind.TOPK, SignalKind.SAMPLED):
        raise ValueError(f"the {spec.kind.value!r} signal is not built from logits")
    rows = logits.shape[-1]
    vocab = rows if spec.vocab_limit is None else min(rows, spec.vocab_limit)
    options = dict(temperature=spec.temperature, chunk_size=spec.chunk_size, vocab_limit=vocab)
    sampled = teacher_sampled_logp(logits, token_ids.to(logits.device), **options).cpu()
    if spec.kind == SignalKind.SAMPLED:
        return CachedSignal(sampled_logp=sampled, vocab=vocab)
    topk = teacher_topk_signal(logits, spec.topk, **options).to("cpu")
    return CachedSignal(topk=topk, sampled_logp=sampled, vocab=vocab)

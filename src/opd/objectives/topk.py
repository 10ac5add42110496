"""Forward KL against a compact teacher signal: the teacher's top-k log-probs plus one tail bucket.

Why: caching the full teacher distribution costs ``2 V`` bytes per token in bf16 (about 300 KB for
V = 151936); the top-k signal (:class:`~opd.objectives.teacher_signal.TopKSignal`) costs ``k * 8 + 4`` bytes.

Notation: ``N`` tokens, shared vocabulary ``V``, temperature ``T`` applied to both sides,
``p = softmax(student_logits / T)``, ``q = softmax(teacher_logits / T)`` over the first ``V`` ids. For the
teacher's top-k id set ``K`` of a token the loss is the forward KL between the two distributions coarsened
to ``K`` plus one "everything else" bucket:

    D = sum_{j in K} q_j (log q_j - log p_j) + q_tail (log q_tail - log p_tail),
    q_tail = 1 - sum_{j in K} q_j,   p_tail = 1 - sum_{j in K} p_j.

The tails are never clamped: they are log-sum-exps over the ids outside ``K`` (exact, and exactly ``-inf``
when ``K`` holds all the mass), and every ``q * log(...)`` term with ``q = 0`` is exactly 0, never 0 * inf.
The teacher's per-id log-probs ``log q_j`` are raised to the teacher floor, as in every objective. With
k = V the tail is empty and D is the full forward KL of the floored teacher. D <= the full forward KL
(coarsening can only lose information), and D = 0 when the student equals the teacher. Padded heads: signal
and loss both use the first ``V = min(V_s, V_t)`` ids, whichever head is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.objectives.engine import (
    Chunk,
    ChunkMath,
    Student,
    compute_dtype,
    entropy_,
    gather_rows,
    logsumexp_,
    run_chunked_weighted,
    student_device,
    student_shape,
)
from opd.objectives.teacher_signal import TEACHER_LOGP_FLOOR, TopKSignal

TOPK_LOSS = "forward_kl_topk"
"""``opd.loss_type`` of :func:`chunked_topk_forward_kl`; its teacher signal is ``TopKSignal``."""


@dataclass
class TopKTokenStats:
    """Per-token diagnostics of the top-k loss, float32, detached, shape [N]."""

    divergence: torch.Tensor
    """The per-token divergence ``D_i`` (top-k + tail forward KL)."""
    student_logp: torch.Tensor
    """``log p_student(token_ids[i])`` at the loss temperature."""
    teacher_topk_mass: torch.Tensor
    """``sum_{j in K} q_j = exp(logsumexp(signal.logp))``: how much of the teacher the signal covers."""
    sampled_in_topk: torch.Tensor
    """1.0 where ``token_ids[i]`` is among the teacher's top-k ids, else 0.0 (float, so it averages)."""
    student_entropy: torch.Tensor
    """Entropy of the student distribution (on the shared vocabulary, at the loss temperature)."""
    teacher_floored: torch.Tensor
    """1.0 where a top-k log-prob of the signal was below ``TEACHER_LOGP_FLOOR`` (raised to it), else 0.0."""


def _xlogx_ratio(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """q (log q - log p) elementwise with exactly 0 where q = 0 (even if log p = -inf); any shape."""
    q = log_q.exp()
    return q * torch.where(q > 0, log_q - log_p, 0.0)


class _TopKForwardKL(ChunkMath):
    """D per token from the student's chunk and the signal's rows; two [c, V] buffers in either pass."""

    def __init__(self, signal: TopKSignal, token_ids: torch.Tensor, dtype: torch.dtype):
        self.signal, self.token_ids, self.dtype = signal, token_ids, dtype

    def _signal_rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk's top-k ids (long), floored top-k log-probs and tail log-prob, in the compute dtype."""
        signal = self.signal
        top_logp = signal.logp[rows].to(self.dtype).clamp(min=TEACHER_LOGP_FLOOR)
        return signal.ids[rows].long(), top_logp, signal.tail_logp[rows].to(self.dtype)

    def forward(self, chunk: Chunk):
        logp = chunk.student_logp
        ids, top_logp, tail_logp = self._signal_rows(chunk.rows)
        scratch = chunk.new_buffer()
        entropy = entropy_(logp, scratch)
        sampled = gather_rows(logp, self.token_ids[chunk.rows])
        log_p_top = logp.gather(-1, ids)
        # the ids outside K summed directly; consumes logp, which is not needed after this
        log_p_tail = logsumexp_(logp.scatter_(-1, ids, float("-inf")), scratch)
        divergence = _xlogx_ratio(top_logp, log_p_top).sum(dim=-1) + _xlogx_ratio(tail_logp, log_p_tail)
        return divergence, (sampled.to(torch.float32), entropy.to(torch.float32))

    def backward(self, chunk: Chunk) -> torch.Tensor:
        """Closed form, for z = logits / T and Q = sum_{j in K} q_j + q_tail (1 up to rounding):
            dD/dz_v = Q p_v - t_v,  t_v = q_v for v in K,  t_v = q_tail p_v / p_tail for v not in K,
        i.e. the teacher's top-k probabilities with its tail mass spread like the student's tail.
        """
        logp = chunk.student_logp
        ids, top_logp, tail_logp = self._signal_rows(chunk.rows)
        q_top = top_logp.exp()
        # target: the student's tail probabilities outside K, scaled to the teacher's tail mass; q inside K
        target = chunk.new_buffer().copy_(logp).scatter_(-1, ids, float("-inf"))
        peak = target.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        unscaled_tail = target.sub_(peak).exp_()  # p_v / exp(peak) outside K, 0 inside
        total = unscaled_tail.sum(dim=-1, keepdim=True)
        # q_tail / (p_tail / exp(peak)); exactly 0 where q_tail = 0 (and for an empty tail, total = 0)
        scale = torch.where(total > 0, tail_logp.exp().unsqueeze(-1) / total, 0.0)
        target.mul_(scale).scatter_(-1, ids, q_top)
        mass = q_top.sum(dim=-1) + tail_logp.exp()
        return logp.exp_().mul_(mass.unsqueeze(-1)).sub_(target)


def _check_topk_tensors(student: Student, signal: TopKSignal, token_ids, token_weights, vocab: int) -> None:
    """Raise ValueError on shape / dtype / device mismatches; shapes as in ``chunked_topk_forward_kl``."""
    n, _ = student_shape(student)
    device = student_device(student)
    k = signal.ids.shape[-1] if signal.ids.dim() == 2 else -1
    for name, t, shape in (
        ("signal.ids", signal.ids, (n, k)),
        ("signal.logp", signal.logp, (n, k)),
        ("signal.tail_logp", signal.tail_logp, (n,)),
        ("token_ids", token_ids, (n,)),
        ("token_weights", token_weights, (n,)),
    ):
        if tuple(t.shape) != shape or k < 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} (N={n} from the student)")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the student on {device}")
    if k > vocab:
        raise ValueError(f"signal has k={k} entries per token, more than the shared vocabulary V={vocab}")
    for name, t in (("signal.ids", signal.ids), ("token_ids", token_ids)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (
        ("signal.logp", signal.logp),
        ("signal.tail_logp", signal.tail_logp),
        ("token_weights", token_weights),
    ):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _student_vocab(student: Student, vocab_limit: int | None) -> int:
    columns = student_shape(student)[1]
    if vocab_limit is None:
        return columns
    if isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) or not 0 < vocab_limit:
        raise ValueError(f"vocab_limit must be a positive int or None, got {vocab_limit!r}")
    return min(columns, vocab_limit)


def chunked_topk_forward_kl(
    student: Student,
    signal: TopKSignal,
    token_ids: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> tuple[torch.Tensor, TopKTokenStats]:
    """Weighted sum of per-token top-k + tail forward KLs, memory-bounded in forward and backward.

    ``loss = sum_i w_i D_i`` with ``D_i = sum_{j in K_i} q_j (log q_j - log p_j) + q_tail (log q_tail -
    log p_tail)`` (module docstring); ``p`` is ``softmax(student_logits[:, :V] / T)``.

    Args:
        student: logits [N, V_s] (any float dtype, usually requiring grad) or an ``OutputHead``.
        signal: the teacher's ``TopKSignal`` for the same N tokens, built by ``teacher_topk_signal`` with
            the SAME temperature and the same shared vocabulary V. Its log-probs are floored here.
        token_ids: [N] integer, the sampled tokens (stats only), each < V.
        token_weights: [N] float, 0 where masked (mask, reward weights and normaliser folded in, as for
            ``chunked_distill_loss``); a weight-0 row contributes exactly 0 even if its signal is garbage.
        chunk_size: rows per chunk; at most two [chunk_size, V] float32 buffers exist at once.
        temperature: T, applied to the student here; the signal must already be at the same T.
        vocab_limit: the ids the signal covers; the loss uses ``V = min(V_s, vocab_limit)`` (all V_s for
            None), which must be the signal's V (its ids are < V and its tail is the mass of the rest of V).
            Student columns >= V get zero gradient.

    Returns:
        ``loss`` as a 0-dim float32 tensor (float64 for float64 student rows) and ``TopKTokenStats`` of
        float32 [N] tensors, detached.
    """
    vocab = _student_vocab(student, vocab_limit)
    _check_topk_tensors(student, signal, token_ids, token_weights, vocab)
    math_ = _TopKForwardKL(signal, token_ids, compute_dtype(student))
    loss, values, (sampled, entropy) = run_chunked_weighted(
        math_, student, token_weights, chunk_size=chunk_size, temperature=temperature, vocab=vocab
    )
    # Signal-only stats: [N, k] work, no student rows involved, so no chunking needed.
    with torch.no_grad():
        mass = torch.logsumexp(signal.logp.float(), dim=-1).exp()
        in_topk = (signal.ids == token_ids.to(signal.ids.dtype).unsqueeze(-1)).any(dim=-1).float()
        floored = (signal.logp.amin(dim=-1) < TEACHER_LOGP_FLOOR).float()
    stats = TopKTokenStats(
        divergence=values.to(torch.float32),
        student_logp=sampled,
        teacher_topk_mass=mass,
        sampled_in_topk=in_topk,
        student_entropy=entropy,
        teacher_floored=floored,
    )
    return loss, stats

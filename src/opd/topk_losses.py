"""Forward KL against a compact teacher signal: the teacher's top-k log-probs plus one tail bucket.

Why: caching the full teacher distribution costs ``2 V`` bytes per token in bf16 (about 300 KB for
V = 151936); the top-k signal costs ``k * 8 + 4`` bytes (int32 id + fp32 log-prob per entry, one fp32 tail).

Notation as in :mod:`opd.losses`: ``N`` tokens, shared vocabulary ``V``, temperature ``T`` applied to both
sides, ``p = softmax(student_logits / T)``, ``q = softmax(teacher_logits / T)`` over the first ``V`` ids.
For the teacher's top-k id set ``K`` of a token the loss is the forward KL between the two distributions
coarsened to ``K`` plus one "everything else" bucket:

    D = sum_{j in K} q_j (log q_j - log p_j) + q_tail (log q_tail - log p_tail),
    q_tail = 1 - sum_{j in K} q_j,   p_tail = 1 - sum_{j in K} p_j.

The tails are never clamped: they are log-sum-exps over the ids outside ``K`` (exact, and exactly ``-inf``
when ``K`` holds all the mass), and every ``q * log(...)`` term with ``q = 0`` is exactly 0, never 0 * inf.
The teacher's per-id log-probs ``log q_j`` follow the teacher floor of :mod:`opd.losses` (raised to
``TEACHER_LOGP_FLOOR``, as in every objective). With k = V the tail is empty and D is the full forward KL of
the floored teacher. D <= the full forward KL (coarsening can only lose information), and D = 0 when the
student equals the teacher. Padded heads follow the vocabulary rule of :mod:`opd.losses`: signal and loss
both use the first ``V = min(V_s, V_t)`` ids, whichever head is larger.

Memory: :func:`chunked_topk_forward_kl` is a custom ``torch.autograd.Function`` with the same discipline as
``chunked_distill_loss``: forward and backward walk ``chunk_size`` rows at a time, backward recomputes the
chunk's log-softmax, and only one chunk's ``[chunk_size, V]`` fp32 intermediates are alive. Counted with
``benchmarks/memtrack.py`` that is about 4 such buffers in forward and 2 in backward beyond the student
gradient, plus the internal scratch of ``torch.logsumexp`` (one more buffer, invisible to that tracker).
Only the inputs and the ``[N, k]`` signal are saved for backward. :func:`teacher_topk_signal` likewise holds
one chunk's log-probs at a time, never a full ``[N, V]`` fp32 block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.losses import (
    TEACHER_LOGP_FLOOR,
    _check_chunk_and_temperature,
    _entropy,
    _log_probs,
    _masked_weighted_sum,
)

TOPK_LOSS = "forward_kl_topk"
"""``opd.loss_type`` of :func:`chunked_topk_forward_kl`; its teacher signal is :class:`TopKSignal`."""

# ----------------------------------------------------------------------------------------------------
# Teacher signal
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


def _shared_vocab(logits: torch.Tensor, vocab_limit: int | None) -> int:
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


def _signal_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits (exact tests), like the losses' compute dtype."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _logsumexp_outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{v not in ids} exp(logp_v) per row, overwriting ``logp``; logp [c, V], ids [c, k] -> [c].

    Summing the excluded entries directly (rather than 1 - sum over ``ids``) keeps full relative precision
    for tiny tails and gives exactly -inf when nothing is left, which is what lets q_tail = 0 be detected.
    """
    return torch.logsumexp(logp.scatter_(-1, ids, float("-inf")), dim=-1)


@torch.no_grad()
def teacher_topk_signal(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> TopKSignal:
    """Top-k of ``log_softmax(teacher_logits[:, :V] / T)`` per row, with the log of the remaining mass.

    Args:
        teacher_logits: [N, V_t], any float dtype.
        k: entries kept per token, 1 <= k <= V.
        temperature: T, the same one the loss will use (project temperature rule).
        chunk_size: rows upcast at a time; only a few [chunk_size, V] fp32 buffers exist at once.
        vocab_limit: the student's output rows; the signal covers the shared vocabulary, the first
            ``V = min(V_t, vocab_limit)`` ids (all V_t for None). Later columns are ignored entirely, i.e. the
            distribution is renormalised on the first V ids.

    Returns:
        ``TopKSignal`` with ids [N, k] int32, logp [N, k] and tail_logp [N]
        (``tail_logp = log sum_{v not in top-k} q_v = log(1 - sum_j q_j)``, -inf when the top-k has all mass).
    """
    _check_chunk_and_temperature(chunk_size, float(temperature))
    vocab = _shared_vocab(teacher_logits, vocab_limit)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int with 1 <= k <= V = {vocab}, got {k!r}")
    n, device, dtype = teacher_logits.shape[0], teacher_logits.device, _signal_dtype(teacher_logits)
    ids = torch.empty(n, k, dtype=torch.int32, device=device)
    logp = torch.empty(n, k, dtype=dtype, device=device)
    tail = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        chunk_logp = _log_probs(teacher_logits[sl, :vocab], float(temperature), dtype)
        top = torch.topk(chunk_logp, k, dim=-1, sorted=True)
        logp[sl] = top.values
        ids[sl] = top.indices.to(torch.int32)
        tail[sl] = _logsumexp_outside(chunk_logp, top.indices)
        del chunk_logp, top  # free this chunk's [c, V] before the next one is built
    return TopKSignal(ids=ids, logp=logp, tail_logp=tail)


@torch.no_grad()
def teacher_sampled_logp(
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """``log q(token_ids[i])`` at temperature T on the first ``V = min(V_t, vocab_limit)`` columns.

    teacher_logits [N, V_t], token_ids [N] (each < V) -> [N] float32.

    The top-k signal cannot answer this for sampled tokens outside the top-k, so it is cached alongside
    (4 bytes per token) for the teacher-NLL / sampled-KL diagnostics. Float64 for float64 logits.
    """
    _check_chunk_and_temperature(chunk_size, float(temperature))
    vocab = _shared_vocab(teacher_logits, vocab_limit)
    n = teacher_logits.shape[0]
    if tuple(token_ids.shape) != (n,):
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected ({n},)")
    out = torch.empty(n, dtype=_signal_dtype(teacher_logits), device=teacher_logits.device)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        chunk_logp = _log_probs(teacher_logits[sl, :vocab], float(temperature), out.dtype)
        out[sl] = chunk_logp.gather(-1, token_ids[sl].long().unsqueeze(-1)).squeeze(-1)
        del chunk_logp
    return out


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------


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


@dataclass
class _TopKSetup:
    """Non-tensor configuration shared by forward and backward."""

    chunk_size: int
    temperature: float
    vocab: int
    dtype: torch.dtype


def _xlogx_ratio(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """q (log q - log p) elementwise with exactly 0 where q = 0 (even if log p = -inf); any shape."""
    q = log_q.exp()
    return q * torch.where(q > 0, log_q - log_p, 0.0)


def _topk_divergence(
    top_logp: torch.Tensor, log_p_top: torch.Tensor, tail_logp: torch.Tensor, log_p_tail: torch.Tensor
) -> torch.Tensor:
    """D per row from the teacher's and the student's top-k / tail log-probs; [c, k] x2, [c] x2 -> [c]."""
    return _xlogx_ratio(top_logp, log_p_top).sum(dim=-1) + _xlogx_ratio(tail_logp, log_p_tail)


def _floored(top_logp: torch.Tensor, setup: _TopKSetup) -> torch.Tensor:
    """The signal's top-k log-probs in the compute dtype, raised to the teacher floor; [c, k] -> [c, k]."""
    return top_logp.to(setup.dtype).clamp(min=TEACHER_LOGP_FLOOR)


@torch.no_grad()
def _topk_forward_chunk(student, ids, top_logp, tail_logp, token_ids, weights, setup: _TopKSetup):
    """Partial loss and [c] stats of one chunk; student [c, V_s], ids / top_logp [c, k], others [c].

    A function of its own so the chunk's [c, V] buffers are freed on return.
    """
    logp = _log_probs(student[:, : setup.vocab], setup.temperature, setup.dtype)
    entropy = _entropy(logp)
    sampled = logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    ids = ids.long()
    log_p_top = logp.gather(-1, ids)
    log_p_tail = _logsumexp_outside(logp, ids)  # consumes logp: it is not needed after this
    div = _topk_divergence(_floored(top_logp, setup), log_p_top, tail_logp.to(setup.dtype), log_p_tail)
    return _masked_weighted_sum(div, weights), div, sampled, entropy


@torch.no_grad()
def _topk_backward_chunk(student, ids, top_logp, tail_logp, weights, grad_out, setup: _TopKSetup):
    """grad_out * d(sum_i w_i D_i)/d(student[:, :V]) for one chunk; student [c, V_s] -> [c, V] fp32.

    Closed form, for z = logits / T and Q = sum_{j in K} q_j + q_tail (1 up to rounding):
        dD/dz_v = Q p_v - t_v,  t_v = q_v for v in K,  t_v = q_tail p_v / p_tail for v not in K,
    i.e. the teacher's top-k probabilities with its tail mass spread like the student's tail. t outside K is
    exp(log p_v - log p_tail + log q_tail): ratios in the log domain, exactly 0 where q_tail = 0.
    """
    dtype = setup.dtype
    logp = _log_probs(student[:, : setup.vocab], setup.temperature, dtype)
    ids = ids.long()
    q_top = _floored(top_logp, setup).exp()
    tail_logp = tail_logp.to(dtype)
    # target starts as the student's log-probs with K at -inf, so exp() leaves K at 0 for the scatter below.
    target = logp.scatter(-1, ids, float("-inf"))
    log_p_tail = torch.logsumexp(target, dim=-1)
    # -inf shift where q_tail = 0 (also covers an empty tail, where log_p_tail = -inf would give nan).
    shift = torch.where(tail_logp > float("-inf"), tail_logp - log_p_tail, float("-inf"))
    target.add_(shift.unsqueeze(-1)).exp_().scatter_(-1, ids, q_top)
    mass = q_top.sum(dim=-1) + tail_logp.exp()
    grad = logp.exp_().mul_(mass.unsqueeze(-1)).sub_(target)
    del target
    # Chain rule through z = logits / T and the weighted sum, as one row scale.
    grad.mul_((weights.to(dtype) * (grad_out.to(dtype) / setup.temperature)).unsqueeze(-1))
    # Masked rows may hold garbage (nan / inf) signal; rows are independent, so zero them exactly.
    return grad.masked_fill_((weights == 0).unsqueeze(-1), 0.0)


class _ChunkedTopKForwardKL(torch.autograd.Function):
    """Chunked top-k forward KL with recompute-in-backward; see the module docstring."""

    @staticmethod
    def forward(ctx, student_logits, ids, top_logp, tail_logp, token_ids, token_weights, setup: _TopKSetup):
        """student [N, V_s], ids / top_logp [N, k], tail_logp / token_ids / weights [N] -> loss, 3 stats."""
        n, device = student_logits.shape[0], student_logits.device
        loss = torch.zeros((), dtype=setup.dtype, device=device)
        stats = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(3)]
        for start in range(0, n, setup.chunk_size):
            sl = slice(start, start + setup.chunk_size)
            part, *chunk_stats = _topk_forward_chunk(
                student_logits[sl],
                ids[sl],
                top_logp[sl],
                tail_logp[sl],
                token_ids[sl],
                token_weights[sl],
                setup,
            )
            loss += part
            for dst, src in zip(stats, chunk_stats, strict=True):
                dst[sl] = src
        ctx.save_for_backward(student_logits, ids, top_logp, tail_logp, token_weights)
        ctx.setup = setup
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stat_grads):
        """grad_loss scalar -> grad for student [N, V_s] in its own dtype; None for every other input."""
        nones = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        student_logits, ids, top_logp, tail_logp, token_weights = ctx.saved_tensors
        setup: _TopKSetup = ctx.setup
        # Columns >= V (vocab padding) and the rows of skipped chunks stay exactly zero.
        grad = torch.zeros_like(student_logits)
        for start in range(0, student_logits.shape[0], setup.chunk_size):
            sl = slice(start, start + setup.chunk_size)
            weights = token_weights[sl]
            if not bool((weights != 0).any()):  # one device sync per chunk, as in chunked_distill_loss
                continue
            grad[sl, : setup.vocab].copy_(
                _topk_backward_chunk(
                    student_logits[sl], ids[sl], top_logp[sl], tail_logp[sl], weights, grad_loss, setup
                )
            )
        return (grad, *nones)


def _check_topk_tensors(student_logits, signal: TopKSignal, token_ids, token_weights, vocab: int) -> None:
    """Raise ValueError on shape / dtype / device mismatches; shapes as in ``chunked_topk_forward_kl``."""
    n = student_logits.shape[0]
    k = signal.ids.shape[-1] if signal.ids.dim() == 2 else -1
    for name, t, shape in (
        ("signal.ids", signal.ids, (n, k)),
        ("signal.logp", signal.logp, (n, k)),
        ("signal.tail_logp", signal.tail_logp, (n,)),
        ("token_ids", token_ids, (n,)),
        ("token_weights", token_weights, (n,)),
    ):
        if tuple(t.shape) != shape or k < 1:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {shape} (N={n} from student_logits)"
            )
        if t.device != student_logits.device:
            raise ValueError(f"{name} is on {t.device}, student_logits on {student_logits.device}")
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


def chunked_topk_forward_kl(
    student_logits: torch.Tensor,
    signal: TopKSignal,
    token_ids: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> tuple[torch.Tensor, TopKTokenStats]:
    """Weighted sum of per-token top-k + tail forward KLs, memory-bounded in forward and backward.

    ``loss = sum_i w_i D_i`` with ``D_i = sum_{j in K_i} q_j (log q_j - log p_j) + q_tail (log q_tail -
    log p_tail)`` (module docstring); ``p`` is ``softmax(student_logits[:, :V] / T)``.

    Args:
        student_logits: [N, V_s], any float dtype, usually requires grad.
        signal: the teacher's ``TopKSignal`` for the same N tokens, built by :func:`teacher_topk_signal` with
            the SAME temperature and the same shared vocabulary V. Its log-probs are floored here.
        token_ids: [N] integer, the sampled tokens (stats only), each < V.
        token_weights: [N] float, 0 where masked (mask, reward weights and normaliser folded in, as for
            ``chunked_distill_loss``); a weight-0 row contributes exactly 0 even if its signal is garbage.
        chunk_size: rows processed at a time; peak extra memory is a few [chunk_size, V] fp32 buffers.
        temperature: T, applied to the student here; the signal must already be at the same T.
        vocab_limit: the ids the signal covers; the loss uses ``V = min(V_s, vocab_limit)`` (all V_s for
            None), which must be the signal's V (its ids are < V and its tail is the mass of the rest of V).
            Student columns >= V get zero gradient.

    Returns:
        ``loss`` as a 0-dim float32 tensor (float64 for float64 student logits) and ``TopKTokenStats`` of
        float32 [N] tensors, detached.
    """
    _check_chunk_and_temperature(chunk_size, float(temperature))
    vocab = _shared_vocab(student_logits, vocab_limit)
    _check_topk_tensors(student_logits, signal, token_ids, token_weights, vocab)
    setup = _TopKSetup(
        chunk_size=chunk_size,
        temperature=float(temperature),
        vocab=vocab,
        dtype=_signal_dtype(student_logits),
    )
    loss, div, sampled, entropy = _ChunkedTopKForwardKL.apply(
        student_logits, signal.ids, signal.logp, signal.tail_logp, token_ids, token_weights, setup
    )
    # Signal-only stats: [N, k] work, no student logits involved, so no chunking needed.
    with torch.no_grad():
        mass = torch.logsumexp(signal.logp.float(), dim=-1).exp()
        in_topk = (signal.ids == token_ids.to(signal.ids.dtype).unsqueeze(-1)).any(dim=-1).float()
        floored = (signal.logp.amin(dim=-1) < TEACHER_LOGP_FLOOR).float()
    stats = TopKTokenStats(
        divergence=div,
        student_logp=sampled,
        teacher_topk_mass=mass,
        sampled_in_topk=in_topk,
        student_entropy=entropy,
        teacher_floored=floored,
    )
    return loss, stats

"""Exact full-vocabulary divergences between student and teacher, and their registry.

Notation: ``N`` tokens, ``V = min(V_s, V_t)`` shared ids, ``p = softmax(z)`` with ``z = student_logits / T``
and ``q = softmax(teacher_logits / T)`` over those ids, the teacher floored (see ``teacher_signal``).

Each divergence is registered with up to three functions of one chunk's log-probs ``[c, V]``:

- ``fn``, its definition: pure and differentiable, used by autograd for a loss without ``logit_grad`` and as
  the readable reference (``get_loss``);
- ``value``, the same number computed in place for the forward pass, overwriting its inputs;
- ``logit_grad``, the closed-form ``d d_i / d z``, in place too.

With ``value`` and ``logit_grad`` a divergence also states ``buffers``: the ``[c, V]`` buffers they hold at
once, both inputs included, which is what keeps the chunk engine's passes within two ``[chunk_size, V]``
buffers. Every row dot product below multiplies into one operand it no longer needs and sums that, so no
product temporary exists.

NaN safety: for finite student logits and the floored teacher, every weighted token's divergence and
gradient are finite (``p = 0`` times a finite log-ratio is 0); a token with weight 0 contributes exactly 0 to
the loss and the gradient even if its teacher row is garbage (``nan``), which the engine guarantees.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from opd.objectives.engine import (
    Chunk,
    ChunkMath,
    Student,
    entropy_,
    gather_rows,
    params_for,
    run_chunked_weighted,
    student_device,
    student_shape,
)
from opd.objectives.teacher_signal import CachedLogits, TeacherRows, teacher_log_probs_

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One registered divergence; see the module docstring."""

    fn: LossFn
    """(student_logp [c, V], teacher_logp [c, V], **params) -> [c]; pure, differentiable."""
    value: LossFn | None = None
    """Same arguments and result, computed in place (may overwrite both inputs); no autograd."""
    logit_grad: LossFn | None = None
    """Same arguments -> ``d d_i / d z`` [c, V]; may overwrite both inputs and return one of them."""
    check_params: Callable[..., None] | None = None
    """Receives the keyword params it names, once per call; raises ValueError naming a bad one."""
    buffers: int | None = None
    """[c, V] buffers ``value`` and ``logit_grad`` hold at once, inputs included (None: not bounded)."""


LOSS_REGISTRY: dict[str, Divergence] = {}
"""name -> :class:`Divergence`; the full-vocabulary values of ``opd.loss_type``."""


def register_loss(
    name: str,
    *,
    value: LossFn | None = None,
    logit_grad: LossFn | None = None,
    check_params: Callable[..., None] | None = None,
    buffers: int | None = None,
) -> Callable[[LossFn], LossFn]:
    """Decorator adding the divergence ``fn`` to ``LOSS_REGISTRY`` under ``name``.

    ``fn`` receives ``student_logp`` and ``teacher_logp`` [c, V] (log-probs, fp32; fp64 for fp64 inputs)
    plus the keyword params it names in its signature (``beta`` and any key of ``loss_params``; a
    ``**kwargs`` function gets all of them) and returns the per-token divergence [c]. It must be
    differentiable in ``student_logp``, must not modify its inputs and must not produce NaN for floored
    teacher entries. Without ``value`` the forward pass calls ``fn``; without ``logit_grad`` backward
    differentiates ``fn`` by autograd on each recomputed chunk. Only with both (and ``buffers``) is the
    loss's memory bounded by the engine's two ``[chunk_size, V]`` buffers.
    """

    def decorator(fn: LossFn) -> LossFn:
        # Silent replacement would change a running config's meaning, so names are write-once.
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        bounded = value is not None and logit_grad is not None
        LOSS_REGISTRY[name] = Divergence(fn, value, logit_grad, check_params, buffers if bounded else None)
        return fn

    return decorator


def get_loss(name: str) -> LossFn:
    """The registered divergence ``fn`` called ``name``; ValueError listing the valid names otherwise."""
    return get_divergence(name).fn


def get_divergence(name: str) -> Divergence:
    """The registered :class:`Divergence` called ``name``; ValueError listing the valid names otherwise."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(LOSS_REGISTRY))
        raise ValueError(f"unknown loss_type {name!r}; valid loss types: {valid}") from None


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a (log a - log b) per row; log_a, log_b [c, V] -> [c], differentiable.

    Entries with a == 0 contribute 0 even where log_b = -inf. The difference is zeroed (not the product)
    there, so the backward pass multiplies finite numbers only and never sees 0 * inf.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(dim=-1)


def _kl_grad_(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``p (r - sum_v p_v r_v)``, the softmax Jacobian applied to partials ``r`` (+ a constant, which it
    cancels), written into ``r``; [c, V] x2 -> r. ``p`` and ``r`` finite."""
    total = r.mul_(p).sum(dim=-1, keepdim=True)
    return r.addcmul_(p, total, value=-1.0)


def _log_or_neg_inf(x: float) -> float:
    """log(x) with log(0) = -inf, so that a weight of 0 drops its share of a mixture exactly."""
    return math.log(x) if x > 0 else -math.inf


def _logaddexp_const_(x: torch.Tensor, constant: float) -> torch.Tensor:
    """``x <- logaddexp(x, constant)`` in place; [c, V] -> x."""
    return torch.logaddexp(x, torch.tensor(constant, dtype=x.dtype, device=x.device), out=x)


# ----------------------------------------------------------------------------------------------------
# reverse KL, forward KL
# ----------------------------------------------------------------------------------------------------


def _reverse_kl_value(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = teacher_logp.sub_(student_logp)  # log q - log p
    return log_ratio.mul_(student_logp.exp_()).sum(dim=-1).neg_()


def _reverse_kl_logit_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """d KL(p || q) / dz = p (log p - log q - KL)."""
    r = teacher_logp.sub_(student_logp).neg_()
    return _kl_grad_(student_logp.exp_(), r)


@register_loss("reverse_kl", value=_reverse_kl_value, logit_grad=_reverse_kl_logit_grad, buffers=2)
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q), mode-seeking; student_logp, teacher_logp [c, V] -> [c]."""
    return _kl(student_logp, teacher_logp)


def _forward_kl_value(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = student_logp.sub_(teacher_logp).neg_()  # log q - log p
    return log_ratio.mul_(teacher_logp.exp_()).sum(dim=-1)


def _forward_kl_logit_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """d KL(q || p) / dz = p - q (q sums to 1 on the shared vocab)."""
    return student_logp.exp_().sub_(teacher_logp.exp_())


@register_loss("forward_kl", value=_forward_kl_value, logit_grad=_forward_kl_logit_grad, buffers=2)
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p), mass-covering; student_logp, teacher_logp [c, V] -> [c]."""
    return _kl(teacher_logp, student_logp)


# ----------------------------------------------------------------------------------------------------
# JSD: with D = log p - log q and m = beta q + (1 - beta) p, both KLs are functions of D:
#   log(m / q) = logaddexp(log beta, log(1 - beta) + D),  log(p / m) = -logaddexp(log(1 - beta), log beta - D)
# ----------------------------------------------------------------------------------------------------


def _jsd_value(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """JSD = (1 - beta) sum p D - sum m log(m / q): three buffers (p, D and m)."""
    mix = torch.exp(teacher_logp).mul_(beta)
    d = teacher_logp.sub_(student_logp).neg_()
    p = student_logp.exp_()
    mix.add_(p, alpha=1.0 - beta)
    p_d = p.mul_(d).sum(dim=-1)
    log_m_over_q = _logaddexp_const_(d.add_(math.log1p(-beta)), math.log(beta))
    return p_d.mul_(1.0 - beta).sub_(log_m_over_q.mul_(mix).sum(dim=-1))


def _jsd_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """d JSD / dz = (1 - beta) p (log(p / m) - KL(p || m)).

    The terms from m's own dependence on p cancel (they sum to -(1 - beta)), leaving the reverse-KL shape
    with m in place of q.
    """
    minus_d = teacher_logp.sub_(student_logp).add_(math.log(beta))  # log beta - D
    log_p_over_m = _logaddexp_const_(minus_d, math.log1p(-beta)).neg_()
    return _kl_grad_(student_logp.exp_(), log_p_over_m).mul_(1.0 - beta)


@register_loss("jsd", value=_jsd_value, logit_grad=_jsd_logit_grad, buffers=3)
def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD with m = beta q + (1 - beta) p; [c, V] x2 -> [c].

    JSD = beta KL(q || m) + (1 - beta) KL(p || m). log m is a logaddexp of the two log-probs so it stays exact
    when either distribution underflows, and m > 0 wherever p > 0, keeping the value finite.
    """
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


# ----------------------------------------------------------------------------------------------------
# Skew KL (DistiLLM, Ko et al. 2024): KL against a mixture that keeps a share alpha of the first argument,
# m = alpha a + (1 - alpha) b >= alpha a. The divergence stays finite where b = 0 (for alpha > 0) and the
# gradient is bounded, which is the point of the skew; alpha = 0 gives the plain KL back exactly.
# ----------------------------------------------------------------------------------------------------

SKEW_ALPHA_DEFAULT = 0.1


def _check_alpha(alpha: float = SKEW_ALPHA_DEFAULT) -> None:
    """Raise ValueError unless ``0 <= alpha < 1``; alpha = 1 would make the mixture equal to ``a``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be a number with 0 <= alpha < 1, got {alpha!r}")


def _skew_log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log m for m = alpha a + (1 - alpha) b, as a logaddexp of log-probs; [c, V] x2 -> [c, V]."""
    return torch.logaddexp(log_a + _log_or_neg_inf(alpha), log_b + math.log1p(-alpha))


def _skew_log_ratio_(
    log_a: torch.Tensor, log_b: torch.Tensor, alpha: float, out: torch.Tensor
) -> torch.Tensor:
    """log(a / m) for m = alpha a + (1 - alpha) b, written into ``out`` (one of the inputs); -> [c, V].

    m / a = alpha + (1 - alpha) b / a, so log(a / m) = -logaddexp(log alpha, log(1 - alpha) + log b - log a).
    Only a ratio of the two distributions appears, so there is no tiny * huge product.
    """
    x = torch.sub(log_b, log_a, out=out).add_(math.log1p(-alpha))
    return _logaddexp_const_(x, _log_or_neg_inf(alpha)).neg_()


def _skew_kl_value(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    log_q_over_m = _skew_log_ratio_(teacher_logp, student_logp, alpha, out=student_logp)
    return log_q_over_m.mul_(teacher_logp.exp_()).sum(dim=-1)


def _skew_kl_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """d KL(q || m) / dz for m = alpha q + (1 - alpha) p.

    dD/dp_v = -(1 - alpha) q_v / m_v; through the softmax Jacobian: (1 - alpha) (p S - u) with
    u = p q / m and S = sum_v u_v. u = exp(log p + log(q / m)) is exactly 0 where q = 0 (log(q / m) = -inf
    there), and for alpha = 0 it is q, giving the forward-KL gradient p - q.
    """
    log_u = _skew_log_ratio_(teacher_logp, student_logp, alpha, out=teacher_logp).add_(student_logp)
    u = log_u.exp_()
    total = u.sum(dim=-1, keepdim=True)
    return student_logp.exp_().mul_(total).sub_(u).mul_(1.0 - alpha)


def _skew_reverse_kl_value(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    log_p_over_m = _skew_log_ratio_(student_logp, teacher_logp, alpha, out=teacher_logp)
    return log_p_over_m.mul_(student_logp.exp_()).sum(dim=-1)


def _skew_reverse_kl_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """d KL(p || m) / dz for m = alpha p + (1 - alpha) q: three buffers (p, h and exp(h)).

    dD/dp_v = h_v + 1 - alpha p_v / m_v with h = log(p / m); through the softmax Jacobian (the constant
    cancels): p (g - sum_v p_v g_v) with g = h - alpha exp(h). For alpha = 0 this is the reverse-KL gradient.
    """
    h = _skew_log_ratio_(student_logp, teacher_logp, alpha, out=teacher_logp)
    if alpha > 0:  # skipped at alpha = 0, where exp(h) = p / q overflows for a tiny q and 0 * inf is nan
        h.sub_(torch.exp(h).mul_(alpha))
    return _kl_grad_(student_logp.exp_(), h)


@register_loss(
    "skew_kl", value=_skew_kl_value, logit_grad=_skew_kl_logit_grad, check_params=_check_alpha, buffers=2
)
def skew_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """Skew forward KL, KL(q || alpha q + (1 - alpha) p), 0 <= alpha < 1; [c, V] x2 -> [c].

    = sum_v q_v (log q_v - log(alpha q_v + (1 - alpha) p_v)). Mass-covering like forward KL (alpha = 0),
    but bounded by -log(alpha) since m >= alpha q. ``alpha`` comes from ``loss_params``.
    """
    return _kl(teacher_logp, _skew_log_mix(teacher_logp, student_logp, alpha))


@register_loss(
    "skew_reverse_kl",
    value=_skew_reverse_kl_value,
    logit_grad=_skew_reverse_kl_logit_grad,
    check_params=_check_alpha,
    buffers=3,
)
def skew_reverse_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """Skew reverse KL, KL(p || alpha p + (1 - alpha) q), 0 <= alpha < 1; [c, V] x2 -> [c].

    = sum_v p_v (log p_v - log(alpha p_v + (1 - alpha) q_v)). Mode-seeking like reverse KL (alpha = 0), but
    finite where the teacher gives zero probability (bounded by -log(alpha)). ``alpha`` from ``loss_params``.
    """
    return _kl(student_logp, _skew_log_mix(student_logp, teacher_logp, alpha))


# ----------------------------------------------------------------------------------------------------
# PACED: forward KL, then reverse KL
# ----------------------------------------------------------------------------------------------------


def _check_reverse_weight(reverse_weight: float = 0.0) -> None:
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"reverse_weight must be in [0, 1], got {reverse_weight}")


def _forward_then_reverse_kl_value(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, reverse_weight: float = 0.0
) -> torch.Tensor:
    """sum_v ((1 - w) q_v - w p_v) (log q_v - log p_v): three buffers (q, p and the log-ratio)."""
    coefficient = torch.exp(teacher_logp).mul_(1.0 - reverse_weight)
    log_ratio = teacher_logp.sub_(student_logp)
    coefficient.sub_(student_logp.exp_(), alpha=reverse_weight)
    return log_ratio.mul_(coefficient).sum(dim=-1)


def _forward_then_reverse_kl_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, reverse_weight: float = 0.0
) -> torch.Tensor:
    """(1 - w) (p - q) + w p (log p - log q - KL(p || q)): three buffers (q, p and the log-ratio)."""
    q = torch.exp(teacher_logp)
    log_ratio = teacher_logp.sub_(student_logp).neg_()  # log p - log q
    p = student_logp.exp_()
    grad = _kl_grad_(p, log_ratio).mul_(reverse_weight)
    return grad.add_(p, alpha=1.0 - reverse_weight).sub_(q, alpha=1.0 - reverse_weight)


@register_loss(
    "forward_then_reverse_kl",
    value=_forward_then_reverse_kl_value,
    logit_grad=_forward_then_reverse_kl_logit_grad,
    check_params=_check_reverse_weight,
    buffers=3,
)
def forward_then_reverse_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, reverse_weight: float = 0.0
) -> torch.Tensor:
    """PACED's two-stage objective ``(1 - w) KL(q||p) + w KL(p||q)``.

    ``w`` (``reverse_weight``) follows the schedule of :func:`opd.objectives.schedule.reverse_kl_weight`: 0
    (forward KL) until the switch step, then to 1 (reverse KL) at once or linearly over the blend steps.
    """
    forward = _kl(teacher_logp, student_logp)
    if reverse_weight == 0.0:
        return forward
    return (1.0 - reverse_weight) * forward + reverse_weight * _kl(student_logp, teacher_logp)


# ----------------------------------------------------------------------------------------------------
# The objective: divergence of every token against the teacher's rows
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """Per-token diagnostics, float32, detached, shape [N]."""

    divergence: torch.Tensor
    """The selected loss's per-token divergence ``d_i``."""
    student_logp: torch.Tensor
    """``log p_student(token_ids[i])`` at the loss temperature."""
    teacher_logp: torch.Tensor
    """``log p_teacher(token_ids[i])`` at the loss temperature, floored."""
    student_entropy: torch.Tensor
    """Entropy of the student distribution (on the shared vocabulary, at the loss temperature)."""
    teacher_floored: torch.Tensor
    """1.0 where a teacher log-prob of the row was below the teacher floor and raised to it, else 0.0."""


class _FullVocabulary(ChunkMath):
    """One divergence of every token's student log-probs against the teacher's rows, chunk by chunk."""

    def __init__(
        self, divergence: Divergence, params: dict[str, Any], teacher: TeacherRows, token_ids, temperature
    ):
        self.divergence = divergence
        self.teacher = teacher
        self.token_ids = token_ids
        self.temperature = temperature
        # each function gets the params it names
        self.params = {
            fn: params_for(fn, params)
            for fn in (divergence.fn, divergence.value, divergence.logit_grad)
            if fn is not None
        }
        self.buffers = None if divergence.buffers is None else max(2, divergence.buffers)

    @property
    def eager_buffers(self) -> int | None:
        # the value and the gradient each overwrite both log-probs, so the gradient gets copies of the two
        return None if self.buffers is None else self.buffers + 2

    def _teacher_and_stats(self, chunk: Chunk) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The chunk's teacher log-probs (a new buffer) and the stats, before anything overwrites them."""
        ids = self.token_ids[chunk.rows]
        student_logp = chunk.student_logp
        sampled = gather_rows(student_logp, ids)
        # the teacher's buffer serves as scratch first, before the teacher's rows arrive in it
        teacher_logp = chunk.new_buffer()
        entropy = entropy_(student_logp, teacher_logp)
        floored = teacher_log_probs_(self.teacher, chunk.rows, teacher_logp, self.temperature)
        teacher_sampled = gather_rows(teacher_logp, ids)
        stats = (sampled, teacher_sampled, entropy, floored)
        return teacher_logp, tuple(s.to(torch.float32) for s in stats)

    def _value(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        value = self.divergence.value or self.divergence.fn
        return value(student_logp, teacher_logp, **self.params[value])

    def _logit_grad(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        logit_grad = self.divergence.logit_grad
        if logit_grad is not None:
            return logit_grad(student_logp, teacher_logp, **self.params[logit_grad])
        fn = self.divergence.fn
        return _autograd_logit_grad(fn, student_logp, teacher_logp, self.params[fn])

    def forward(self, chunk: Chunk):
        teacher_logp, stats = self._teacher_and_stats(chunk)
        return self._value(chunk.student_logp, teacher_logp), stats

    def backward(self, chunk: Chunk) -> torch.Tensor:
        teacher_logp = chunk.new_buffer()
        teacher_log_probs_(self.teacher, chunk.rows, teacher_logp, self.temperature)
        return self._logit_grad(chunk.student_logp, teacher_logp)

    def forward_and_backward(self, chunk: Chunk):
        """One teacher read (or teacher-head matmul) per chunk serves the value and the gradient."""
        teacher_logp, stats = self._teacher_and_stats(chunk)
        student_copy = chunk.new_buffer().copy_(chunk.student_logp)
        teacher_copy = chunk.new_buffer().copy_(teacher_logp)
        values = self._value(chunk.student_logp, teacher_logp)
        del teacher_logp
        return values, stats, self._logit_grad(student_copy, teacher_copy)


def _autograd_logit_grad(fn: LossFn, student_logp, teacher_logp, params) -> torch.Tensor:
    """``d fn_i / d z`` by autograd on the chunk, for a divergence without ``logit_grad``; -> [c, V].

    Differentiates w.r.t. the log-probs, then applies the log-softmax Jacobian ``g - p sum_v g_v``. The
    local graph dies on return, but while it lives its size is up to ``fn``.
    """
    with torch.enable_grad():
        x = student_logp.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x, teacher_logp, **params).sum(), x)
    probs = student_logp.exp()
    return grad.sub_(probs.mul_(grad.sum(dim=-1, keepdim=True)))


def _check_tensors(student: Student, teacher: TeacherRows, token_ids, token_weights) -> None:
    """Raise ValueError on shape/dtype/device mismatches; shapes as in ``chunked_distill_loss``."""
    n, _ = student_shape(student)
    if teacher.shape[0] != n:
        raise ValueError(f"the teacher has {teacher.shape[0]} rows, expected {n} (N from the student)")
    device = student_device(student)
    # the teacher rows may stay on the host: they reach the device a chunk at a time
    for name, t in (("token_ids", token_ids), ("token_weights", token_weights)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n},) (N from the student)")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the student on {device}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be floating point, got {token_weights.dtype}")


def _merge_params(
    divergence: Divergence, beta: float, loss_params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Every keyword param a loss may get, validated; ``beta`` has one source so validation and use agree."""
    extra = dict(loss_params or {})
    if "beta" in extra:
        raise ValueError("pass beta as the beta argument, not inside loss_params")
    # beta is a mixture weight for every loss that names it; the ends make the JSD degenerate (0/0 terms)
    if "beta" in inspect.signature(divergence.fn).parameters and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1, got {beta!r}")
    params = {"beta": beta, **extra}
    if divergence.check_params is not None:
        divergence.check_params(**params_for(divergence.check_params, params))
    return params


def chunked_distill_loss(
    student: Student,
    teacher: torch.Tensor | TeacherRows,
    token_ids: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    chunk_size: int,
    loss_type: str = "reverse_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    loss_params: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, TokenStats]:
    """Weighted sum of per-token student/teacher divergences, memory-bounded in forward and backward.

    Args:
        student: logits [N, V_s] (any float dtype, usually requiring grad) or an
            :class:`~opd.objectives.engine.OutputHead` (hidden states and output head, fused).
        teacher: the teacher logits [N, V_t] (any float dtype, any device: the host-side teacher cache), or
            any :class:`TeacherRows` source of them such as ``HiddenTimesHead``. It never receives a
            gradient; only one chunk of its rows is brought to the student's device at a time.
        token_ids: [N] integer, the sampled tokens (stats only); every id must be < min(V_s, V_t).
        token_weights: [N] float, 0 where masked. The caller folds the loss mask, any reward weights and the
            global token-mean normaliser into it (e.g. ``mask / mask.sum()`` over the whole global batch).
        chunk_size: rows per chunk; the loss holds at most two [chunk_size, V] float32 buffers at once.
        loss_type: a key of ``LOSS_REGISTRY``.
        temperature: applied to BOTH student and teacher logits (project temperature rule).
        beta: mixture weight for losses that take it (jsd: m = beta q + (1 - beta) p), strictly in (0, 1).
        loss_params: optional extra keyword params, e.g. ``{"alpha": 0.1}`` for ``skew_kl`` /
            ``skew_reverse_kl`` (0 <= alpha < 1), or those of losses registered outside this module (the
            ``opd.extra`` config block); like ``beta``, each loss only receives the names it accepts.

    Returns:
        ``loss = sum_i token_weights[i] * d_i`` as a 0-dim float32 tensor (float64 for float64 student
        rows), and ``TokenStats`` of float32 [N] tensors, detached.
    """
    divergence = get_divergence(loss_type)
    params = _merge_params(divergence, beta, loss_params)
    if isinstance(teacher, torch.Tensor):
        teacher = CachedLogits(teacher)
    _check_tensors(student, teacher, token_ids, token_weights)
    vocab = min(student_shape(student)[1], teacher.shape[1])
    math_ = _FullVocabulary(divergence, params, teacher, token_ids, float(temperature))
    loss, values, (sampled, teacher_sampled, entropy, floored) = run_chunked_weighted(
        math_, student, token_weights, chunk_size=chunk_size, temperature=temperature, vocab=vocab
    )
    stats = TokenStats(
        divergence=values.to(torch.float32),
        student_logp=sampled,
        teacher_logp=teacher_sampled,
        student_entropy=entropy,
        teacher_floored=floored,
    )
    return loss, stats

"""Exact full-vocabulary divergence losses between student and teacher, chunked over tokens.

Notation: ``N`` tokens, student vocabulary ``V_s``, teacher vocabulary ``V_t``, ``V = min(V_s, V_t)``.
With temperature ``T``, ``p = softmax(student_logits / T)`` and ``q = softmax(teacher_logits / T)``.

Temperature rule (project-wide): the SAME temperature ``T`` is applied to both student and teacher logits
before the softmax, and the returned per-token stats (``student_logp``, ``teacher_logp``, entropy) are also at
that temperature. Gradients are taken through the division, so they carry the ``1 / T`` factor.

Vocabulary rule (every teacher signal: full, top-k, sampled): when ``V_s != V_t`` (padded output rows, e.g.
152064 vs 151936, in either direction), both sides are cut to the shared first ``V`` ids and renormalised
there, so whichever head is larger, the mass of its extra rows is left out of the divergence and student
columns ``>= V`` get exactly zero gradient from it. Only the policy-gradient ratio (``opd.pg_losses``) spans
the student's whole head, because that is the distribution the rollout sampled from. The caller guarantees
every token id (including those of masked rows) is ``< V``.

Teacher floor (every objective, every teacher signal): a teacher log-prob below ``TEACHER_LOGP_FLOOR``,
``-inf`` included, is raised to it after the log-softmax at the loss temperature, before the objective reads
it. Without it a weighted token whose teacher gives zero probability to an id the student can produce makes
the reverse-KL family ``+inf`` with NaN gradients and the sampled-token advantages infinite or NaN. The
weighted tokens where the floor changed something are counted by the objectives
(``opd/teacher_floored_fraction``).

Memory: the loss is a custom ``torch.autograd.Function``. Forward and backward both walk the tokens in chunks
of ``chunk_size`` rows and upcast one chunk at a time, so only one chunk's ``[chunk_size, V]`` fp32
intermediates are ever alive. Only the input tensors are saved for backward, which recomputes each chunk's
log-softmax. The teacher's rows come from a :class:`TeacherRows` source, asked for one chunk at a time by
forward and backward alike: :class:`CachedLogits` copies that chunk of cached logits (the host teacher cache,
pinned on GPU nodes) to the student's device; :class:`HiddenTimesHead` copies that chunk of the teacher's
cached final hidden states and multiplies it by the teacher's output head, kept on the device, computing the
logits as the teacher's own head does. Either way at most one ``[chunk_size, V_t]`` block of teacher
rows is ever on the device (bf16: half a fp32 buffer), besides that head. The only ``O(N * V)``
allocation is the gradient of ``student_logits`` itself, which autograd needs anyway. Measured peaks beyond
that gradient, in ``[chunk_size, V]`` fp32 buffers: forward about 5 (reverse/forward KL) or 6 (jsd, skew KLs);
backward about 4 for the built-in losses, which have closed-form gradients that reuse their buffers in place
(``logit_grad``); a loss without one falls back to autograd on the recomputed chunk, whose cost depends on the
loss (about 11 for jsd done that way). For V = 151936 and chunk_size = 1024 one buffer is 0.58 GiB. Backward
syncs with the device once per chunk (to skip chunks whose weights are all zero); forward never does.

NaN safety: with the teacher floor, every weighted token's divergence and gradient are finite for finite
student logits. Every ``a * log(...)`` style term is guarded where ``a`` is exactly 0 (an underflowed
probability), so ``0 * inf`` never occurs, and a token with weight 0 contributes exactly 0 to the loss and to
the gradient even if its teacher row is garbage (``nan``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

LossFn = Callable[..., torch.Tensor]

LOSS_REGISTRY: dict[str, LossFn] = {}
"""name -> per-token divergence (student_logp [c, V], teacher_logp [c, V], **params) -> [c]."""

LOGIT_GRAD_REGISTRY: dict[str, LossFn] = {}
"""name -> optional closed-form gradient of that divergence; losses without one use autograd in backward."""

PARAM_CHECK_REGISTRY: dict[str, Callable[..., None]] = {}
"""name -> optional validator of that loss's keyword params; raises ValueError naming the bad param."""

TEACHER_LOGP_FLOOR = -100.0
"""Lowest teacher log-prob (nats) any objective reads; see the module docstring.

A probability of e^-100 (about 4e-44) is below float32's smallest normal number and far below anything a
model assigns to a token it could emit, so raising a log-prob to it changes no real distribution, while it
bounds what one such token can add: a reverse KL of at most 100 nats, a sampled log-ratio of the same order,
like the worst finite tokens. The float32 minimum (-3.4e38) would be finite too, but would make that token's
loss and gradient astronomically large and swamp the rest of the batch.
"""


@dataclass
class TokenStats:
    """Per-token diagnostics, float32, detached, shape [N]."""

    divergence: torch.Tensor
    """The selected loss's per-token divergence ``d_i``."""
    student_logp: torch.Tensor
    """``log p_student(token_ids[i])`` at the loss temperature."""
    teacher_logp: torch.Tensor
    """``log p_teacher(token_ids[i])`` at the loss temperature."""
    student_entropy: torch.Tensor
    """Entropy of the student distribution (on the shared vocabulary, at the loss temperature)."""
    teacher_floored: torch.Tensor
    """1.0 where a teacher log-prob of the row was below ``TEACHER_LOGP_FLOOR`` and raised to it, else 0.0."""


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


def register_loss(
    name: str, *, logit_grad: LossFn | None = None, check_params: Callable[..., None] | None = None
) -> Callable[[LossFn], LossFn]:
    """Decorator adding a per-token divergence to ``LOSS_REGISTRY`` under ``name``.

    The function receives ``student_logp`` [c, V] and ``teacher_logp`` [c, V] (log-probabilities, fp32;
    fp64 for fp64 inputs) plus the keyword params it names in its signature (``beta`` and any key of
    ``loss_params``; a ``**kwargs`` function gets all of them), and returns the per-token divergence [c].
    It must be differentiable in ``student_logp``, must not modify its inputs, and must not produce NaN for
    ``-inf`` teacher entries. Backward then recomputes it per chunk under autograd.

    ``logit_grad`` (optional, same arguments) returns ``d d_i / d z`` [c, V] for ``z = student_logits / T``
    in closed form. It MAY overwrite both inputs (they are private per-chunk buffers) and should, because
    reusing them instead of keeping autograd's intermediates is what makes the built-in losses' backward
    cheaper than their forward.

    ``check_params`` (optional) receives the keyword params it names, once per call and before any chunk
    runs, and raises ValueError naming a bad one (``skew_kl`` uses it to reject ``alpha`` outside [0, 1)).
    """

    def decorator(fn: LossFn) -> LossFn:
        # Silent replacement would change a running config's meaning, so names are write-once.
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        LOSS_REGISTRY[name] = fn
        if logit_grad is not None:
            LOGIT_GRAD_REGISTRY[name] = logit_grad
        if check_params is not None:
            PARAM_CHECK_REGISTRY[name] = check_params
        return fn

    return decorator


def get_loss(name: str) -> LossFn:
    """Return the registered loss function called ``name``; ValueError listing the valid names otherwise."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(LOSS_REGISTRY))
        raise ValueError(f"unknown loss_type {name!r}; valid loss types: {valid}") from None


# ----------------------------------------------------------------------------------------------------
# Divergences (all operate on one chunk: log-probs [c, V] -> divergence [c])
# ----------------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a (log a - log b) per row; log_a, log_b [c, V] -> [c].

    Entries with a == 0 contribute 0 even where log_b = -inf. The difference is zeroed (not the product)
    there, so the backward pass multiplies finite numbers only and never sees 0 * inf.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(dim=-1)


def _kl_logit_grad(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d KL(p || x) / dz for p = softmax(z), given p and r = log p - log x; [c, V] x2 -> [c, V].

    Softmax Jacobian applied to the partials (log p - log x + 1): p * (r - KL). Overwrites r and returns it.
    Entries with p == 0 are zeroed first, matching the forward's convention and avoiding 0 * inf.
    """
    r.masked_fill_(p == 0, 0.0)
    kl = (p * r).sum(dim=-1, keepdim=True)
    return r.sub_(kl).mul_(p)


def _reverse_kl_logit_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """d KL(p || q) / dz = p (log p - log q - KL); overwrites both inputs; [c, V] x2 -> [c, V]."""
    r = teacher_logp.neg_().add_(student_logp)
    return _kl_logit_grad(student_logp.exp_(), r)


def _forward_kl_logit_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """d KL(q || p) / dz = p - q (q sums to 1 on the shared vocab); overwrites both inputs; -> [c, V]."""
    return student_logp.exp_().sub_(teacher_logp.exp_())


def _jsd_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """d JSD / dz = (1 - beta) p (log p - log m - KL(p || m)); overwrites both inputs; -> [c, V].

    The terms from m's own dependence on p cancel (they sum to -(1 - beta)), leaving the reverse-KL shape
    with m in place of q.
    """
    shifted_student = student_logp + math.log1p(-beta)
    log_m = torch.logaddexp(teacher_logp.add_(math.log(beta)), shifted_student, out=teacher_logp)
    del shifted_student  # free before the next [c, V] temporary
    r = log_m.neg_().add_(student_logp)
    return _kl_logit_grad(student_logp.exp_(), r).mul_(1.0 - beta)


@register_loss("reverse_kl", logit_grad=_reverse_kl_logit_grad)
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q), mode-seeking; student_logp, teacher_logp [c, V] -> [c]."""
    return _kl(student_logp, teacher_logp)


@register_loss("forward_kl", logit_grad=_forward_kl_logit_grad)
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p), mass-covering; student_logp, teacher_logp [c, V] -> [c]."""
    return _kl(teacher_logp, student_logp)


@register_loss("jsd", logit_grad=_jsd_logit_grad)
def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD with m = beta q + (1 - beta) p; [c, V] x2 -> [c].

    JSD = beta KL(q || m) + (1 - beta) KL(p || m). log m is a logaddexp of the two log-probs so it stays exact
    when either distribution underflows, and m > 0 wherever p > 0, keeping the value finite.
    """
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


# Skew KL (DistiLLM, Ko et al. 2024): KL against a mixture that keeps a share alpha of the first argument,
# m = alpha a + (1 - alpha) b >= alpha a. The divergence stays finite where b = 0 (for alpha > 0) and the
# gradient is bounded, which is the point of the skew; alpha = 0 gives the plain KL back exactly.

SKEW_ALPHA_DEFAULT = 0.1


def _check_alpha(alpha: float = SKEW_ALPHA_DEFAULT) -> None:
    """Raise ValueError unless ``0 <= alpha < 1``; alpha = 1 would make the mixture equal to ``a``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be a number with 0 <= alpha < 1, got {alpha!r}")


def _log_or_neg_inf(x: float) -> float:
    """log(x) with log(0) = -inf, so that alpha = 0 drops the alpha share of the mixture exactly."""
    return math.log(x) if x > 0 else -math.inf


def _skew_log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log m for m = alpha a + (1 - alpha) b, as a logaddexp of log-probs; [c, V] x2 -> [c, V]."""
    return torch.logaddexp(log_a + _log_or_neg_inf(alpha), log_b + math.log1p(-alpha))


def _skew_log_ratio(
    log_a: torch.Tensor, log_b: torch.Tensor, alpha: float, out: torch.Tensor
) -> torch.Tensor:
    """log(a / m) for m = alpha a + (1 - alpha) b, written into ``out``; [c, V] x2 -> [c, V].

    m / a = alpha + (1 - alpha) b / a, so log(a / m) = -logaddexp(log alpha, log(1 - alpha) + log b - log a).
    Only a ratio of the two distributions appears, so there is no tiny * huge product, and with ``out`` one
    of the inputs no [c, V] temporary is needed. ``log_a`` must be finite where it matters: a = 0 rows are
    the caller's to mask.
    """
    x = torch.sub(log_b, log_a, out=out).add_(math.log1p(-alpha))
    log_alpha = torch.tensor(_log_or_neg_inf(alpha), dtype=x.dtype, device=x.device)
    return torch.logaddexp(x, log_alpha, out=x).neg_()


def _skew_kl_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """d KL(q || m) / dz for m = alpha q + (1 - alpha) p; overwrites both inputs; [c, V] x2 -> [c, V].

    dD/dp_v = -(1 - alpha) q_v / m_v; through the softmax Jacobian: (1 - alpha) (p S - u) with
    u = p q / m and S = sum_v u_v. u = exp(log p + log(q / m)) is exactly 0 where q = 0 (log(q / m) = -inf
    there), and for alpha = 0 it is q, giving the forward-KL gradient p - q.
    """
    # log(q / m) = -log(m / q); m / q = alpha + (1 - alpha) p / q, i.e. the ratio helper with a = q, b = p.
    log_u = _skew_log_ratio(teacher_logp, student_logp, alpha, out=teacher_logp).add_(student_logp)
    u = log_u.exp_()
    total = u.sum(dim=-1, keepdim=True)
    return student_logp.exp_().mul_(total).sub_(u).mul_(1.0 - alpha)


def _skew_reverse_kl_logit_grad(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """d KL(p || m) / dz for m = alpha p + (1 - alpha) q; overwrites both inputs; [c, V] x2 -> [c, V].

    dD/dp_v = r_v + 1 - alpha p_v / m_v with r = log(p / m); through the softmax Jacobian (the constant
    cancels): p (h - sum_v p_v h_v) with h = r - alpha exp(r). For alpha = 0 this is the reverse-KL gradient.
    """
    h = _skew_log_ratio(student_logp, teacher_logp, alpha, out=teacher_logp)
    if alpha > 0:  # skipped at alpha = 0, where exp(r) = p / q overflows for a tiny q and 0 * inf is nan
        h.sub_(h.exp().mul_(alpha))
    return _kl_logit_grad(student_logp.exp_(), h)


@register_loss("skew_kl", logit_grad=_skew_kl_logit_grad, check_params=_check_alpha)
def skew_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """Skew forward KL, KL(q || alpha q + (1 - alpha) p), 0 <= alpha < 1; [c, V] x2 -> [c].

    = sum_v q_v (log q_v - log(alpha q_v + (1 - alpha) p_v)). Mass-covering like forward KL (alpha = 0),
    but bounded by -log(alpha) since m >= alpha q. ``alpha`` comes from ``loss_params``.
    """
    return _kl(teacher_logp, _skew_log_mix(teacher_logp, student_logp, alpha))


@register_loss("skew_reverse_kl", logit_grad=_skew_reverse_kl_logit_grad, check_params=_check_alpha)
def skew_reverse_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = SKEW_ALPHA_DEFAULT
) -> torch.Tensor:
    """Skew reverse KL, KL(p || alpha p + (1 - alpha) q), 0 <= alpha < 1; [c, V] x2 -> [c].

    = sum_v p_v (log p_v - log(alpha p_v + (1 - alpha) q_v)). Mode-seeking like reverse KL (alpha = 0), but
    finite where the teacher gives zero probability (bounded by -log(alpha)). ``alpha`` from ``loss_params``.
    """
    return _kl(student_logp, _skew_log_mix(student_logp, teacher_logp, alpha))


def _params_for(fn: LossFn, params: dict[str, Any]) -> dict[str, Any]:
    """Subset of ``params`` that ``fn`` accepts, so losses without e.g. ``beta`` need no ``**kwargs``."""
    sig = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig):
        return dict(params)
    names = {p.name for p in sig}
    return {k: v for k, v in params.items() if k in names}


# ----------------------------------------------------------------------------------------------------
# Teacher rows
# ----------------------------------------------------------------------------------------------------


class TeacherRows(Protocol):
    """Where the loss reads the teacher's logits from, one chunk of token rows at a time."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, V_t)``: tokens and teacher output rows."""

    def rows(self, rows: slice, device: torch.device) -> torch.Tensor:
        """Raw (T = 1) teacher logits of the tokens ``rows`` on ``device``: ``[c, V_t]`` floating point."""


@dataclass(frozen=True)
class CachedLogits:
    """The teacher's logits themselves, ``[N, V_t]`` on any device (the ``full`` signal)."""

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

    def rows(self, rows: slice, device: torch.device) -> torch.Tensor:
        # Whole rows travel (asynchronously from pinned memory) and are cut later: a strided column slice of
        # host memory would first be gathered into unpinned memory.
        return self.logits[rows].to(device, non_blocking=True)


@dataclass(frozen=True)
class HiddenTimesHead:
    """The teacher's logits rebuilt as ``hidden @ head^T`` (the ``hidden`` signal).

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

    def rows(self, rows: slice, device: torch.device) -> torch.Tensor:
        hidden = self.hidden[rows].to(device, non_blocking=True)
        # in the head's dtype, as the teacher's own output layer computes them: bf16 in, bf16 logits out
        return torch.nn.functional.linear(hidden.to(self.head.dtype), self.head)


# ----------------------------------------------------------------------------------------------------
# Chunk kernels
# ----------------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Upcast one chunk and return log_softmax(logits / T); logits [c, V] -> [c, V] in ``dtype``.

    When the upcast made a fresh copy and no graph is being recorded, the temperature is applied in place so
    only one extra [c, V] buffer exists before the log-softmax output.
    """
    x = logits.to(dtype)
    if temperature != 1.0:
        fresh_copy = x.data_ptr() != logits.data_ptr()
        x = x.div_(temperature) if fresh_copy and not torch.is_grad_enabled() else x / temperature
    return torch.log_softmax(x, dim=-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy per row; logp [c, V] -> [c]. Zero-probability entries are skipped, never 0 * -inf."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)


def _masked_weighted_sum(div: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i d_i over rows with w_i != 0; div, weights [c] -> scalar. Masked inf/nan rows cannot leak."""
    return torch.where(weights != 0, weights.to(div.dtype) * div, 0.0).sum()


@dataclass
class _ChunkOut:
    """Forward results of one chunk: scalar partial loss and five [c] stats vectors."""

    loss: torch.Tensor
    divergence: torch.Tensor
    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    entropy: torch.Tensor
    teacher_floored: torch.Tensor


@dataclass
class _Setup:
    """Non-tensor configuration shared by forward and backward."""

    loss_fn: LossFn
    params: dict[str, Any]
    logit_grad: LossFn | None
    grad_params: dict[str, Any]
    chunk_size: int
    temperature: float
    vocab: int
    dtype: torch.dtype


def _teacher_log_probs(
    teacher: TeacherRows, rows: slice, setup: _Setup, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Floored teacher log-probs of the chunk ``rows`` on ``device``: [c, V], and [c] bool.

    Only this chunk's rows are brought to the device. The bool marks the rows where the floor raised a
    log-prob.
    """
    logits = teacher.rows(rows, device)[:, : setup.vocab]
    logp = _log_probs(logits, setup.temperature, setup.dtype)
    floored = logp.amin(dim=-1) < TEACHER_LOGP_FLOOR
    return logp.clamp_(min=TEACHER_LOGP_FLOOR), floored


def floor_teacher_logp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs raised to ``TEACHER_LOGP_FLOOR`` and 1.0 where that changed them; [N] -> [N], [N]."""
    return logp.clamp(min=TEACHER_LOGP_FLOOR), (logp < TEACHER_LOGP_FLOOR).to(torch.float32)


def _forward_chunk(
    student: torch.Tensor,
    teacher: TeacherRows,
    rows: slice,
    ids: torch.Tensor,
    weights: torch.Tensor,
    setup: _Setup,
) -> _ChunkOut:
    """Loss contribution and stats of the chunk ``rows``; student [c, V_s], ids/weights [c].

    Kept as a function so every [c, V] intermediate is released on return, before the next chunk starts.
    """
    s_logp = _log_probs(student[:, : setup.vocab], setup.temperature, setup.dtype)
    t_logp, floored = _teacher_log_probs(teacher, rows, setup, student.device)
    div = setup.loss_fn(s_logp, t_logp, **setup.params)
    col = ids.unsqueeze(-1)
    return _ChunkOut(
        loss=_masked_weighted_sum(div, weights),
        divergence=div,
        student_logp=s_logp.gather(-1, col).squeeze(-1),
        teacher_logp=t_logp.gather(-1, col).squeeze(-1),
        entropy=_entropy(s_logp),
        teacher_floored=floored,
    )


def _autograd_chunk_grad(
    student: torch.Tensor, t_logp: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, setup: _Setup
) -> torch.Tensor:
    """grad_out * d(sum_i w_i d_i)/d(student) by autograd on a recomputed chunk; [c, V] -> [c, V] fp32.

    The local graph dies on return, so only this chunk's activations ever exist.
    """
    with torch.enable_grad():
        x = student.detach().to(setup.dtype).requires_grad_(True)
        s_logp = _log_probs(x, setup.temperature, setup.dtype)
        total = _masked_weighted_sum(setup.loss_fn(s_logp, t_logp, **setup.params), weights)
        (grad,) = torch.autograd.grad(total, x, grad_outputs=grad_out.to(total.dtype))
    return grad


@torch.no_grad()
def _closed_form_chunk_grad(
    student: torch.Tensor, t_logp: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, setup: _Setup
) -> torch.Tensor:
    """As ``_autograd_chunk_grad`` (student [c, V] -> [c, V] fp32) via ``logit_grad``, reusing buffers."""
    s_logp = _log_probs(student, setup.temperature, setup.dtype)
    grad = setup.logit_grad(s_logp, t_logp, **setup.grad_params)
    # Chain rule through z = logits / T and through the weighted sum, folded into one row scale.
    row_scale = weights.to(setup.dtype) * (grad_out.to(setup.dtype) / setup.temperature)
    return grad.mul_(row_scale.unsqueeze(-1))


def _backward_chunk(
    student: torch.Tensor,
    teacher: TeacherRows,
    rows: slice,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    setup: _Setup,
) -> torch.Tensor:
    """grad_out * d(sum_i w_i d_i)/d(student[:, :V]) for the chunk ``rows``; student [c, V_s] -> [c, V] fp32.

    Recomputes the chunk's log-softmax instead of saving forward activations: that is what keeps the
    backward bounded. A function of its own so every [c, V] buffer is freed before the next chunk.
    """
    with torch.no_grad():
        t_logp, _ = _teacher_log_probs(teacher, rows, setup, student.device)
    student = student[:, : setup.vocab]
    if setup.logit_grad is None:
        grad = _autograd_chunk_grad(student, t_logp, weights, grad_out, setup)
    else:
        grad = _closed_form_chunk_grad(student, t_logp, weights, grad_out, setup)
    # A masked row with an inf/nan divergence can still yield 0 * inf = nan inside its own row; rows are
    # independent, so zeroing them here restores the exact-zero guarantee without touching the others.
    return grad.masked_fill_((weights == 0).unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------------
# Autograd function
# ----------------------------------------------------------------------------------------------------


class _ChunkedDistill(torch.autograd.Function):
    """Chunked loss with recompute-in-backward; see module docstring for the memory argument."""

    @staticmethod
    def forward(ctx, student_logits, token_ids, token_weights, teacher: TeacherRows, setup: _Setup):
        """student [N, V_s], ids [N], weights [N], teacher rows (N, V_t) -> loss, 5 stats [N] fp32."""
        n = student_logits.shape[0]
        device = student_logits.device
        loss = torch.zeros((), dtype=setup.dtype, device=device)
        stats = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(5)]
        for start in range(0, n, setup.chunk_size):
            sl = slice(start, start + setup.chunk_size)
            out = _forward_chunk(student_logits[sl], teacher, sl, token_ids[sl], token_weights[sl], setup)
            loss += out.loss
            chunk_stats = (out.divergence, out.student_logp, out.teacher_logp, out.entropy)
            for dst, src in zip(stats, (*chunk_stats, out.teacher_floored), strict=True):
                dst[sl] = src
        ctx.save_for_backward(student_logits, token_weights)
        # never differentiated, so it needs no save_for_backward bookkeeping
        ctx.teacher = teacher
        ctx.setup = setup
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stat_grads):
        """grad_loss scalar -> grad for student [N, V_s] in its own dtype; None for every other input."""
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        student_logits, token_weights = ctx.saved_tensors
        setup: _Setup = ctx.setup
        # Columns >= V (vocab padding) stay exactly zero; the rows of skipped chunks too.
        grad = torch.zeros_like(student_logits)
        for start in range(0, student_logits.shape[0], setup.chunk_size):
            sl = slice(start, start + setup.chunk_size)
            weights = token_weights[sl]
            if not bool((weights != 0).any()):
                continue
            chunk_grad = _backward_chunk(student_logits[sl], ctx.teacher, sl, weights, grad_loss, setup)
            grad[sl, : setup.vocab].copy_(chunk_grad)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def _check_tensors(student_logits, teacher: TeacherRows, token_ids, token_weights) -> None:
    """Raise ValueError on shape/dtype/device mismatches; shapes as in ``chunked_distill_loss``."""
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a 2-D [N, V] float tensor, got {tuple(student_logits.shape)} "
            f"{student_logits.dtype}"
        )
    n = student_logits.shape[0]
    if teacher.shape[0] != n:
        raise ValueError(f"the teacher has {teacher.shape[0]} rows, expected {n} (N from student_logits)")
    # the teacher rows may stay on the host: they reach the device a chunk at a time
    for name, t in (("token_ids", token_ids), ("token_weights", token_weights)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n},) (N from student_logits)")
        if t.device != student_logits.device:
            raise ValueError(f"{name} is on {t.device}, student_logits on {student_logits.device}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be floating point, got {token_weights.dtype}")


def _check_chunk_and_temperature(chunk_size: int, temperature: float) -> None:
    """Raise ValueError for a chunk size that is not a positive int or a temperature that is not > 0."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_scalars(loss_fn: LossFn, chunk_size: int, temperature: float, beta: float) -> None:
    """Raise ValueError for a non-positive chunk size or temperature, or beta outside (0, 1)."""
    _check_chunk_and_temperature(chunk_size, temperature)
    # beta is a mixture weight for every loss that names it; the ends make the JSD degenerate (0/0 terms).
    if "beta" in inspect.signature(loss_fn).parameters and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1, got {beta!r}")


def _merge_params(beta: float, loss_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every keyword param a loss may get; ``beta`` has one source so validation and use agree."""
    extra = dict(loss_params or {})
    if "beta" in extra:
        raise ValueError("pass beta as the beta argument, not inside loss_params")
    return {"beta": beta, **extra}


def chunked_distill_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TeacherRows,
    token_ids: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    loss_type: str = "reverse_kl",
    chunk_size: int = 1024,
    temperature: float = 1.0,
    beta: float = 0.5,
    loss_params: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, TokenStats]:
    """Weighted sum of per-token student/teacher divergences, memory-bounded in forward and backward.

    Args:
        student_logits: [N, V_s], any float dtype, usually requires grad.
        teacher: the teacher logits [N, V_t] (any float dtype, any device: the host-side teacher cache), or
            any :class:`TeacherRows` source of them such as :class:`HiddenTimesHead`. It never receives a
            gradient; only one chunk of its rows is brought to the student's device at a time.
        token_ids: [N] integer, the sampled tokens (stats only); every id must be < min(V_s, V_t).
        token_weights: [N] float, 0 where masked. The caller folds the loss mask, any reward weights and the
            global token-mean normaliser into it (e.g. ``mask / mask.sum()`` over the whole global batch).
        loss_type: a key of ``LOSS_REGISTRY`` ("reverse_kl", "forward_kl", "jsd", "skew_kl",
            "skew_reverse_kl", ...).
        chunk_size: rows processed at a time; peak extra memory is a few [chunk_size, V] fp32 buffers.
        temperature: applied to BOTH student and teacher logits (project temperature rule).
        beta: mixture weight for losses that take it (jsd: m = beta q + (1 - beta) p), strictly in (0, 1).
        loss_params: optional extra keyword params, e.g. ``{"alpha": 0.1}`` for ``skew_kl`` /
            ``skew_reverse_kl`` (0 <= alpha < 1), or those of losses registered outside this module (the
            ``opd.extra`` config block); like ``beta``, each loss only receives the names it accepts.

    Returns:
        ``loss = sum_i token_weights[i] * d_i`` as a 0-dim float32 tensor (float64 if student_logits is
        float64), and ``TokenStats`` of float32 [N] tensors, detached.
    """
    loss_fn = get_loss(loss_type)
    _check_scalars(loss_fn, chunk_size, temperature, beta)
    if isinstance(teacher, torch.Tensor):
        teacher = CachedLogits(teacher)
    _check_tensors(student_logits, teacher, token_ids, token_weights)
    params = _merge_params(beta, loss_params)
    check = PARAM_CHECK_REGISTRY.get(loss_type)
    if check is not None:
        check(**_params_for(check, params))
    logit_grad = LOGIT_GRAD_REGISTRY.get(loss_type)
    setup = _Setup(
        loss_fn=loss_fn,
        params=_params_for(loss_fn, params),
        logit_grad=logit_grad,
        grad_params=_params_for(logit_grad, params) if logit_grad is not None else {},
        chunk_size=chunk_size,
        temperature=float(temperature),
        vocab=min(student_logits.shape[1], teacher.shape[1]),
        dtype=torch.float64 if student_logits.dtype == torch.float64 else torch.float32,
    )
    loss, div, s_logp, t_logp, entropy, floored = _ChunkedDistill.apply(
        student_logits, token_ids, token_weights, teacher, setup
    )
    return loss, TokenStats(
        divergence=div,
        student_logp=s_logp,
        teacher_logp=t_logp,
        student_entropy=entropy,
        teacher_floored=floored,
    )


def _check_reverse_weight(reverse_weight: float = 0.0) -> None:
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"reverse_weight must be in [0, 1], got {reverse_weight}")


@register_loss("forward_then_reverse_kl", check_params=_check_reverse_weight)
def forward_then_reverse_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, reverse_weight: float = 0.0
) -> torch.Tensor:
    """PACED's two-stage objective ``(1 - w) KL(q||p) + w KL(p||q)``.

    ``w`` (``reverse_weight``) follows the schedule of :func:`opd.schedule.reverse_kl_weight`: 0 (forward
    KL) until the switch step, then to 1 (reverse KL) at once or linearly over the blend steps.
    """
    forward = _kl(teacher_logp, student_logp)
    if reverse_weight == 0.0:
        return forward
    return (1.0 - reverse_weight) * forward + reverse_weight * _kl(student_logp, teacher_logp)

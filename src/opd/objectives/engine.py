"""The chunk engine every objective runs on: chunking, the gradient pass, the dtype rule, memory.

Notation: ``N`` student rows (response tokens), ``V`` the vocabulary columns a pass reads (the shared ids
``< V``, or the student's whole head for the policy-gradient ratio), ``T`` the temperature and
``z = logits / T``.

An objective states only its per-chunk math (a :class:`ChunkMath`): from one chunk's student log-probs
``log_softmax(z)`` it returns a per-row value ``d_i`` and detached per-row stats, and the closed-form
gradient ``d d_i / d z_i``. The engine walks the rows in chunks and hands each chunk's gradient, scaled by
``d loss / d d_i`` (rows where that is 0 get exactly 0, whatever their teacher rows hold), to the student's
rows. It has two ways to do that:

- :func:`run_chunked_weighted`, for a loss ``sum_i w_i d_i`` whose weights are known up front (every
  divergence objective): one pass computes each chunk's log-probs (and teacher rows) once and takes the value
  and the gradient from them together (:meth:`ChunkMath.forward_and_backward`), so a fused chunk costs one
  logits matmul, not two, and a host-side teacher chunk one copy. The gradients exist from forward on;
  backward scales them by ``d loss / d sum`` and hands them over. A second backward through a retained graph
  recomputes them as below.
- :func:`run_chunked`, for per-row values that other code transforms (the policy-gradient ratio): forward
  returns the values, and backward recomputes each chunk's log-probs instead of keeping anything from forward.

The student's rows:

- unfused, the student is its logits ``[N, V_s]`` (any float dtype) and the gradient lands in them;
- fused (:class:`OutputHead`), the student is its final hidden states ``[N, H]`` and output head
  ``W [V_s, H]``: each chunk computes its logits ``hidden @ W^T`` in the head's matmul dtype (the autocast
  dtype, as the model's own head would), and the gradient pass sends ``g @ W`` to the hidden states and adds
  ``g^T @ hidden`` into ``W``'s gradient, chunk by chunk, so no ``[N, V]`` logits or logit gradient exist.
  The backward products run in the matmul dtype too; ``W``'s gradient is summed over the chunks in the
  compute dtype.

Dtype rule: the chunk math runs in float32, or float64 when the student's rows are float64 (exact tests).

Memory: every ``[rows, V]`` intermediate of a pass is one of the math's buffers, all in the compute dtype
and written in place: the student's log-probs and whatever the objective declares (``ChunkMath.buffers``,
them included). The engine steps ``rows = chunk_size`` rows at a time for up to 2 buffers and
``2 * chunk_size // buffers`` beyond, so a pass never holds more than 2 ``[chunk_size, V]`` buffers beyond
its inputs and outputs (the per-row values and stats, the student's gradient). Narrower data (bf16 logits of
a fused head, a bf16 teacher chunk copied from the host) is written into the tail of the buffer it becomes
and widened there (:func:`widen_tail_`), never into a separate ``[rows, V]`` tensor. A fused head whose
weight is not in its matmul dtype is cast once per pass (``[V, H]``), as autocast casts the model's own
head. The single pass of :func:`run_chunked_weighted` holds more buffers per row (the math's
``eager_buffers``: copies of the log-probs for the gradient), so it steps fewer rows at a time, within the
same bound. Chunks whose rows all have weight 0 (a zero gradient) get no gradient work: the weighted pass
finds them with one device sync, the recomputing backward with one per chunk; a plain forward never syncs.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class OutputHead:
    """The student's rows for the fused path: logits are ``hidden @ weight^T``, computed a chunk at a time."""

    hidden: torch.Tensor
    """``[N, H]`` final (post-norm) hidden states, usually with gradient."""
    weight: torch.Tensor
    """``[V_s, H]`` output head weight, gathered whole (it may require grad and lead back to a shard)."""
    matmul_dtype: torch.dtype
    """Dtype of the logits matmul: the autocast dtype the model's own head would run in."""

    def __post_init__(self):
        hidden, weight = self.hidden, self.weight
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"hidden states [N, H] and output head [V_s, H] do not fit: {tuple(hidden.shape)} and "
                f"{tuple(weight.shape)}"
            )
        if not (hidden.is_floating_point() and weight.is_floating_point()):
            raise ValueError(
                f"hidden states and head must be floating point, got {hidden.dtype}, {weight.dtype}"
            )
        if hidden.device != weight.device:
            raise ValueError(f"hidden states are on {hidden.device}, the output head on {weight.device}")


Student = torch.Tensor | OutputHead
"""What an objective differentiates: student logits ``[N, V_s]`` or an :class:`OutputHead`."""


def student_shape(student: Student) -> tuple[int, int]:
    """``(N, V_s)``: the student's rows and output columns."""
    if isinstance(student, OutputHead):
        return student.hidden.shape[0], student.weight.shape[0]
    if student.dim() != 2 or not student.is_floating_point():
        raise ValueError(
            f"student logits must be a 2-D [N, V] float tensor, got {tuple(student.shape)} {student.dtype}"
        )
    return student.shape[0], student.shape[1]


def student_device(student: Student) -> torch.device:
    return student.hidden.device if isinstance(student, OutputHead) else student.device


def compute_dtype(student: Student) -> torch.dtype:
    """The dtype rule: float64 for float64 student rows, float32 for every other dtype."""
    rows = student.hidden if isinstance(student, OutputHead) else student
    return torch.float64 if rows.dtype == torch.float64 else torch.float32


def check_chunk_and_temperature(chunk_size: int, temperature: float) -> None:
    """Raise ValueError for a chunk size that is not a positive int or a temperature that is not > 0."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


# ----------------------------------------------------------------------------------------------------
# In-place chunk primitives (no [rows, V] temporaries)
# ----------------------------------------------------------------------------------------------------


def log_softmax_(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x <- log_softmax(x / T)`` in place; x ``[c, V]``.

    The softmax kernels read a row before writing it, so the output may alias the input.
    """
    if temperature != 1.0:
        x.div_(temperature)
    return torch.log_softmax(x, dim=-1, out=x)


def entropy_(logp: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Entropy per row of ``logp`` ``[c, V]`` (finite), using ``scratch`` ``[c, V]`` (overwritten); -> [c]."""
    return torch.exp(logp, out=scratch).mul_(logp).sum(dim=-1).neg_()


def logsumexp_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(x_v) per row, using ``scratch`` (overwritten); x ``[c, V]`` -> ``[c]``, -inf for an
    all -inf row. ``torch.logsumexp`` would hold a hidden ``[c, V]`` temporary."""
    peak = x.amax(dim=-1)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    torch.sub(x, peak.unsqueeze(-1), out=scratch).exp_()
    return scratch.sum(dim=-1).log_().add_(peak)


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[i, ids[i]]``; x ``[c, V]``, ids ``[c]`` -> ``[c]``."""
    return x.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def tail_view(buffer: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape`` tensor of ``dtype`` over the last bytes of the contiguous ``buffer``."""
    flat = buffer.view(-1).view(torch.uint8)
    nbytes = shape[0] * shape[1] * dtype.itemsize
    return flat[flat.numel() - nbytes :].view(dtype).view(shape)


def widen_tail_(buffer: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Copy ``tail`` ``[c, >= V]`` (narrower elements, stored at the end of ``buffer``'s memory, e.g. by
    :func:`tail_view`) into ``buffer`` ``[c, V]``, converting the dtype; returns ``buffer``.

    Each step copies as many rows as fit below the first source row still unread: half the rows left for a
    2-byte source in a 4-byte buffer, so about log2(c) copies. A row that overlaps its own source goes
    through a one-row temporary.
    """
    rows, vocab = buffer.shape
    source = tail[:, :vocab]
    row_bytes = vocab * buffer.element_size()
    done = 0
    while done < rows:
        room = source[done].data_ptr() - (buffer.data_ptr() + done * row_bytes)
        count = min(rows - done, room // row_bytes)
        if count >= 1:
            buffer[done : done + count].copy_(source[done : done + count])
            done += count
        else:
            buffer[done].copy_(source[done].clone())
            done += 1
    return buffer


def matmul_into_(buffer: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``buffer <- a @ b_t^T`` computed in ``b_t``'s dtype (``a`` cast to it), then widened to the buffer's.

    a ``[c, H]``, b_t ``[V, H]``, buffer ``[c, V]`` contiguous. The product is rounded to the matmul dtype
    first, as a linear layer in that dtype returns it.
    """
    a = a.to(b_t.dtype)
    if b_t.dtype == buffer.dtype:
        return torch.mm(a, b_t.t(), out=buffer)
    if b_t.dtype.itemsize < buffer.element_size():
        tail = tail_view(buffer, tuple(buffer.shape), b_t.dtype)
        torch.mm(a, b_t.t(), out=tail)
        return widen_tail_(buffer, tail)
    return buffer.copy_(torch.mm(a, b_t.t()))


def copy_into_(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buffer <- rows[:, :V]`` for ``rows`` ``[c, >= V]`` on any device, without a device-side temporary.

    From another device, narrower whole rows travel into the buffer's tail (asynchronously from pinned
    memory) and are widened there; anything else goes through a blocking copy, which stages the dtype
    conversion in host memory.
    """
    vocab = buffer.shape[1]
    if rows.device == buffer.device:
        return buffer.copy_(rows[:, :vocab])
    fits = rows.numel() * rows.element_size() <= buffer.numel() * buffer.element_size()
    if rows.element_size() < buffer.element_size() and fits and rows.is_contiguous():
        tail = tail_view(buffer, tuple(rows.shape), rows.dtype)
        tail.copy_(rows, non_blocking=True)
        return widen_tail_(buffer, tail)
    return buffer.copy_(rows[:, :vocab])


# ----------------------------------------------------------------------------------------------------
# The objective's side: per-chunk math
# ----------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One chunk of rows as the math sees it."""

    rows: slice
    """The chunk's rows among the N."""
    student_logp: torch.Tensor
    """``[c, V]`` student log-probs at the temperature, in the compute dtype; the math may overwrite it."""

    def new_buffer(self) -> torch.Tensor:
        """Another ``[c, V]`` buffer like ``student_logp`` (count it in ``ChunkMath.buffers``)."""
        return torch.empty_like(self.student_logp)


class ChunkMath(ABC):
    """The per-chunk math of one objective; the engine runs it over every chunk, in forward and backward."""

    buffers: int | None = 2
    """``[rows, V]`` buffers the math holds at once, the student's log-probs included; None when unknown
    (then the engine steps a whole chunk and nothing bounds the math's own temporaries)."""

    @abstractmethod
    def forward(self, chunk: Chunk) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Per-row values ``[c]`` (compute dtype) and detached stats (``[c, ...]`` each) of the chunk."""

    def backward(self, chunk: Chunk) -> torch.Tensor:
        """``d value_i / d z_i`` for the chunk's rows, ``[c, V]`` in the compute dtype (may be a buffer)."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient")

    def forward_and_backward(self, chunk: Chunk):
        """:meth:`forward` and :meth:`backward` of one chunk from one computation of its log-probs: values
        ``[c]``, stats and ``d value_i / d z_i`` ``[c, V]``.

        Both may overwrite the log-probs, so backward gets a copy (one more buffer, see ``eager_buffers``).
        """
        kept = chunk.new_buffer().copy_(chunk.student_logp)
        values, stats = self.forward(chunk)
        return values, stats, self.backward(Chunk(chunk.rows, kept))

    @property
    def eager_buffers(self) -> int | None:
        """``[rows, V]`` buffers :meth:`forward_and_backward` holds at once (None when unknown)."""
        return None if self.buffers is None else self.buffers + 1


@dataclass(frozen=True)
class PassSetup:
    """What every chunk of a pass shares."""

    chunk_size: int
    temperature: float
    vocab: int
    """Student columns the log-probs span: the first ``vocab`` of ``V_s``."""
    dtype: torch.dtype
    """Compute dtype (the dtype rule)."""

    def steps(self, num_rows: int, buffers: int | None) -> Iterator[slice]:
        """Row ranges of a pass; one empty range for N = 0, so the stats still get their shapes."""
        rows = self.chunk_size if buffers is None or buffers <= 2 else max(1, 2 * self.chunk_size // buffers)
        if num_rows == 0:
            yield slice(0, 0)
        for start in range(0, num_rows, rows):
            yield slice(start, min(start + rows, num_rows))


# ----------------------------------------------------------------------------------------------------
# The student's side: logits or a fused output head
# ----------------------------------------------------------------------------------------------------


class _LogitRows:
    """Unfused: the student's logits ``[N, V_s]``; the gradient lands in them."""

    def __init__(self, logits: torch.Tensor, setup: PassSetup):
        self.logits, self.setup, self.device = logits, setup, logits.device

    def log_probs(self, rows: slice) -> torch.Tensor:
        setup = self.setup
        chunk = self.logits[rows, : setup.vocab]
        buffer = torch.empty(chunk.shape, dtype=setup.dtype, device=chunk.device)
        return log_softmax_(buffer.copy_(chunk), setup.temperature)

    def zero_grads(self, needed: tuple[bool, ...]) -> list[torch.Tensor | None]:
        return [torch.zeros_like(self.logits) if needed[0] else None]

    def accumulate(self, grads: list[torch.Tensor | None], rows: slice, grad: torch.Tensor) -> None:
        """``grad`` ``[c, V]``: the chunk's gradient w.r.t. its logits' first V columns (others stay 0)."""
        grads[0][rows, : self.setup.vocab].copy_(grad)


class _HeadRows:
    """Fused: hidden states ``[N, H]`` times the head ``[V_s, H]``, a chunk at a time."""

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, setup: PassSetup, matmul_dtype: torch.dtype
    ):
        self.hidden, self.weight, self.setup, self.matmul_dtype = hidden, weight, setup, matmul_dtype
        self.device = hidden.device

    @cached_property
    def _matmul_weight(self) -> torch.Tensor:
        # cast once per pass, as autocast casts the head's weight once per forward
        return self.weight[: self.setup.vocab].to(self.matmul_dtype)

    def log_probs(self, rows: slice) -> torch.Tensor:
        setup = self.setup
        hidden = self.hidden[rows]
        buffer = torch.empty(hidden.shape[0], setup.vocab, dtype=setup.dtype, device=hidden.device)
        return log_softmax_(matmul_into_(buffer, hidden, self._matmul_weight), setup.temperature)

    def zero_grads(self, needed: tuple[bool, ...]) -> list[torch.Tensor | None]:
        hidden, weight = self.hidden, self.weight
        return [
            torch.zeros_like(hidden) if needed[0] else None,
            # accumulated in the compute dtype across chunks; autograd casts it to the weight's dtype
            torch.zeros(weight.shape, dtype=self.setup.dtype, device=weight.device) if needed[1] else None,
        ]

    def accumulate(self, grads: list[torch.Tensor | None], rows: slice, grad: torch.Tensor) -> None:
        """``grad`` ``[c, V]`` (compute dtype) w.r.t. the chunk's logits, through ``logits = hidden @ W^T``.

        The products run in the matmul dtype, as the model head's own backward runs them.
        """
        grad_hidden, grad_weight = grads
        # by now the math's other buffers are gone, so this copy and the product below fit in the bound
        grad = grad.to(self.matmul_dtype)
        if grad_hidden is not None:
            grad_hidden[rows].copy_(torch.mm(grad, self._matmul_weight))
        if grad_weight is not None:
            hidden = self.hidden[rows].to(self.matmul_dtype)
            _add_product_(grad_weight[: self.setup.vocab], grad.t(), hidden)


def _add_product_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b``; total ``[V, H]`` (any float dtype), a ``[V, c]``, b ``[c, H]``.

    In ``total``'s dtype directly when ``a`` has it; otherwise a slice of V rows at a time, so the product,
    rounded to ``a``'s dtype before the sum, is never larger than ``a``.
    """
    if a.dtype == total.dtype:
        total.addmm_(a, b)
        return
    rows = max(1, a.numel() // b.shape[1])
    for start in range(0, total.shape[0], rows):
        total[start : start + rows].add_(torch.mm(a[start : start + rows], b))


def _student_rows(tensors: tuple[torch.Tensor, ...], setup: PassSetup, matmul_dtype: torch.dtype | None):
    if matmul_dtype is None:
        return _LogitRows(tensors[0], setup)
    return _HeadRows(*tensors, setup, matmul_dtype)


# ----------------------------------------------------------------------------------------------------
# The passes
# ----------------------------------------------------------------------------------------------------


def _forward_chunk(math: ChunkMath, student, rows: slice, weighted):
    """One chunk's values and stats, and with ``weighted`` its gradient too; a function of its own so its
    buffers are freed on return."""
    if weighted is None:
        return math.forward(Chunk(rows, student.log_probs(rows)))
    weights, grads = weighted
    values, stats, grad = math.forward_and_backward(Chunk(rows, student.log_probs(rows)))
    _to_student(student, grads, rows, grad, weights[rows])
    return values, stats


def _forward_pass(math: ChunkMath, student, num_rows: int, setup: PassSetup, weighted=None):
    """Values ``[N]`` (compute dtype) and the stats, chunk by chunk.

    With ``weighted = (weights [N], grads)`` each chunk with a nonzero weight also adds its share of the
    gradient of ``sum_i w_i value_i`` to ``grads`` (``zero_grads`` of the student's rows).
    """
    device = student.device
    values = torch.empty(num_rows, dtype=setup.dtype, device=device)
    stats: list[torch.Tensor] | None = None
    steps = list(setup.steps(num_rows, math.buffers if weighted is None else math.eager_buffers))
    # one device sync for the pass, not one per chunk
    live = [True] * len(steps) if weighted is None else _live_chunks(weighted[0], steps)
    for rows, with_grad in zip(steps, live, strict=True):
        chunk_values, chunk_stats = _forward_chunk(math, student, rows, weighted if with_grad else None)
        values[rows] = chunk_values
        if stats is None:
            stats = [torch.empty((num_rows, *s.shape[1:]), dtype=s.dtype, device=device) for s in chunk_stats]
        for dst, src in zip(stats, chunk_stats, strict=True):
            dst[rows] = src
    return values, tuple(stats)


def _to_student(student, grads, rows: slice, grad: torch.Tensor, grad_values: torch.Tensor) -> None:
    """Scale the chunk's ``d value / d z`` ``[c, V]`` by ``grad_values`` ``[c]`` and pass it to the student's
    rows."""
    setup = student.setup
    # the chain rule through z = logits / T, folded into one row scale
    grad.mul_((grad_values.to(setup.dtype) / setup.temperature).unsqueeze(-1))
    # rows outside the loss may hold a nan teacher row: 0 * nan would leak without this
    grad.masked_fill_((grad_values == 0).unsqueeze(-1), 0.0)
    student.accumulate(grads, rows, grad)


def _backward_chunk(math: ChunkMath, student, rows: slice, grad_values: torch.Tensor, grads) -> None:
    grad = math.backward(Chunk(rows, student.log_probs(rows)))
    _to_student(student, grads, rows, grad, grad_values)


class _ChunkedRows(torch.autograd.Function):
    """Values per row with recompute-in-backward; see the module docstring."""

    @staticmethod
    def forward(ctx, math: ChunkMath, setup: PassSetup, matmul_dtype, *tensors):
        """tensors: student logits, or hidden states and head -> values [N] and the math's stats."""
        with torch.autocast(tensors[0].device.type, enabled=False):
            values, stats = _forward_pass(
                math, _student_rows(tensors, setup, matmul_dtype), tensors[0].shape[0], setup
            )
        ctx.save_for_backward(*tensors)
        # never differentiated, so they need no save_for_backward bookkeeping
        ctx.math, ctx.setup, ctx.matmul_dtype = math, setup, matmul_dtype
        ctx.mark_non_differentiable(*stats)
        return (values, *stats)

    @staticmethod
    def backward(ctx, grad_values, *_stat_grads):
        """grad_values [N] -> gradients of the student tensors (None for the rest)."""
        tensors = ctx.saved_tensors
        grads = _recomputed_grads(
            ctx.math, ctx.setup, ctx.matmul_dtype, tensors, ctx.needs_input_grad[3:], grad_values
        )
        return (None, None, None, *grads)


def _recomputed_grads(math: ChunkMath, setup: PassSetup, matmul_dtype, tensors, needed, grad_values):
    """The student tensors' gradients for ``grad_values`` ``[N]`` (d loss / d value_i), recomputing each
    chunk's log-probs; None for a tensor that needs none."""
    if grad_values is None or not any(needed):
        return tuple(None for _ in tensors)
    student = _student_rows(tensors, setup, matmul_dtype)
    grads = student.zero_grads(needed)
    with torch.autocast(tensors[0].device.type, enabled=False):
        for rows in setup.steps(tensors[0].shape[0], math.buffers):
            chunk_grad = grad_values[rows]
            if not bool((chunk_grad != 0).any()):
                continue
            _backward_chunk(math, student, rows, chunk_grad, grads)
    return tuple(grads)


def _live_chunks(weights: torch.Tensor, steps: list[slice]) -> list[bool]:
    """Per row range: does any row have a nonzero weight?"""
    return torch.stack([(weights[rows] != 0).any() for rows in steps]).tolist()


class _ChunkedWeightedSum(torch.autograd.Function):
    """``sum_i w_i value_i`` with its gradient computed in forward, chunk by chunk (module docstring)."""

    @staticmethod
    def forward(ctx, math: ChunkMath, setup: PassSetup, matmul_dtype, weights: torch.Tensor, *tensors):
        """tensors: student logits, or hidden states and head -> the sum, values [N] and the math's stats."""
        student = _student_rows(tensors, setup, matmul_dtype)
        grads = student.zero_grads(ctx.needs_input_grad[4:])
        with torch.autocast(tensors[0].device.type, enabled=False):
            values, stats = _forward_pass(math, student, tensors[0].shape[0], setup, (weights, grads))
        # kept as they are, not saved: backward hands them over instead of reading them
        ctx.grads = grads
        ctx.save_for_backward(weights, *tensors)
        ctx.math, ctx.setup, ctx.matmul_dtype = math, setup, matmul_dtype
        ctx.mark_non_differentiable(values, *stats)
        return (masked_weighted_sum(values, weights), values, *stats)

    @staticmethod
    def backward(ctx, grad_sum, *_other_grads):
        """grad_sum: scalar d loss / d sum -> the student tensors' gradients (None for the rest)."""
        if ctx.grads is not None:
            # handed over, so nothing holds them once the next node is done with them
            grads, ctx.grads = ctx.grads, None
            return (None, None, None, None, *(None if g is None else g.mul_(grad_sum) for g in grads))
        # a second backward through a retained graph: recomputed, as run_chunked's backward does
        weights, *tensors = ctx.saved_tensors
        grad_values = None if grad_sum is None else weights.to(grad_sum.dtype) * grad_sum
        grads = _recomputed_grads(
            ctx.math, ctx.setup, ctx.matmul_dtype, tensors, ctx.needs_input_grad[4:], grad_values
        )
        return (None, None, None, None, *grads)


def _unpack_student(student: Student):
    if isinstance(student, OutputHead):
        return (student.hidden, student.weight), student.matmul_dtype
    return (student,), None


def run_chunked_weighted(
    math: ChunkMath,
    student: Student,
    weights: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``sum_i weights_i value_i`` over the student's rows (differentiable), the values ``[N]`` and stats.

    The weights are known before the values, so the gradient of the sum needs no second pass: each chunk's
    log-probs (the logits matmul of a fused head) and teacher rows are computed once, for the value and the
    gradient together (:meth:`ChunkMath.forward_and_backward`). ``weights`` ``[N]`` are data, never
    differentiated; a row with weight 0 contributes exactly 0 to the sum and the gradient. ``vocab`` as in
    :func:`run_chunked`.
    """
    check_chunk_and_temperature(chunk_size, float(temperature))
    setup = PassSetup(chunk_size, float(temperature), vocab, compute_dtype(student))
    tensors, matmul_dtype = _unpack_student(student)
    weights = weights.detach()
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        total, values, *stats = _ChunkedWeightedSum.apply(math, setup, matmul_dtype, weights, *tensors)
        return total, values, tuple(stats)
    with torch.no_grad():
        rows = _student_rows(tensors, setup, matmul_dtype)
        values, stats = _forward_pass(math, rows, tensors[0].shape[0], setup)
        return masked_weighted_sum(values, weights), values, stats


def run_chunked(
    math: ChunkMath, student: Student, *, chunk_size: int, temperature: float, vocab: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``math`` over the student's rows: values ``[N]`` (differentiable, compute dtype) and stats.

    ``vocab``: the student columns the log-probs span (the first ``vocab`` of ``V_s``). Without autograd
    (no grad mode, or nothing that requires grad) only the forward pass runs.
    """
    check_chunk_and_temperature(chunk_size, float(temperature))
    setup = PassSetup(chunk_size, float(temperature), vocab, compute_dtype(student))
    tensors, matmul_dtype = _unpack_student(student)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        values, *stats = _ChunkedRows.apply(math, setup, matmul_dtype, *tensors)
        return values, tuple(stats)
    with torch.no_grad():
        rows = _student_rows(tensors, setup, matmul_dtype)
        return _forward_pass(math, rows, tensors[0].shape[0], setup)


def masked_weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i d_i over rows with w_i != 0; values, weights [N] -> scalar in the values' dtype.

    The weights are data, never differentiated; masked rows (inf or nan values) cannot leak into the sum.
    """
    weights = weights.detach()
    return torch.where(weights != 0, weights.to(values.dtype) * values, 0.0).sum()


def params_for(fn: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Subset of ``params`` that ``fn`` accepts, so a function without e.g. ``beta`` needs no ``**kwargs``."""
    sig = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig):
        return dict(params)
    names = {p.name for p in sig}
    return {k: v for k, v in params.items() if k in names}

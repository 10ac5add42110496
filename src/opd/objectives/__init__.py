"""The distillation objectives behind one call, whatever teacher signal they read.

- full-vocabulary divergences (``divergences``) read the teacher's logits, cached (``full``) or rebuilt
  chunk by chunk from its cached final hidden states and output head (``hidden``);
- ``forward_kl_topk`` (``topk``) reads the top-k signal;
- the policy-gradient objectives (``policy_gradient``) read the teacher's sampled-token log-probs and the
  rollout log-probs, and also serve GRPO + OPD's task loss (:func:`task_policy_loss`).

All of them run on the chunk engine (``engine``), on student logits or, fused, on the student's final
hidden states and output head, and read the teacher signal of ``teacher_signal``. Every objective returns an
:class:`ObjectiveOutput` with the same per-token diagnostics, so the student step, TIP selection
(``token_selection``) and the metrics do not care which one ran.

Temperature rule: the SAME temperature ``T`` (``opd.temperature``) is applied to student and teacher logits
before the softmax, and the per-token stats (log-probs, entropy) are at that temperature; gradients carry
the ``1 / T`` of the division. Only the policy-gradient ratio uses the rollout temperature.

Vocabulary rule (every signal): when the heads differ in size (padded rows, e.g. 152064 vs 151936, either
way) both sides are cut to the shared first ``V = min(V_s, V_t)`` ids and renormalised there, so student
columns ``>= V`` get exactly zero gradient from the divergence. Only the policy-gradient ratio spans the
student's whole head, the distribution the rollout sampled from. Every token id is ``< V``.

Teacher floor: every objective raises the teacher log-probs it reads to ``TEACHER_LOGP_FLOOR`` and reports
``teacher_floored_fraction``: per token, 1.0 where the token is weighted and the floor raised a teacher
log-prob the objective read (its mean over the loss tokens becomes ``opd/teacher_floored_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from opd.config import OPDConfig
from opd.objectives.divergences import chunked_distill_loss
from opd.objectives.engine import Student, student_device, student_shape
from opd.objectives.policy_gradient import (
    IW_OPD,
    chunked_token_logp,
    iw_opd_advantages,
    iw_opd_prefix_weights,
    policy_gradient_loss,
    sampled_rkl_advantages,
    sampled_token_stats,
)
from opd.objectives.teacher_signal import CachedSignal, floor_teacher_logp
from opd.objectives.topk import chunked_topk_forward_kl


@dataclass(frozen=True)
class ObjectiveContext:
    """Settings every objective may read."""

    config: OPDConfig
    step: int
    """Training step (the PACED schedule depends on it)."""
    rollout_temperature: float
    """Temperature the rollout sampled at: the importance ratio of policy-gradient losses uses it."""
    policy_config: Any = None
    """verl ``ActorConfig`` with an empty ``global_batch_info`` (policy loss mode and clip ratios)."""


@dataclass
class MicroBatchTokens:
    """The response tokens of one micro-batch on the device, packed: ``N = sum R_i``."""

    student: Student
    """The student's rows predicting each response token (with gradient): logits ``[N, V_s]``, or, fused,
    an ``OutputHead`` (final hidden states ``[N, H]`` and the output head ``[V_s, H]``)."""
    token_ids: torch.Tensor
    """``[N]`` long: the response tokens."""
    mask: torch.Tensor
    """``[N]`` float32 loss mask (1 = model token)."""
    lengths: list[int]
    """Response length of each sample."""
    rollout_logp: torch.Tensor | None
    """``[N]`` rollout log-probs at the rollout temperature, or None."""
    chunk_size: int
    rollout_temperature: float

    @property
    def vocab(self) -> int:
        """The student's output rows ``V_s``."""
        return student_shape(self.student)[1]

    @property
    def device(self) -> torch.device:
        return student_device(self.student)

    @cached_property
    def student_logp_at_rollout_temperature(self) -> torch.Tensor:
        """``[N]`` differentiable student log-probs at the rollout temperature (the ratio's numerator).

        Normalised over the student's whole head, padded rows included: the rollout sampled from all of it.
        """
        return chunked_token_logp(
            self.student,
            self.token_ids,
            temperature=self.rollout_temperature,
            chunk_size=self.chunk_size,
            vocab=self.vocab,
        )

    def require_rollout_logp(self, why: str) -> torch.Tensor:
        """The rollout log-probs; a micro-batch with nothing in the loss (padding) may lack them."""
        if self.rollout_logp is None and not bool(self.mask.any()):
            return torch.zeros_like(self.mask)
        if self.rollout_logp is None:
            raise ValueError(
                f"{why} needs the rollout log-probs of the sampled tokens: "
                "set actor_rollout_ref.rollout.calculate_log_probs=true"
            )
        return self.rollout_logp


@dataclass
class ObjectiveOutput:
    """Loss and detached ``[N]`` float32 diagnostics of one micro-batch."""

    loss: torch.Tensor
    divergence: torch.Tensor
    """Per-token divergence (the sampled log-ratio ``s - q`` for policy-gradient objectives)."""
    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    student_entropy: torch.Tensor
    token_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-token values, reported as their mean over loss tokens (``opd/<name>``)."""
    extreme_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token values reported as their min and max over loss tokens (``opd/<name>_min|max``)."""
    mean_metrics: dict[str, float] = field(default_factory=dict)
    """verl policy-loss metrics, already means over this micro-batch's loss tokens."""


def distillation_objective(
    tokens: MicroBatchTokens, cached: CachedSignal, weights: torch.Tensor, ctx: ObjectiveContext
) -> ObjectiveOutput:
    """The configured objective on one micro-batch; ``weights`` [N] are the per-token loss weights."""
    teacher_rows = cached.teacher_rows()
    if teacher_rows is not None:
        return _full_vocabulary(tokens, teacher_rows, weights, ctx)
    if cached.topk is not None:
        return _topk(tokens, cached, weights, ctx)
    return _policy_gradient(tokens, cached, weights, ctx)


def _floored_metric(floored: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``teacher_floored_fraction`` per token: ``floored`` [N] (1.0 / 0.0) on weighted tokens only -> [N]."""
    return {"teacher_floored_fraction": torch.where(weights != 0, floored, 0.0)}


def _shared_vocab(tokens: MicroBatchTokens, cached: CachedSignal) -> int:
    """Ids the divergence compares: the student's output rows, or fewer if the signal covers fewer."""
    return tokens.vocab if cached.vocab is None else min(tokens.vocab, cached.vocab)


def _full_vocabulary(tokens, teacher_rows, weights, ctx) -> ObjectiveOutput:
    config = ctx.config
    # The cached rows stay on the host: the loss brings one chunk of them at a time to the device.
    loss, stats = chunked_distill_loss(
        tokens.student,
        teacher_rows,
        tokens.token_ids,
        weights,
        loss_type=config.loss_type,
        chunk_size=config.chunk_size,
        temperature=config.temperature,
        beta=config.beta,
        loss_params=config.loss_params(ctx.step),
    )
    return ObjectiveOutput(
        loss,
        stats.divergence,
        stats.student_logp,
        stats.teacher_logp,
        stats.student_entropy,
        token_metrics=_floored_metric(stats.teacher_floored, weights),
    )


def _topk(tokens, cached, weights, ctx) -> ObjectiveOutput:
    loss, stats = chunked_topk_forward_kl(
        tokens.student,
        cached.topk.to(tokens.device),
        tokens.token_ids,
        weights,
        chunk_size=ctx.config.chunk_size,
        temperature=ctx.config.temperature,
        vocab_limit=_shared_vocab(tokens, cached),
    )
    teacher_logp, sampled_floored = floor_teacher_logp(cached.sampled_logp.to(tokens.device))
    return ObjectiveOutput(
        loss,
        stats.divergence,
        stats.student_logp,
        teacher_logp,
        stats.student_entropy,
        token_metrics={
            "teacher_topk_mass": stats.teacher_topk_mass,
            "sampled_token_in_topk": stats.sampled_in_topk,
            **_floored_metric(torch.maximum(stats.teacher_floored, sampled_floored), weights),
        },
    )


def _policy_gradient(tokens, cached, weights, ctx) -> ObjectiveOutput:
    config = ctx.config
    student_logp, entropy = sampled_token_stats(
        tokens.student,
        tokens.token_ids,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
        vocab=_shared_vocab(tokens, cached),
    )
    cached_logp = cached.sampled_logp.to(tokens.device).to(student_logp.dtype)
    teacher_logp, floored = floor_teacher_logp(cached_logp)
    rollout_logp = tokens.require_rollout_logp(f"opd.loss_type={config.loss_type}")
    token_metrics, extreme_metrics = {}, {}
    if config.loss_type == IW_OPD:
        raw = iw_opd_advantages(teacher_logp, rollout_logp.to(teacher_logp.dtype), tokens.mask)
        prefix = iw_opd_prefix_weights(
            raw, tokens.lengths, gamma=config.iw_opd_gamma, epsilon=config.iw_opd_epsilon
        )
        advantages = prefix * raw
        token_metrics = {"iw_opd/weight_mean": prefix, "iw_opd/abs_advantage_mean": raw.abs()}
        extreme_metrics = {"iw_opd/weight": prefix}
    else:
        advantages = sampled_rkl_advantages(student_logp, teacher_logp, tokens.mask)
    loss, pg_metrics = policy_gradient_loss(
        tokens.student_logp_at_rollout_temperature,
        rollout_logp,
        advantages.to(torch.float32),
        weights,
        ctx.policy_config,
    )
    return ObjectiveOutput(
        loss,
        student_logp - teacher_logp,
        student_logp,
        teacher_logp,
        entropy,
        token_metrics={
            **token_metrics,
            "pg/advantage_mean": advantages,
            **_floored_metric(floored, weights),
        },
        extreme_metrics=extreme_metrics,
        mean_metrics={f"pg/{key}": value for key, value in pg_metrics.items()},
    )


def task_policy_loss(
    tokens: MicroBatchTokens, advantages: torch.Tensor, weights: torch.Tensor, ctx: ObjectiveContext
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO + OPD's task term: verl's policy loss on the task-reward advantages ``[N]``."""
    rollout_logp = tokens.require_rollout_logp("opd.task_loss_coef > 0")
    loss, metrics = policy_gradient_loss(
        tokens.student_logp_at_rollout_temperature,
        rollout_logp,
        torch.where(tokens.mask.bool(), advantages, 0.0),
        weights,
        ctx.policy_config,
    )
    return loss, {f"task/{key}": value for key, value in metrics.items()}

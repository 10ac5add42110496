"""Phase 2 of the update: student forward, the objective vs the cached teacher signal, one optimizer step."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from opd.batch import OPDBatch, response_token_ids
from opd.console import warn
from opd.model_forward import (
    gathered_head_weight,
    output_head_problem,
    response_hidden_states,
    response_logits,
)
from opd.objectives import (
    MicroBatchTokens,
    ObjectiveContext,
    ObjectiveOutput,
    distillation_objective,
    task_policy_loss,
)
from opd.objectives.engine import OutputHead, Student
from opd.objectives.teacher_signal import CachedSignal
from opd.objectives.token_selection import kept_token_count, tip_keep_mask, tip_scores

logger = logging.getLogger(__name__)

def token_weights(batch: OPDBatch, scale: float) -> torch.Tensor:
    """``[sum R_i]`` float32: loss mask times the sample's reward weight times ``scale``."""
    parts = [
        mask * weight for mask, weight in zip(batch.loss_mask, batch.sample_weights.tolist(), strict=True)
    ]
    return torch.cat(parts) * scale


def global_token_count(micro_batches: list[OPDBatch], dp_group, device, keep_fraction: float = 1.0) -> int:
    """Loss tokens (TIP-kept) of this optimizer step summed over every rank: the token-mean denominator."""
    local = sum(kept_token_count(mask, keep_fraction) for mb in micro_batches for mask in mb.loss_mask)
    count = torch.tensor([local], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=dp_group)
    return int(count.item())


def train_student_step(
    engine,
    micro_batches: list[OPDBatch],
    teacher_signals: list[CachedSignal],
    *,
    ctx: ObjectiveContext,
    pad_token_id: int,
    dp_group,
    device: torch.device,
) -> dict[str, float]:
    """Accumulate gradients over ``micro_batches`` and take one clipped optimizer step.

    The loss is a token mean over the whole global (mini-)batch: each micro-batch contributes
    ``sum_i w_i d_i * dp_size / global_tokens`` because FSDP averages gradients over ranks. Every rank
    runs the same number of forwards and backwards (callers pad with zero-weight micro-batches), so
    collectives match even where a rank holds only padding rows.
    """
    dp_size = dist.get_world_size(group=dp_group)
    global_tokens = global_token_count(micro_batches, dp_group, device, ctx.config.tip_keep_fraction)
    scale = dp_size / max(global_tokens, 1)
    meter = StepMetrics()
    # verl's optimizer_step zeroes gradients only when it skips a step, and train_mode only on exit:
    # without this, step k would apply the summed gradients of mini-batches 1..k.
    engine.optimizer_zero_grad()
    for micro_batch, cached in zip(micro_batches, teacher_signals, strict=True):
        _accumulate_micro_batch(engine, micro_batch, cached, ctx, pad_token_id, scale, device, meter)
    grad_norm = engine.optimizer_step()
    metrics = meter.reduce(dp_group, device)
    metrics.update(
        {"opd/grad_norm": float(grad_norm), "opd/skipped_step": float(not math.isfinite(grad_norm))}
    )
    return metrics


def _accumulate_micro_batch(engine, micro_batch, cached, ctx, pad_token_id, scale, device, meter) -> None:
    """Forward, (TIP selection,) loss, backward of one micro-batch; its metrics go into ``meter``."""
    config = ctx.config
    tokens = _micro_batch_tokens(engine, micro_batch, pad_token_id, device, ctx)
    weights = token_weights(micro_batch, scale).to(device)
    keep = torch.ones_like(weights)
    if config.tip_keep_fraction < 1.0:
        with torch.no_grad():
            # a fresh copy, so no log-prob computed without a graph is cached for the real pass
            probe = distillation_objective(dataclasses.replace(tokens), cached, weights, ctx)
        scores = tip_scores(probe.student_entropy, probe.divergence, config.tip_score)
        keep = tip_keep_mask(scores, micro_batch.loss_mask, config.tip_keep_fraction).to(device)
        weights = weights * keep
    out = distillation_objective(tokens, cached, weights, ctx)
    loss = config.distill_loss_coef * out.loss
    task_metrics = {}
    if config.task_loss_coef > 0:
        task_loss, task_metrics = task_policy_loss(
            tokens, _task_advantages(micro_batch, device), weights, ctx
        )
        loss = loss + config.task_loss_coef * task_loss
    loss.backward()
    meter.add(out, tokens.mask, weights, keep, scale, task_metrics)


def _micro_batch_tokens(engine, micro_batch, pad_token_id, device, ctx) -> MicroBatchTokens:
    rollout_logp = micro_batch.rollout_logp
    return MicroBatchTokens(
        student=student_rows(engine, micro_batch, pad_token_id, device, ctx.config.fused_output_head),
        token_ids=response_token_ids(micro_batch).to(device),
        mask=torch.cat(micro_batch.loss_mask).to(device),
        lengths=[mask.numel() for mask in micro_batch.loss_mask],
        rollout_logp=None if rollout_logp is None else torch.cat(rollout_logp).to(device),
        chunk_size=ctx.config.chunk_size,
        rollout_temperature=ctx.rollout_temperature,
    )


def student_rows(engine, micro_batch: OPDBatch, pad_token_id: int, device, fused: bool) -> Student:
    """The student forward of one micro-batch, up to what the objective differentiates: with ``fused`` (and
    a plain linear head) its final hidden states and gathered output head, else its response logits."""
    if fused and _fused_head_supported(engine.module):
        hidden = response_hidden_states(engine, micro_batch, pad_token_id=pad_token_id)
        # the head's matmul runs in the dtype the model's own head runs in under the engine's autocast
        weight = gathered_head_weight(engine.module, device)
        return OutputHead(hidden, weight, matmul_dtype=engine._autocast_dtype)
    return response_logits(engine, micro_batch, pad_token_id=pad_token_id)


def _fused_head_supported(model) -> bool:
    problem = output_head_problem(model)
    if problem is not None:
        warn(logger, "opd.fused_output_head: the model's own head computes the student logits: %s", problem)
    return problem is None


def _task_advantages(micro_batch: OPDBatch, device) -> torch.Tensor:
    if micro_batch.advantages is None:
        raise ValueError("opd.task_loss_coef > 0 needs the trainer's task-reward advantages in the batch")
    return torch.cat(micro_batch.advantages).to(device)


class StepMetrics:
    """Sums over loss tokens (reported as token means), minima and maxima, reduced over ranks once per step.

    Zero-weight filler micro-batches add nothing, so padding a rank never moves a metric.
    """

    def __init__(self):
        # kept on the device until the step ends: no host sync per metric and micro-batch
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.mins: dict[str, float] = defaultdict(lambda: math.inf)
        self.maxs: dict[str, float] = defaultdict(lambda: -math.inf)

    def add(
        self, out: ObjectiveOutput, mask, weights, keep, scale: float, task_metrics: dict[str, float]
    ) -> None:
        num_tokens = mask.sum().double()
        per_token = {
            "loss": torch.where(weights != 0, weights * out.divergence, 0.0) / scale,
            "sampled_reverse_kl": out.student_logp - out.teacher_logp,
            "teacher_nll": -out.teacher_logp,
            "student_entropy": out.student_entropy,
            "kept_token_fraction": keep,
            **out.token_metrics,
        }
        for key, values in per_token.items():
            self.sums[key] = self.sums[key] + _masked_sum(values, mask)
        for key, value in {**out.mean_metrics, **task_metrics}.items():
            self.sums[key] = self.sums[key] + float(value) * num_tokens
        for key, values in out.extreme_metrics.items():
            # every rank registers every key, even without loss tokens, so the reductions match
            in_loss = values[mask.bool()]
            empty = in_loss.numel() == 0
            self.mins[key] = min(self.mins[key], math.inf if empty else float(in_loss.min()))
            self.maxs[key] = max(self.maxs[key], -math.inf if empty else float(in_loss.max()))
        self.sums["num_tokens"] = self.sums["num_tokens"] + num_tokens

    def reduce(self, dp_group, device) -> dict[str, float]:
        """All-reduce over ``dp_group`` (same keys on every rank) and return ``opd/*`` metrics."""
        keys = sorted(self.sums)
        sums = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(device) for k in keys])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=dp_group)
        totals = dict(zip(keys, sums.tolist(), strict=True))
        num_tokens = totals.pop("num_tokens")
        metrics = {f"opd/{key}": value / max(num_tokens, 1.0) for key, value in totals.items()}
        metrics["opd/num_tokens"] = num_tokens
        for name, values, op in (
            ("min", self.mins, dist.ReduceOp.MIN),
            ("max", self.maxs, dist.ReduceOp.MAX),
        ):
            names = sorted(values)
            if names:
                reduced = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
                dist.all_reduce(reduced, op=op, group=dp_group)
                metrics.update({f"opd/{k}_{name}": v for k, v in zip(names, reduced.tolist(), strict=True)})
        return metrics


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not a product: a masked -inf log-prob must not turn into 0 * inf = NaN
    return torch.where(mask.bool(), values, 0.0).sum().double()

"""Phase 2 of the update: student forward, chunked divergence vs the cached teacher, one optimizer step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from common.batch import OPDBatch, response_token_ids
from opd.config import OPDConfig
from opd.losses import chunked_distill_loss
from opd.model_forward import response_logits

# Sums all-reduced over the data-parallel group, in this order.
_SUM_KEYS = ("loss", "sampled_reverse_kl", "teacher_nll", "student_entropy", "num_tokens")


def token_weights(batch: OPDBatch, scale: float) -> torch.Tensor:
    """``[sum R_i]`` float32: loss mask times the sample's reward weight times ``scale``."""
    parts = [
        mask * weight for mask, weight in zip(batch.loss_mask, batch.sample_weights.tolist(), strict=True)
    ]
    return torch.cat(parts) * scale


def global_token_count(micro_batches: list[OPDBatch], dp_group, device) -> int:
    """Loss tokens of this optimizer step summed over every rank: the token-mean denominator."""
    count = torch.tensor(
        [sum(mb.num_loss_tokens() for mb in micro_batches)], dtype=torch.float64, device=device
    )
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=dp_group)
    return int(count.item())


def train_student_step(
    engine,
    micro_batches: list[OPDBatch],
    teacher_logits: list[torch.Tensor],
    *,
    config: OPDConfig,
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
    global_tokens = global_token_count(micro_batches, dp_group, device)
    scale = dp_size / max(global_tokens, 1)
    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=device)
    for micro_batch, cached in zip(micro_batches, teacher_logits, strict=True):
        sums += _accumulate_micro_batch(engine, micro_batch, cached, config, pad_token_id, scale, device)

    grad_norm = engine.optimizer_step()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=dp_group)
    totals = dict(zip(_SUM_KEYS, sums.tolist(), strict=True))
    denominator = max(totals["num_tokens"], 1.0)
    return {
        "opd/loss": totals["loss"] / denominator,
        "opd/sampled_reverse_kl": totals["sampled_reverse_kl"] / denominator,
        "opd/teacher_nll": totals["teacher_nll"] / denominator,
        "opd/student_entropy": totals["student_entropy"] / denominator,
        "opd/num_tokens": totals["num_tokens"],
        "opd/grad_norm": float(grad_norm),
        "opd/skipped_step": float(not math.isfinite(grad_norm)),
    }


def _accumulate_micro_batch(engine, micro_batch, cached, config, pad_token_id, scale, device) -> torch.Tensor:
    logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
    weights = token_weights(micro_batch, scale).to(device)
    mask = torch.cat(micro_batch.loss_mask).to(device)
    loss, stats = chunked_distill_loss(
        logits,
        cached.to(device, non_blocking=True),
        response_token_ids(micro_batch).to(device),
        weights,
        loss_type=config.loss_type,
        chunk_size=config.chunk_size,
        temperature=config.temperature,
        beta=config.beta,
    )
    loss.backward()
    return torch.stack(
        [
            _masked_sum(weights * stats.divergence, weights != 0) / scale,
            _masked_sum(stats.student_logp - stats.teacher_logp, mask),
            _masked_sum(-stats.teacher_logp, mask),
            _masked_sum(stats.student_entropy, mask),
            mask.sum().double(),
        ]
    )


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not a product: a masked -inf log-prob must not turn into 0 * inf = NaN
    return torch.where(mask.bool(), values, 0.0).sum().double()

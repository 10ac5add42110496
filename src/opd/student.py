"""Phase 2 of the update: student forward, chunked divergence vs the cached teacher, one optimizer step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from common.batch import OPDBatch, response_token_ids
from opd.config import OPDConfig
from opd.losses import chunked_distill_loss
from opd.model_forward import response_logits
from opd.teacher import CachedSignal
from opd.topk_losses import chunked_topk_forward_kl

# Sums all-reduced over the data-parallel group; the last two exist only for the top-k signal.
_SUM_KEYS = ("loss", "sampled_reverse_kl", "teacher_nll", "student_entropy", "num_tokens")
_TOPK_KEYS = ("teacher_topk_mass", "sampled_token_in_topk")


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
    teacher_signals: list[CachedSignal],
    *,
    config: OPDConfig,
    step: int,
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
    keys = _SUM_KEYS + (_TOPK_KEYS if teacher_signals[0].topk is not None else ())
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for micro_batch, cached in zip(micro_batches, teacher_signals, strict=True):
        sums += _accumulate_micro_batch(
            engine, micro_batch, cached, config, step, pad_token_id, scale, device
        )

    grad_norm = engine.optimizer_step()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=dp_group)
    totals = dict(zip(keys, sums.tolist(), strict=True))
    num_tokens = totals.pop("num_tokens")
    metrics = {f"opd/{key}": value / max(num_tokens, 1.0) for key, value in totals.items()}
    metrics.update(
        {
            "opd/num_tokens": num_tokens,
            "opd/grad_norm": float(grad_norm),
            "opd/skipped_step": float(not math.isfinite(grad_norm)),
        }
    )
    return metrics


def _accumulate_micro_batch(
    engine, micro_batch, cached, config, step, pad_token_id, scale, device
) -> torch.Tensor:
    """Forward, loss, backward of one micro-batch; returns its sums in the order of the metric keys."""
    logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
    weights = token_weights(micro_batch, scale).to(device)
    mask = torch.cat(micro_batch.loss_mask).to(device)
    token_ids = response_token_ids(micro_batch).to(device)
    if cached.topk is not None:
        loss, stats = chunked_topk_forward_kl(
            logits,
            cached.topk.to(device),
            token_ids,
            weights,
            chunk_size=config.chunk_size,
            temperature=config.temperature,
            vocab_limit=logits.shape[-1],
        )
        teacher_logp = cached.sampled_logp.to(device)
        topk_sums = [_masked_sum(stats.teacher_topk_mass, mask), _masked_sum(stats.sampled_in_topk, mask)]
    else:
        loss, stats = chunked_distill_loss(
            logits,
            cached.logits.to(device, non_blocking=True),
            token_ids,
            weights,
            loss_type=config.loss_type,
            chunk_size=config.chunk_size,
            temperature=config.temperature,
            beta=config.beta,
            loss_params=config.loss_params(step),
        )
        teacher_logp = stats.teacher_logp
        topk_sums = []
    loss.backward()
    return torch.stack(
        [
            _masked_sum(weights * stats.divergence, weights != 0) / scale,
            _masked_sum(stats.student_logp - teacher_logp, mask),
            _masked_sum(-teacher_logp, mask),
            _masked_sum(stats.student_entropy, mask),
            mask.sum().double(),
            *topk_sums,
        ]
    )


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not a product: a masked -inf log-prob must not turn into 0 * inf = NaN
    return torch.where(mask.bool(), values, 0.0).sum().double()

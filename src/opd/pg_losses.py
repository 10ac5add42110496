"""Sampled-token policy-gradient objectives (``sampled_rkl_pg``, ``iw_opd``) trained with verl's policy loss.

Notation: ``N`` response tokens ``y_t`` packed over the micro-batch, shared vocabulary ``V = min(V_s, V_t)``.
``s_t = log p_student(y_t)`` and ``q_t = log p_teacher(y_t)`` at the distillation temperature ``T``
(``opd.temperature``), both normalised over the shared ids, ``q_t`` raised to the teacher floor of
:mod:`opd.losses` (so a zero-probability teacher token gives a large finite advantage, never inf or NaN);
``r_t`` is the rollout engine's log-prob of ``y_t`` at the rollout temperature ``T_r``; ``s^r_t`` is the
student's log-prob at ``T_r`` over its whole head (what the rollout sampled from), the only quantity with a
gradient. ``opd.objectives`` applies the floor and picks the vocabularies; the functions here take them as
given.

Advantages (detached, discount 0: each token is scored by its own log-ratio):

- ``sampled_rkl_pg``: ``A_t = -(s_t - q_t)``. Its expected policy gradient is the gradient of the reverse
  KL ``KL(p || q)``, estimated from the sampled token only, so the teacher signal is 4 bytes per token.
- ``iw_opd`` (importance-weighted OPD): ``A_t = q_t - r_t`` with the rollout log-prob as baseline, times a
  prefix weight ``w_t = 1 + gamma * (1 - S_{<t} / max(S, eps))`` where ``S_{<t} = sum_{k<t} |A_k|`` is the
  discrepancy accumulated before ``t`` in the same response and ``S`` the response's total. Weights lie in
  ``[1, 1 + gamma]``, never rise along a response, and favour the prefix the student has not yet drifted
  from. ``r_t`` and ``q_t`` must be at the same temperature, so ``iw_opd`` requires ``T = T_r``.

Loss: verl's configured policy loss (``actor.policy_loss.loss_mode``, PPO clip ratios from the actor
config) with ``log_prob = s^r``, ``old_log_prob = r`` (the importance ratio ``exp(s^r_t - r_t)`` at the
rollout temperature, the rule of on-policy PPO) and the project's token weights (loss mask x sample weight x
token-mean normaliser) applied per token. With ``p = q`` every advantage is 0, so loss and gradient are 0.

Memory: ``s^r`` comes from :func:`chunked_token_logp`, a custom autograd function that walks the logits in
chunks of ``chunk_size`` rows and recomputes the chunk's softmax in backward, so no ``[N, V]`` float32
tensor is ever built; :func:`sampled_token_stats` is its no-grad twin for ``s_t`` and the entropy.
"""

from __future__ import annotations

import torch

from opd.losses import _check_chunk_and_temperature, _entropy, _log_probs
from opd.topk_losses import _signal_dtype

SAMPLED_RKL_PG = "sampled_rkl_pg"
IW_OPD = "iw_opd"
PG_OBJECTIVES = (SAMPLED_RKL_PG, IW_OPD)
"""``opd.loss_type`` values of the policy-gradient objectives; their teacher signal is 'sampled'."""

TOKEN_LEVEL_POLICY_LOSSES = ("vanilla",)
"""verl policy-loss modes that act on each token alone, so responses may be packed into one row."""


class _ChunkedTokenLogp(torch.autograd.Function):
    """``log softmax(logits / T)[y]`` per row, chunked in forward and backward."""

    @staticmethod
    def forward(ctx, logits, token_ids, temperature: float, chunk_size: int, vocab: int):
        """logits [N, V_s], token_ids [N] -> [N] float32 (float64 for float64 logits)."""
        out = torch.empty(logits.shape[0], dtype=_signal_dtype(logits), device=logits.device)
        for start in range(0, logits.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            chunk_logp = _log_probs(logits[sl, :vocab], temperature, out.dtype)
            out[sl] = chunk_logp.gather(-1, token_ids[sl].unsqueeze(-1)).squeeze(-1)
            del chunk_logp
        ctx.save_for_backward(logits, token_ids)
        ctx.options = (temperature, chunk_size, vocab)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """d out_i / d z_i = (onehot(y_i) - softmax(z_i / T)) / T on the first V columns, 0 elsewhere."""
        logits, token_ids = ctx.saved_tensors
        temperature, chunk_size, vocab = ctx.options
        grad = torch.zeros_like(logits)
        for start in range(0, logits.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            row_grad = grad_out[sl]
            if not bool((row_grad != 0).any()):
                continue
            with torch.no_grad():
                probs = _log_probs(logits[sl, :vocab], temperature, _signal_dtype(logits)).exp_()
                chunk = probs.neg_().scatter_add_(
                    -1, token_ids[sl].unsqueeze(-1), torch.ones_like(probs[:, :1])
                )
                chunk.mul_((row_grad.to(chunk.dtype) / temperature).unsqueeze(-1))
            grad[sl, :vocab].copy_(chunk)
            del probs, chunk
        return grad, None, None, None, None


def chunked_token_logp(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float, chunk_size: int, vocab: int
) -> torch.Tensor:
    """Differentiable ``log p(token_ids[i])`` at temperature T over the first ``vocab`` columns.

    logits ``[N, V_s]``, token_ids ``[N]`` (every id < vocab) -> ``[N]`` float32 (float64 for float64 logits).
    """
    _check_chunk_and_temperature(chunk_size, float(temperature))
    if tuple(token_ids.shape) != (logits.shape[0],):
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected ({logits.shape[0]},)")
    return _ChunkedTokenLogp.apply(logits, token_ids.long(), float(temperature), chunk_size, vocab)


@torch.no_grad()
def sampled_token_stats(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float, chunk_size: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(log p(token_ids[i]), entropy_i)`` at temperature T; [N, V_s], [N] -> two [N] float32."""
    dtype = _signal_dtype(logits)
    logp = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
    entropy = torch.empty_like(logp)
    for start in range(0, logits.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        chunk_logp = _log_probs(logits[sl, :vocab], float(temperature), dtype)
        logp[sl] = chunk_logp.gather(-1, token_ids[sl].long().unsqueeze(-1)).squeeze(-1)
        entropy[sl] = _entropy(chunk_logp)
        del chunk_logp
    return logp, entropy


def sampled_rkl_advantages(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``A_t = -(s_t - q_t)`` on masked-in tokens, exactly 0 elsewhere; three [N] -> [N], detached."""
    return torch.where(mask.bool(), teacher_logp - student_logp, 0.0).detach()


def iw_opd_advantages(
    teacher_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``A_t = q_t - r_t`` on masked-in tokens, exactly 0 elsewhere; three [N] -> [N], detached."""
    return torch.where(mask.bool(), teacher_logp - rollout_logp, 0.0).detach()


def iw_opd_prefix_weights(
    advantages: torch.Tensor, lengths: list[int], *, gamma: float, epsilon: float
) -> torch.Tensor:
    """``w_t = 1 + gamma * (1 - S_{<t} / max(S, eps))`` per response; advantages [N] (0 off-mask) -> [N].

    ``lengths`` are the response lengths of the packed samples (they sum to N). ``S_{<t}`` excludes the
    current token, so the first token of every response gets ``1 + gamma``.
    """
    if sum(lengths) != advantages.shape[0]:
        raise ValueError(
            f"response lengths sum to {sum(lengths)}, advantages have {advantages.shape[0]} rows"
        )
    weights = []
    for discrepancy in advantages.detach().abs().split(list(lengths)):
        before = discrepancy.cumsum(0) - discrepancy
        total = discrepancy.sum().clamp_min(epsilon)
        weights.append(1.0 + gamma * (1.0 - before / total))
    return torch.cat(weights) if weights else advantages.new_zeros(0)


def policy_gradient_loss(
    student_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    policy_config,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's configured policy loss, summed with per-token weights; five [N] inputs -> (scalar, metrics).

    Args:
        student_logp: ``s^r`` at the rollout temperature, with gradient.
        rollout_logp: ``r``, the rollout engine's log-probs (the importance ratio's denominator).
        advantages: detached per-token advantages.
        token_weights: loss mask x sample weight x normaliser; a 0 removes the token exactly.
        policy_config: verl's ``ActorConfig`` (``policy_loss.loss_mode``, one of
            ``TOKEN_LEVEL_POLICY_LOSSES``; clip ratios); its ``global_batch_info`` must be empty because
            ``token_weights`` already normalise.
    """
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    if policy_config.global_batch_info:
        raise ValueError("policy_config.global_batch_info must be empty: token_weights carry the normaliser")
    mask = token_weights != 0
    loss, metrics = get_policy_loss_fn(policy_config.policy_loss.loss_mode)(
        old_log_prob=torch.where(mask, rollout_logp, 0.0),
        log_prob=student_logp,
        advantages=torch.where(mask, advantages, 0.0),
        response_mask=mask.to(student_logp.dtype),
        loss_agg_mode="token-sum",
        config=policy_config,
        rollout_is_weights=token_weights.to(student_logp.dtype),
    )
    return loss, {key.removeprefix("actor/"): float(value) for key, value in metrics.items()}

"""Sampled-token policy-gradient objectives (``sampled_rkl_pg``, ``iw_opd``) trained with verl's policy loss.

Notation: ``N`` response tokens ``y_t`` packed over the micro-batch, shared vocabulary ``V = min(V_s, V_t)``.
``s_t = log p_student(y_t)`` and ``q_t = log p_teacher(y_t)`` at the distillation temperature ``T``
(``opd.temperature``), both normalised over the shared ids, ``q_t`` raised to the teacher floor (so a
zero-probability teacher token gives a large finite advantage, never inf or NaN); ``r_t`` is the rollout
engine's log-prob of ``y_t`` at the rollout temperature ``T_r``; ``s^r_t`` is the student's log-prob at
``T_r`` over its whole head (what the rollout sampled from), the only quantity with a gradient.
``opd.objectives`` applies the floor and picks the vocabularies; the functions here take them as given.

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

``s^r`` comes from :func:`chunked_token_logp` and ``s_t`` with the entropy from its no-grad twin
:func:`sampled_token_stats`, both on the chunk engine (one ``[chunk, V]`` buffer, two for the entropy).
"""

from __future__ import annotations

import torch

from opd.objectives.engine import Chunk, ChunkMath, Student, entropy_, gather_rows, run_chunked, student_shape

SAMPLED_RKL_PG = "sampled_rkl_pg"
IW_OPD = "iw_opd"
PG_OBJECTIVES = (SAMPLED_RKL_PG, IW_OPD)
"""``opd.loss_type`` values of the policy-gradient objectives; their teacher signal is 'sampled'."""

TOKEN_LEVEL_POLICY_LOSSES = ("vanilla",)
"""verl policy-loss modes that act on each token alone, so responses may be packed into one row."""


class _SampledToken(ChunkMath):
    """``log p(y_i)`` per row; its gradient ``onehot(y_i) - p_i`` is built in the log-probs' own buffer."""

    buffers = 1

    def __init__(self, token_ids: torch.Tensor):
        self.token_ids = token_ids

    def forward(self, chunk: Chunk):
        return gather_rows(chunk.student_logp, self.token_ids[chunk.rows]), ()

    def backward(self, chunk: Chunk) -> torch.Tensor:
        ids = self.token_ids[chunk.rows].long().unsqueeze(-1)
        probs = chunk.student_logp.exp_()
        return probs.neg_().scatter_add_(-1, ids, torch.ones(ids.shape, dtype=probs.dtype, device=ids.device))


class _SampledTokenStats(ChunkMath):
    """``log p(y_i)`` (values) and the entropy (stat) per row, no gradient."""

    def __init__(self, token_ids: torch.Tensor):
        self.token_ids = token_ids

    def forward(self, chunk: Chunk):
        logp = chunk.student_logp
        sampled = gather_rows(logp, self.token_ids[chunk.rows])
        return sampled, (entropy_(logp, chunk.new_buffer()),)


def _check_token_ids(student: Student, token_ids: torch.Tensor) -> None:
    rows = student_shape(student)[0]
    if tuple(token_ids.shape) != (rows,):
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected ({rows},)")


def chunked_token_logp(
    student: Student, token_ids: torch.Tensor, *, temperature: float, chunk_size: int, vocab: int
) -> torch.Tensor:
    """Differentiable ``log p(token_ids[i])`` at temperature T over the first ``vocab`` student columns.

    student logits ``[N, V_s]`` or an :class:`~opd.objectives.engine.OutputHead`, token_ids ``[N]`` (every
    id < vocab) -> ``[N]`` float32 (float64 for float64 student rows).
    """
    _check_token_ids(student, token_ids)
    values, _ = run_chunked(
        _SampledToken(token_ids.long()), student, chunk_size=chunk_size, temperature=temperature, vocab=vocab
    )
    return values


@torch.no_grad()
def sampled_token_stats(
    student: Student, token_ids: torch.Tensor, *, temperature: float, chunk_size: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(log p(token_ids[i]), entropy_i)`` at temperature T; student rows ``N``, [N] -> two [N]."""
    _check_token_ids(student, token_ids)
    logp, (entropy,) = run_chunked(
        _SampledTokenStats(token_ids), student, chunk_size=chunk_size, temperature=temperature, vocab=vocab
    )
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

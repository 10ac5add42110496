"""Build the distillation batch from what the rollout produced.

The rollout (verl's agent loop) emits, per sample, the prompt ids, the response ids with model and tool
tokens interleaved, and ``response_mask`` (1 = model-generated, 0 = tool output or padding). The student
is trained on exactly those tokens: the sequence fed to both models is ``prompt + response`` verbatim,
and only positions with ``response_mask == 1`` enter the loss. A teacher with its own prompt per row
(privileged context, ``opd.teacher_prompt``) reads ``teacher prompt + the same response``; rows of the
two sides are aligned on the response tokens, never on absolute positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.console import warn

logger = logging.getLogger(__name__)


class OverlengthError(ValueError):
    """A sample is longer than ``opd.max_length`` and the policy is 'error'."""


@dataclass
class OPDBatch:
    """Samples ready for the teacher and student forwards (no padding anywhere)."""

    input_ids: list[torch.Tensor]
    """Per sample ``[L_i]`` long: prompt followed by response."""

    prompt_lengths: torch.Tensor
    """``[B]`` long: where each response starts inside ``input_ids``."""

    loss_mask: list[torch.Tensor]
    """Per sample ``[R_i]`` float32: 1 where the response token is in the loss (model tokens only)."""

    sample_weights: torch.Tensor
    """``[B]`` float32: reward weights (1 when reward weighting is off)."""

    num_truncated: int = 0
    """Samples whose response tail was cut to fit ``max_length``."""

    rollout_logp: list[torch.Tensor] | None = None
    """Per sample ``[R_i]`` float32: the rollout engine's log-prob of each response token (at the rollout
    temperature), aligned with the response of its own row; None when the rollout did not return them."""

    advantages: list[torch.Tensor] | None = None
    """Per sample ``[R_i]`` float32: task-reward (e.g. GRPO) advantages per response token, or None."""

    teacher_input_ids: list[torch.Tensor] | None = None
    """Per sample ``[L'_i]`` long: the teacher's own prompt followed by this row's response tokens;
    None when the teacher reads the student's prompt."""

    teacher_prompt_lengths: torch.Tensor | None = None
    """``[B]`` long: where each response starts inside ``teacher_input_ids``; None with it."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_loss_tokens(self) -> int:
        """Response tokens that count in the loss."""
        return int(sum(m.sum().item() for m in self.loss_mask))

    def select(self, rows: Sequence[int]) -> OPDBatch:
        """A sub-batch with the given rows (used to split into micro-batches)."""
        rows = list(rows)
        teacher_lengths = self.teacher_prompt_lengths
        return OPDBatch(
            input_ids=[self.input_ids[r] for r in rows],
            prompt_lengths=self.prompt_lengths[rows],
            loss_mask=[self.loss_mask[r] for r in rows],
            sample_weights=self.sample_weights[rows],
            num_truncated=0,
            rollout_logp=_pick(self.rollout_logp, rows),
            advantages=_pick(self.advantages, rows),
            teacher_input_ids=_pick(self.teacher_input_ids, rows),
            teacher_prompt_lengths=None if teacher_lengths is None else teacher_lengths[rows],
        )

    def zero_weight_copy(self) -> OPDBatch:
        """Same shapes, nothing in the loss: lets a rank run a collective-matching no-op micro-batch."""
        out = self.select(range(len(self)))
        out.loss_mask = [torch.zeros_like(m) for m in out.loss_mask]
        return out

    def teacher_view(self) -> OPDBatch:
        """The batch as the teacher reads it: its own prompts, the same responses, masks and weights.

        ``response_logits(engine, batch.teacher_view(), ...)`` then returns teacher rows that line up one
        to one with the student's ``[sum R_i, V]`` rows. Without teacher prompts this is the batch itself.

        Raises:
            ValueError: if a row's teacher response tokens differ from the student's.
        """
        if self.teacher_input_ids is None:
            return self
        student = [ids[p:] for ids, p in zip(self.input_ids, self.prompt_lengths.tolist(), strict=True)]
        teacher_starts = self.teacher_prompt_lengths.tolist()
        for index, (ids, start, response) in enumerate(
            zip(self.teacher_input_ids, teacher_starts, student, strict=True)
        ):
            if not torch.equal(ids[start:], response):
                raise ValueError(
                    f"sample {index}: the teacher's response tokens differ from the student's "
                    f"({ids.numel() - start} vs {response.numel()} tokens); both must score the same response"
                )
        return OPDBatch(
            input_ids=self.teacher_input_ids,
            prompt_lengths=self.teacher_prompt_lengths,
            loss_mask=self.loss_mask,
            sample_weights=self.sample_weights,
            num_truncated=self.num_truncated,
            rollout_logp=self.rollout_logp,
            advantages=self.advantages,
        )


def build_opd_batch(
    responses: Sequence[torch.Tensor],
    response_mask: Sequence[torch.Tensor],
    *,
    prompts: Sequence[torch.Tensor] | None = None,
    raw_prompts: Sequence[list[dict]] | None = None,
    tokenizer=None,
    rollout_n: int = 1,
    max_length: int | None = None,
    overlength: str = "truncate",
    sample_weights: torch.Tensor | None = None,
    rollout_log_probs: Sequence[torch.Tensor] | None = None,
    advantages: Sequence[torch.Tensor] | None = None,
    teacher_prompts: Sequence[torch.Tensor] | None = None,
) -> OPDBatch:
    """Assemble :class:`OPDBatch` from pre-tokenized prompts (preferred) or raw chat prompts.

    Args:
        responses: per sample ``[R_i]`` token ids, model and tool tokens interleaved, kept verbatim.
        response_mask: per sample ``[R_i]``, 1 = model token (in the loss), 0 = tool output / padding.
        prompts: per prompt ``[P_i]`` token ids exactly as the rollout saw them.
        raw_prompts: chat messages per prompt, used only when ``prompts`` is None; templated with
            ``add_generation_prompt=True`` and never re-applied to the response, so tool tokens stay.
        rollout_n: responses per prompt. When there are ``n`` times more responses than prompts,
            prompt ``k`` is repeated for responses ``k*n .. k*n+n-1``.
        max_length: cap on prompt + response tokens, counted on the longer of the student's and the
            teacher's prompt.
        overlength: 'truncate' cuts the response tail, identically on both sides (counted in
            ``num_truncated`` and logged); 'error' raises :class:`OverlengthError`.
        sample_weights: ``[B]`` per-sample loss weights; defaults to ones.
        rollout_log_probs: per sample ``[R_i]`` rollout log-probs of the response tokens, one row per
            sample (never columns of a padded batch, so rows with different prompt lengths stay aligned).
        advantages: per sample ``[R_i]`` task-reward advantages.
        teacher_prompts: the teacher's own ``[P'_i]`` prompt ids per prompt or per sample (repeated like
            ``prompts``), already templated with the teacher's tokenizer; None = the student's prompt.
            The teacher reads ``teacher prompt + the student's response tokens``.
    """
    prompt_ids = _repeat_prompts(_resolve_prompts(prompts, raw_prompts, tokenizer), len(responses), rollout_n)
    teacher_ids = None
    if teacher_prompts is not None:
        teacher_ids = [torch.as_tensor(p, dtype=torch.long) for p in teacher_prompts]
        teacher_ids = _repeat_prompts(teacher_ids, len(responses), rollout_n)
    if len(response_mask) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(response_mask)} response masks")

    input_ids, teacher_input_ids, loss_masks, truncated = [], [], [], 0
    for index, (prompt, response, mask) in enumerate(zip(prompt_ids, responses, response_mask, strict=True)):
        if response.numel() != mask.numel():
            raise ValueError(f"sample {index}: response has {response.numel()} tokens, mask {mask.numel()}")
        teacher_prompt = None if teacher_ids is None else teacher_ids[index]
        side, prompt_len = _longer_prompt(index, prompt, teacher_prompt)
        keep = _kept_response_length(index, side, prompt_len, response.numel(), max_length, overlength)
        truncated += keep < response.numel()
        kept_response = response[:keep].long()
        input_ids.append(torch.cat([prompt.long(), kept_response]))
        if teacher_prompt is not None:
            teacher_input_ids.append(torch.cat([teacher_prompt, kept_response]))
        loss_masks.append(mask[:keep].to(torch.float32))

    if truncated:
        warn(
            logger,
            "truncated the response tail of %d sample(s) to opd.max_length=%s (OPD_MAX_LENGTH); every "
            "step's count is in opd/truncated_samples",
            truncated,
            max_length,
        )
    weights = torch.ones(len(responses)) if sample_weights is None else sample_weights.to(torch.float32)
    if weights.shape != (len(responses),):
        raise ValueError(f"sample_weights has shape {tuple(weights.shape)}, expected ({len(responses)},)")
    kept = [mask.numel() for mask in loss_masks]
    return OPDBatch(
        input_ids=input_ids,
        prompt_lengths=_lengths(prompt_ids),
        loss_mask=loss_masks,
        sample_weights=weights,
        num_truncated=truncated,
        rollout_logp=_per_token_field("rollout_log_probs", rollout_log_probs, responses, kept),
        advantages=_per_token_field("advantages", advantages, responses, kept),
        teacher_input_ids=None if teacher_ids is None else teacher_input_ids,
        teacher_prompt_lengths=None if teacher_ids is None else _lengths(teacher_ids),
    )


def _lengths(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([row.numel() for row in rows], dtype=torch.long)


def _per_token_field(name, values, responses, kept) -> list[torch.Tensor] | None:
    """Check a per-token field has one value per response token and cut it like the response."""
    if values is None:
        return None
    if len(values) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(values)} rows of {name}")
    out = []
    for index, (row, response, keep) in enumerate(zip(values, responses, kept, strict=True)):
        if row.numel() != response.numel():
            raise ValueError(f"sample {index}: response has {response.numel()} tokens, {name} {row.numel()}")
        out.append(row[:keep].to(torch.float32))
    return out


def _pick(rows_of: list[torch.Tensor] | None, rows: list[int]) -> list[torch.Tensor] | None:
    return None if rows_of is None else [rows_of[r] for r in rows]


def _resolve_prompts(prompts, raw_prompts, tokenizer) -> list[torch.Tensor]:
    if prompts is not None:
        return [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if raw_prompts is None:
        raise ValueError("build_opd_batch needs pre-tokenized prompts or raw_prompts")
    if tokenizer is None:
        raise ValueError("the raw-prompt fallback needs a tokenizer to apply the chat template")
    return [
        torch.as_tensor(chat_prompt_ids(tokenizer, messages), dtype=torch.long) for messages in raw_prompts
    ]


def chat_prompt_ids(tokenizer, messages, **template_kwargs) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header, as the rollout templates it."""
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, **template_kwargs
    )
    # transformers 5 returns a BatchEncoding here; older versions a plain list
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def _repeat_prompts(prompt_ids: list[torch.Tensor], num_responses: int, rollout_n: int) -> list[torch.Tensor]:
    if len(prompt_ids) == num_responses:
        return prompt_ids
    if len(prompt_ids) * rollout_n == num_responses:
        return [p for p in prompt_ids for _ in range(rollout_n)]
    raise ValueError(
        f"{len(prompt_ids)} prompts do not match {num_responses} responses (rollout.n={rollout_n})"
    )


def _longer_prompt(index: int, prompt: torch.Tensor, teacher_prompt: torch.Tensor | None) -> tuple[str, int]:
    """(which side, length) of the longer prompt; both must be non-empty."""
    sides = [("prompt", prompt.numel())]
    if teacher_prompt is not None:
        sides.append(("teacher prompt", teacher_prompt.numel()))
    for side, length in sides:
        if length == 0:
            raise ValueError(f"sample {index}: empty {side} (the first response token needs a prefix)")
    return max(sides, key=lambda item: item[1])


def _kept_response_length(
    index: int, side: str, prompt_len: int, response_len: int, max_length, overlength
) -> int:
    if max_length is None or prompt_len + response_len <= max_length:
        return response_len
    if overlength == "error":
        raise OverlengthError(
            f"sample {index}: {side} {prompt_len} + response {response_len} tokens exceed "
            f"opd.max_length={max_length} (set opd.overlength=truncate to cut the tail instead)"
        )
    if prompt_len >= max_length:
        raise OverlengthError(
            f"sample {index}: the {side} alone ({prompt_len}) reaches opd.max_length={max_length}"
        )
    return max_length - prompt_len


def response_logit_rows(batch: OPDBatch, row_width: int | None = None) -> torch.Tensor:
    """Rows of the model's flattened output that predict each response token: ``[sum R_i]`` long, in
    sample order.

    The output at position ``t`` predicts token ``t + 1``, so response token ``j`` of sample ``i`` is
    predicted by row ``offset_i + P_i - 1 + j``. Packed (remove-padding, ``row_width`` None), the samples
    follow each other in ``[sum L_i, D]``; padded, sample ``i`` starts at ``i * row_width`` of
    ``[B * row_width, D]``.
    """
    rows, offset = [], 0
    for ids, prompt_len, mask in zip(
        batch.input_ids, batch.prompt_lengths.tolist(), batch.loss_mask, strict=True
    ):
        start = offset + prompt_len - 1
        rows.append(torch.arange(start, start + mask.numel(), dtype=torch.long))
        offset += ids.numel() if row_width is None else row_width
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def response_token_ids(batch: OPDBatch) -> torch.Tensor:
    """``[sum R_i]`` long: the response tokens, aligned with :func:`response_logit_rows`."""
    parts = [ids[p:] for ids, p in zip(batch.input_ids, batch.prompt_lengths.tolist(), strict=True)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def micro_batch_rows(batch_size: int, micro_batch_size: int) -> list[range]:
    """Consecutive row ranges of at most ``micro_batch_size`` rows."""
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    return [range(s, min(s + micro_batch_size, batch_size)) for s in range(0, batch_size, micro_batch_size)]

"""Held-out distillation metrics, computed inside the worker with the training engines.

* ``val-opd/reverse_kl``: the student samples its own answers to fixed prompts (fixed seed); the exact
  full-vocabulary KL(student || teacher) per token, averaged over those tokens.
* ``val-opd/teacher_answer_nll``: the student's negative log-likelihood per token of the teacher's own
  greedy answers. A student that "reduces" its KL by collapsing (whitespace, repeated digits) makes this
  rise, so it is printed beside the KL.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from opd.batch import OPDBatch, build_opd_batch, micro_batch_rows, response_token_ids
from opd.config import OPDConfig
from opd.devices import current_device
from opd.model_forward import response_logits
from opd.objectives.divergences import chunked_distill_loss
from opd.teacher import run_teacher_phase


@torch.no_grad()
def evaluate_held_out(
    student,
    teacher,
    prompts,
    *,
    config: OPDConfig,
    eos_token_id,
    pad_token_id,
    micro_batch_size: int,
    teacher_answers=None,
    teacher_prompts=None,
    final_answer_ids=(),
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Return the ``val-opd/*`` metrics and the teacher's greedy answers.

    Forwards run ``micro_batch_size`` answers at a time, the training micro-batch size.

    The teacher is frozen and answers greedily, so its answers are the same at every evaluation:
    pass back the returned ones as ``teacher_answers`` to skip generating them again.

    ``teacher_prompts`` (privileged context): the teacher answers, and scores every answer, from its own
    prompt, and the teacher-trace gaps are added (see :func:`_trace_gaps`); ``final_answer_ids`` are the
    token ids (digits) whose last run in a trace is its final answer.
    """
    started = time.perf_counter()
    student_answers = _generate(student, prompts, config, eos_token_id, pad_token_id, sample=True)
    if teacher_answers is None:
        teacher_answers = _generate(
            teacher,
            teacher_prompts or prompts,
            config,
            eos_token_id,
            pad_token_id,
            sample=False,
            vocab_limit=_output_rows(student),
        )
    own = _split(_answer_batch(prompts, student_answers, teacher_prompts), micro_batch_size)
    teachers = _split(_answer_batch(prompts, teacher_answers, teacher_prompts), micro_batch_size)
    views = [mb.teacher_view() for mb in own + teachers]
    cache = [s.logits for s in run_teacher_phase(teacher, views, pad_token_id=pad_token_id).signals]

    reverse = _divergence_sums(student, own, cache[: len(own)], "reverse_kl", config, pad_token_id)
    forward = _divergence_sums(
        student, teachers, cache[len(own) :], "forward_kl", config, pad_token_id, final_answer_ids
    )
    metrics = {
        "val-opd/reverse_kl": reverse["divergence"] / max(reverse["tokens"], 1.0),
        "val-opd/forward_kl": forward["divergence"] / max(forward["tokens"], 1.0),
        "val-opd/teacher_answer_nll": forward["nll"] / max(forward["tokens"], 1.0),
        "val-opd/student_answer_tokens": reverse["tokens"] / max(len(prompts), 1),
        "val-opd/seconds": time.perf_counter() - started,
    }
    if teacher_prompts is not None:
        metrics.update(_trace_gaps(forward))
    return metrics, teacher_answers


def _trace_gaps(sums: dict[str, float]) -> dict[str, float]:
    """Teacher-trace gaps (seed 004): on the teacher's greedy traces under its privileged prompt, the
    student's NLL per token under the normal prompt minus the teacher's under the privileged prompt, over
    every trace token and over the final-answer tokens (the last run of digits of each trace)."""
    return {
        "val-opd/teacher_trace_nll_gap": (sums["nll"] - sums["teacher_nll"]) / max(sums["tokens"], 1.0),
        "val-opd/final_answer_gap": (sums["final_nll"] - sums["final_teacher_nll"])
        / max(sums["final_tokens"], 1.0),
    }


def _output_rows(engine) -> int:
    return int(engine.model_config.hf_config.vocab_size)


def _generate(
    engine, prompts, config, eos_token_id, pad_token_id, *, sample: bool, vocab_limit: int | None = None
) -> list[torch.Tensor]:
    """Answers up to and including the first eos; left-padded batched generation with a fixed seed.

    ``vocab_limit``: ids at or above it are never generated (a teacher's padded output rows, which the
    student cannot embed).
    """
    rows = _output_rows(engine)
    suppressed = list(range(vocab_limit, rows)) if vocab_limit is not None and rows > vocab_limit else None
    device = current_device()
    width = max(p.numel() for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - prompt.numel() :] = prompt
        attention_mask[row, width - prompt.numel() :] = 1
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.val_seed)
    with engine.eval_mode():
        output = engine.module.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=sample,
            temperature=config.temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            max_new_tokens=config.val_max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
            synced_gpus=dist.is_initialized() and dist.get_world_size() > 1,
            suppress_tokens=suppressed,
        )
    torch.random.set_rng_state(generator_state)
    return [_cut_after_eos(row[width:].cpu(), eos_token_id) for row in output]


def _cut_after_eos(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    hits = (tokens == eos_token_id).nonzero()
    return tokens[: int(hits[0]) + 1] if hits.numel() else tokens


def _answer_batch(prompts, answers, teacher_prompts=None) -> OPDBatch:
    # an empty answer still needs one position; it is masked out
    answers = [a if a.numel() else torch.zeros(1, dtype=torch.long) for a in answers]
    masks = [torch.ones(a.numel()) if a.numel() else torch.zeros(1) for a in answers]
    return build_opd_batch(
        responses=answers, response_mask=masks, prompts=prompts, teacher_prompts=teacher_prompts
    )


def _split(batch: OPDBatch, micro_batch_size: int) -> list[OPDBatch]:
    return [batch.select(rows) for rows in micro_batch_rows(len(batch), micro_batch_size)]


def _divergence_sums(
    student, micro_batches, cached, loss_type, config, pad_token_id, final_answer_ids=()
) -> dict[str, float]:
    """Sums over the answers' tokens of the divergence, both models' NLL, and both NLLs on the final
    answer (the last run of ``final_answer_ids`` in each answer)."""
    device = current_device()
    sums = dict.fromkeys(("divergence", "nll", "teacher_nll", "tokens"), 0.0)
    sums.update(dict.fromkeys(("final_nll", "final_teacher_nll", "final_tokens"), 0.0))
    with student.eval_mode():
        for micro_batch, teacher_logits in zip(micro_batches, cached, strict=True):
            mask = torch.cat(micro_batch.loss_mask).to(device)
            token_ids = response_token_ids(micro_batch).to(device)
            _, stats = chunked_distill_loss(
                response_logits(student, micro_batch, pad_token_id=pad_token_id),
                teacher_logits,
                token_ids,
                mask,
                loss_type=loss_type,
                chunk_size=config.chunk_size,
                temperature=config.temperature,
            )
            _check_active(stats, mask)
            final = _final_answer_mask(micro_batch, final_answer_ids).to(device) * mask
            for name, logp in (("nll", stats.student_logp), ("teacher_nll", stats.teacher_logp)):
                sums[name] += float(torch.where(mask.bool(), -logp, 0.0).sum())
                sums[f"final_{name}"] += float(torch.where(final.bool(), -logp, 0.0).sum())
            sums["divergence"] += float(torch.where(mask.bool(), stats.divergence, 0.0).sum())
            sums["tokens"] += float(mask.sum())
            sums["final_tokens"] += float(final.sum())
    return sums


def _check_active(stats, mask: torch.Tensor) -> None:
    """Every active token has a finite log-prob on both sides: a missing one is an error, never padded."""
    active = mask.bool()
    for name, logp in (("student", stats.student_logp), ("teacher", stats.teacher_logp)):
        if logp.shape != mask.shape or not torch.isfinite(logp[active]).all():
            raise RuntimeError(
                f"held-out evaluation: {name} log-probs missing or not finite on active tokens"
            )


def _final_answer_mask(batch: OPDBatch, final_answer_ids) -> torch.Tensor:
    """``[sum R_i]`` 1 on the last run of ``final_answer_ids`` tokens of each answer (its final number)."""
    parts = []
    wanted = torch.tensor(sorted(final_answer_ids), dtype=torch.long)
    for ids, start in zip(batch.input_ids, batch.prompt_lengths.tolist(), strict=True):
        answer = ids[start:]
        hits = torch.isin(answer, wanted).tolist()
        mark = torch.zeros(answer.numel())
        end = max((i for i, hit in enumerate(hits) if hit), default=None)
        if end is not None:
            begin = end
            while begin > 0 and hits[begin - 1]:
                begin -= 1
            mark[begin : end + 1] = 1
        parts.append(mark)
    return torch.cat(parts)

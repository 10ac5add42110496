"""Batched Hugging Face ``generate`` with the sampling semantics an RL rollout needs.

Pure torch + transformers (no Ray, no verl), so it is unit-testable in-process:

* samples from the whole distribution at the requested temperature; top-k / top-p only when asked
  for (``generate`` would otherwise add its default ``top_k=50``, or a model's own sampling
  defaults from ``generation_config.json``);
* greedy when the temperature is 0 or ``do_sample`` is false;
* stops a response at its first eos or ``stop_token_ids`` token and keeps that token, as vLLM
  returns a stop token id in the response tokens;
* returns the log-probability of every sampled token under ``log_softmax(logits / T)`` over the
  full vocabulary - the same quantity verl's actor computes at the rollout temperature (T = 1 for
  greedy);
* left-pads a batch of prompts and passes explicit position ids (cumulative attention mask - 1,
  clamped at 0), the convention of verl's training forward, so a prompt gets the same tokens
  whether it is generated alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingSpec:
    """Decoding rule for one request; requests with equal specs can share a batch.

    ``top_k == 0`` and ``top_p == 1.0`` mean "off". ``temperature`` is the temperature used for
    the returned log-probs (1.0 when greedy). ``stop_token_ids`` end a response like the model's
    eos tokens do.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()

    @classmethod
    def from_params(cls, params: Mapping, *, force_greedy: bool = False) -> SamplingSpec:
        """Read vLLM-style sampling params (``top_k=-1`` / ``None`` = off, ``temperature=0`` = greedy)."""
        temperature = params.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        greedy = force_greedy or temperature <= 0.0 or params.get("do_sample") is False
        top_k = params.get("top_k")
        top_p = params.get("top_p")
        penalty = params.get("repetition_penalty")
        return cls(
            greedy=greedy,
            temperature=1.0 if greedy else temperature,
            top_k=0 if greedy or top_k is None or int(top_k) <= 0 else int(top_k),
            top_p=1.0 if greedy or top_p is None or float(top_p) >= 1.0 else float(top_p),
            repetition_penalty=1.0 if penalty is None else float(penalty),
            stop_token_ids=frozenset(int(t) for t in params.get("stop_token_ids") or ()),
        )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate`` that pin down every sampling knob."""
        kwargs = {"repetition_penalty": self.repetition_penalty}
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            # top_k=0 / top_p=1.0 are passed explicitly: a missing value is filled from the
            # model's or transformers' defaults (top_k=50), which would truncate the distribution.
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


@dataclass
class Generation:
    """One response: token ids (ending with the eos or stop token when one was hit), their log-probs,
    and whether one was hit."""

    token_ids: list[int]
    log_probs: list[float]
    hit_eos: bool


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(input_ids, attention_mask)`` of shape (batch, longest)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as in verl's training forward: cumulative mask - 1, clamped at 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _trim(tokens: list[int], log_probs: list[float], limit: int, eos: set[int]) -> Generation:
    """Cut one row at its first eos (kept) or at its own token limit."""
    for i, token in enumerate(tokens[:limit]):
        if token in eos:
            return Generation(tokens[: i + 1], log_probs[: i + 1], hit_eos=True)
    return Generation(tokens[:limit], log_probs[:limit], hit_eos=False)


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    spec: SamplingSpec,
    max_new_tokens: int | Sequence[int],
    *,
    eos_token_ids: Iterable[int],
    pad_token_id: int,
) -> list[Generation]:
    """Generate a response for every prompt in one left-padded ``model.generate`` call.

    Args:
        model: a transformers causal LM (its ``generation_config`` sampling fields are overridden).
        prompts: token-id lists of any lengths.
        spec: decoding rule shared by the whole batch.
        max_new_tokens: one limit for all prompts or one per prompt; the batch runs to the largest
            and each row is cut at its own limit, which is equivalent to stopping it there.
        eos_token_ids: ids that end a response (kept as the last response token), together with
            ``spec.stop_token_ids``.
        pad_token_id: id used for left padding and for rows that finished early.

    Returns:
        One :class:`Generation` per prompt, in order.

    Memory: raw logits of every step are kept until the batch ends (``batch x steps x vocab``
    floats), fine for the small models this CPU backend targets.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or min(limits) < 1:
        raise ValueError(f"need one max_new_tokens >= 1 per prompt, got {limits}")
    eos = {int(t) for t in eos_token_ids} | spec.stop_token_ids
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        max_new_tokens=max(limits),
        eos_token_id=sorted(eos),
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
        **spec.generate_kwargs(),
    )
    new_tokens = out.sequences[:, input_ids.shape[1] :]
    # (batch, steps, vocab) -> log-probs of the sampled tokens at the rollout temperature
    logits = torch.stack(out.logits, dim=1).float() / spec.temperature
    log_probs = F.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return [
        _trim(new_tokens[row].tolist(), log_probs[row].tolist(), limits[row], eos)
        for row in range(len(prompts))
    ]


def reset_generation_config(model) -> None:
    """Drop sampling defaults a checkpoint ships (top_k, repetition_penalty, ...), keep token ids.

    ``generate`` fills every knob not passed explicitly from ``model.generation_config``; a rollout
    must sample exactly what the trainer configured, so only bos / eos / pad survive.
    """
    from transformers import GenerationConfig

    old = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=getattr(old, "bos_token_id", None),
        eos_token_id=getattr(old, "eos_token_id", None),
        pad_token_id=getattr(old, "pad_token_id", None),
    )

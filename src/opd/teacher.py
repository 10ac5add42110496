"""The frozen teacher: a forward-only verl FSDP engine, and phase 1 of the update (teacher signal to CPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from common.batch import OPDBatch, response_token_ids
from opd.model_forward import response_logits
from opd.topk_losses import TopKSignal, teacher_sampled_logp, teacher_topk_signal


@dataclass(frozen=True)
class SignalSpec:
    """What the teacher phase keeps per response token: the signal the loss needs, nothing more."""

    kind: str = "full"
    """'full': bf16 logits over the teacher's whole vocabulary (2 * V bytes per token);
    'topk': top-k ids and log-probs, a tail bucket and the sampled token's log-prob (k * 8 + 8 bytes);
    'sampled': the sampled token's log-prob only (4 bytes)."""

    topk: int = 64
    """Entries per token of the 'topk' signal."""

    temperature: float = 1.0
    """Temperature of the 'topk' and 'sampled' log-probs: the loss temperature, as on the student side."""

    chunk_size: int = 1024
    """Tokens per chunk when turning logits into the 'topk' signal."""

    vocab_limit: int | None = None
    """Student output rows: the 'topk' and 'sampled' log-probs are normalised over the first
    ``min(V_t, vocab_limit)`` ids, the ones both heads have, whichever head is larger."""


@dataclass
class CachedSignal:
    """The teacher signal of one micro-batch, on the host."""

    logits: torch.Tensor | None = None
    """'full': ``[sum R_i, V_t]`` bf16 (pinned when a GPU exists)."""

    topk: TopKSignal | None = None
    """'topk': ids ``[sum R_i, k]``, log-probs ``[sum R_i, k]`` and tail ``[sum R_i]``."""

    sampled_logp: torch.Tensor | None = None
    """'topk' and 'sampled': ``[sum R_i]`` teacher log-prob of each sampled token."""

    vocab: int | None = None
    """'topk' and 'sampled': the ids their log-probs are normalised over, ``min(V_t, V_s)``; None for a
    signal built over the student's own rows. The student side renormalises on the same ids."""

    def num_bytes(self) -> int:
        parts = [self.logits, self.sampled_logp] + (
            [self.topk.ids, self.topk.logp, self.topk.tail_logp] if self.topk is not None else []
        )
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def num_tokens(self) -> int:
        return self.logits.shape[0] if self.logits is not None else self.sampled_logp.shape[0]


@dataclass
class TeacherCache:
    """Teacher signal for every micro-batch of one update, held in host memory."""

    signals: list[CachedSignal]

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes() for s in self.signals)

    @property
    def bytes_per_token(self) -> float:
        """Host bytes per cached response position (``opd/cache_bytes_per_token``)."""
        return self.num_bytes / max(sum(s.num_tokens() for s in self.signals), 1)


def build_teacher_engine(model_config, engine_config, optimizer_config, checkpoint_config):
    """Build the teacher from its own model config (its own path and tokenizer).

    The engine is built as a normal verl FSDP engine with parameter offload, so it can be onloaded once
    for all of phase 1 and offloaded after it (verl's forward-only mode would instead stream weights
    from host memory on every forward). It keeps no optimizer and its parameters never need grads.
    """
    from verl.workers.engine import EngineRegistry

    teacher_engine_config = dataclasses.replace(
        engine_config,
        param_offload=True,
        optimizer_offload=True,
        offload_policy=False,
        model_dtype="bfloat16",
    )
    engine = EngineRegistry.new(
        model_type="language_model",
        backend=teacher_engine_config.strategy,
        model_config=model_config,
        engine_config=teacher_engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=checkpoint_config,
    )
    engine.initialize()
    engine.optimizer = None
    engine.lr_scheduler = None
    engine.checkpoint_manager = None
    for param in engine.module.parameters():
        param.requires_grad_(False)
    return engine


@torch.no_grad()
def run_teacher_phase(
    engine, micro_batches: list[OPDBatch], *, pad_token_id: int, spec: SignalSpec = SignalSpec()
) -> TeacherCache:
    """Phase 1: onload the teacher, forward every micro-batch, keep the signal on the host, offload."""
    signals = []
    with engine.eval_mode():
        for micro_batch in micro_batches:
            logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
            signals.append(_to_host_signal(logits, response_token_ids(micro_batch), spec))
            del logits
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    _free_device_memory()
    return TeacherCache(signals=signals)


def _to_host_signal(logits: torch.Tensor, token_ids: torch.Tensor, spec: SignalSpec) -> CachedSignal:
    if spec.kind == "full":
        pin = torch.cuda.is_available()
        host = torch.empty(logits.shape, dtype=torch.bfloat16, pin_memory=pin)
        host.copy_(logits, non_blocking=pin)
        return CachedSignal(logits=host)
    rows = logits.shape[-1]
    vocab = rows if spec.vocab_limit is None else min(rows, spec.vocab_limit)
    options = dict(temperature=spec.temperature, chunk_size=spec.chunk_size, vocab_limit=vocab)
    sampled = teacher_sampled_logp(logits, token_ids.to(logits.device), **options).cpu()
    if spec.kind == "sampled":
        return CachedSignal(sampled_logp=sampled, vocab=vocab)
    topk = teacher_topk_signal(logits, spec.topk, **options).to("cpu")
    return CachedSignal(topk=topk, sampled_logp=sampled, vocab=vocab)


def _free_device_memory() -> None:
    from verl.utils.memory_utils import aggressive_empty_cache

    aggressive_empty_cache(force_sync=True)

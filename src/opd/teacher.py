"""The frozen teacher: a forward-only verl FSDP engine, and phase 1 of the update (teacher signal to CPU)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from opd.batch import OPDBatch, response_token_ids
from opd.console import WARNING_TAG
from opd.devices import current_device
from opd.model_forward import (
    gathered_head_weight,
    output_head_problem,
    response_hidden_states,
    response_logits,
)
from opd.objectives.teacher_signal import CachedSignal, SignalKind, SignalSpec, signal_from_logits, to_host

logger = logging.getLogger(__name__)


@dataclass
class TeacherCache:
    """Teacher signal for every micro-batch of one update, held in host memory (but the 'hidden' signal's
    output head, on the device)."""

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


def choose_signal(config, engine) -> str:
    """The signal the teacher phase caches for ``config`` (an ``OPDConfig``) with this teacher engine.

    The full-vocabulary divergences read the teacher's logits either way; 'hidden' gives them exactly, at
    2 * H instead of 2 * V host bytes per token, whenever the output head is a plain linear map. Left unset,
    they therefore get 'hidden' for such a head and 'full' otherwise, with the reason logged; a 'hidden' that
    was asked for by name and cannot be exact is refused.
    """
    from opd.config import OPDConfigError

    kind = config.teacher_signal
    if kind not in (SignalKind.FULL, SignalKind.HIDDEN) or (
        kind == SignalKind.FULL and config.teacher_signal_given
    ):
        return kind
    problem = output_head_problem(engine.module)
    if problem is None:
        return SignalKind.HIDDEN
    if config.teacher_signal_given:
        raise OPDConfigError(f"opd.teacher_signal=hidden cannot give exact teacher logits: {problem}")
    # once per run (at launch), so not through console.warn's once-per-process filter
    logger.warning(
        f"{WARNING_TAG} teacher signal: full bf16 logits (2 * V bytes per token), not hidden states: %s",
        problem,
    )
    return SignalKind.FULL


@torch.no_grad()
def run_teacher_phase(
    engine, micro_batches: list[OPDBatch], *, pad_token_id: int, spec: SignalSpec | None = None
) -> TeacherCache:
    """Phase 1: onload the teacher, forward every micro-batch, keep the signal on the host, offload.

    ``spec``: the signal to keep; None keeps the full logits.
    """
    spec = SignalSpec() if spec is None else spec
    with engine.eval_mode():
        if spec.kind == SignalKind.HIDDEN:
            signals = _hidden_signals(engine, micro_batches, pad_token_id)
        else:
            signals = [_logit_signal(engine, mb, pad_token_id, spec) for mb in micro_batches]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    _free_device_memory()
    return TeacherCache(signals=signals)


def _logit_signal(engine, micro_batch: OPDBatch, pad_token_id: int, spec: SignalSpec) -> CachedSignal:
    logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
    return signal_from_logits(logits, response_token_ids(micro_batch), spec)


def _hidden_signals(engine, micro_batches: list[OPDBatch], pad_token_id: int) -> list[CachedSignal]:
    """Hidden states of every micro-batch to the host, then the output head, gathered once onto the device.

    The head is gathered after the forwards, so it is not on the device while they run.
    """
    problem = output_head_problem(engine.module)
    if problem is not None:
        raise ValueError(f"the hidden teacher signal needs a plain linear output head: {problem}")
    hidden = [to_host(response_hidden_states(engine, mb, pad_token_id=pad_token_id)) for mb in micro_batches]
    head = gather_output_head(engine.module)
    return [CachedSignal(hidden=rows, head=head) for rows in hidden]


def gather_output_head(model) -> torch.Tensor:
    """The output head's weight as one plain bf16 tensor on the compute device: ``[V_t, H]``.

    Gathered whole on every rank (a collective), while the teacher is onloaded. A fresh copy, never a view
    of the parameter, so offloading the teacher afterwards leaves it in place.
    """
    weight = gathered_head_weight(model, current_device())
    return weight.detach().to(dtype=torch.bfloat16, copy=True)


def _free_device_memory() -> None:
    from verl.utils.memory_utils import aggressive_empty_cache

    aggressive_empty_cache(force_sync=True)

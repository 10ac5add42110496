"""The frozen teacher: a forward-only verl FSDP engine, and phase 1 of the update (teacher signal to CPU)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from common.batch import OPDBatch, response_token_ids
from opd.devices import current_device
from opd.losses import CachedLogits, HiddenTimesHead, TeacherRows
from opd.model_forward import response_hidden_states, response_logits
from opd.topk_losses import TopKSignal, teacher_sampled_logp, teacher_topk_signal

logger = logging.getLogger(__name__)

FULL = "full"
HIDDEN = "hidden"

# Config keys of Hugging Face models that transform the logits after the output head, with the values that
# leave them alone. A transform before the head (e.g. a scaled hidden state) needs no entry: the hidden
# signal caches the head's input, whatever produced it.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_scale": (None, 1, 1.0),  # Cohere: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / scaling
}


@dataclass(frozen=True)
class SignalSpec:
    """What the teacher phase keeps per response token: the signal the loss needs, nothing more."""

    kind: str = FULL
    """'full': bf16 logits over the teacher's whole vocabulary (2 * V bytes per token);
    'hidden': bf16 final hidden states (2 * H bytes per token), the logits rebuilt in the loss with the
    teacher's output head, which stays on the device for the student phase;
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

    hidden: torch.Tensor | None = None
    """'hidden': ``[sum R_i, H]`` bf16 final hidden states (pinned when a GPU exists)."""

    head: torch.Tensor | None = None
    """'hidden': the teacher's output head weight ``[V_t, H]`` bf16 on the device, one tensor shared by every
    micro-batch of the update. Not host memory, so not in :meth:`num_bytes`."""

    topk: TopKSignal | None = None
    """'topk': ids ``[sum R_i, k]``, log-probs ``[sum R_i, k]`` and tail ``[sum R_i]``."""

    sampled_logp: torch.Tensor | None = None
    """'topk' and 'sampled': ``[sum R_i]`` teacher log-prob of each sampled token."""

    vocab: int | None = None
    """'topk' and 'sampled': the ids their log-probs are normalised over, ``min(V_t, V_s)``; None for a
    signal built over the student's own rows. The student side renormalises on the same ids."""

    def num_bytes(self) -> int:
        """Host bytes of the signal."""
        parts = [self.logits, self.hidden, self.sampled_logp] + (
            [self.topk.ids, self.topk.logp, self.topk.tail_logp] if self.topk is not None else []
        )
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def num_tokens(self) -> int:
        rows = next(t for t in (self.logits, self.hidden, self.sampled_logp) if t is not None)
        return rows.shape[0]

    def teacher_rows(self) -> TeacherRows | None:
        """The full-vocabulary teacher logits ('full' or 'hidden') for the loss; None for other signals."""
        if self.logits is not None:
            return CachedLogits(self.logits)
        if self.hidden is not None:
            return HiddenTimesHead(self.hidden, self.head)
        return None


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
    if kind not in (FULL, HIDDEN) or (kind == FULL and config.teacher_signal_given):
        return kind
    problem = hidden_signal_problem(engine.module)
    if problem is None:
        return HIDDEN
    if config.teacher_signal_given:
        raise OPDConfigError(f"opd.teacher_signal=hidden cannot give exact teacher logits: {problem}")
    logger.warning("teacher signal: full bf16 logits (2 * V bytes per token), not hidden states: %s", problem)
    return FULL


def hidden_signal_problem(model) -> str | None:
    """Why ``final hidden state @ head^T`` would not be the teacher's logits; None when it is.

    ``model``: the teacher's (FSDP2-sharded) Hugging Face causal LM.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return "the teacher runs under FSDP1 (strategy fsdp), whose flat parameters hold no gatherable head"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output head is a {type(head).__name__}, not a linear layer"
    if head.bias is not None:
        return "its output head has a bias"
    configs = [model.config, getattr(model.config, "text_config", None)]
    for key, neutral in _LOGIT_TRANSFORMS.items():
        for config in filter(None, configs):
            value = getattr(config, key, None)
            if value not in neutral:
                return f"its config sets {key}={value}, a transform of the logits after the output head"
    return None


@torch.no_grad()
def run_teacher_phase(
    engine, micro_batches: list[OPDBatch], *, pad_token_id: int, spec: SignalSpec = SignalSpec()
) -> TeacherCache:
    """Phase 1: onload the teacher, forward every micro-batch, keep the signal on the host, offload."""
    with engine.eval_mode():
        if spec.kind == HIDDEN:
            signals = _hidden_signals(engine, micro_batches, pad_token_id)
        else:
            signals = [_logit_signal(engine, mb, pad_token_id, spec) for mb in micro_batches]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    _free_device_memory()
    return TeacherCache(signals=signals)


def _logit_signal(engine, micro_batch: OPDBatch, pad_token_id: int, spec: SignalSpec) -> CachedSignal:
    logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
    return _to_host_signal(logits, response_token_ids(micro_batch), spec)


def _hidden_signals(engine, micro_batches: list[OPDBatch], pad_token_id: int) -> list[CachedSignal]:
    """Hidden states of every micro-batch to the host, then the output head, gathered once onto the device.

    The head is gathered after the forwards, so it is not on the device while they run.
    """
    problem = hidden_signal_problem(engine.module)
    if problem is not None:
        raise ValueError(f"the hidden teacher signal needs a plain linear output head: {problem}")
    hidden = [_to_host(response_hidden_states(engine, mb, pad_token_id=pad_token_id)) for mb in micro_batches]
    head = gather_output_head(engine.module)
    return [CachedSignal(hidden=rows, head=head) for rows in hidden]


def gather_output_head(model) -> torch.Tensor:
    """The output head's weight as one plain bf16 tensor on the compute device: ``[V_t, H]``.

    Under FSDP2 the weight is a sharded DTensor (the embedding's, with tied embeddings): every rank gathers
    it whole, a collective, so every rank calls this at the same point, while the teacher is onloaded. A
    fresh copy, never a view of the parameter, so offloading the teacher afterwards leaves it in place.
    """
    from torch.distributed.tensor import DTensor

    weight = model.get_output_embeddings().weight
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return weight.detach().to(device=current_device(), dtype=torch.bfloat16, copy=True)


def _to_host(rows: torch.Tensor) -> torch.Tensor:
    """A bf16 host copy of ``rows`` [n, D], pinned when a GPU exists (the loss copies chunks back async)."""
    pin = torch.cuda.is_available()
    host = torch.empty(rows.shape, dtype=torch.bfloat16, pin_memory=pin)
    return host.copy_(rows, non_blocking=pin)


def _to_host_signal(logits: torch.Tensor, token_ids: torch.Tensor, spec: SignalSpec) -> CachedSignal:
    if spec.kind == FULL:
        return CachedSignal(logits=_to_host(logits))
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

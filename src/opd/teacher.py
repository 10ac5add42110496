"""The frozen teacher: a forward-only verl FSDP engine, and phase 1 of the update (teacher signal to CPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from common.batch import OPDBatch
from opd.model_forward import response_logits


@dataclass
class TeacherCache:
    """Teacher signal for every micro-batch of one update, held in host memory."""

    logits: list[torch.Tensor]
    """Per micro-batch ``[sum R_i, V_t]`` bf16 on CPU (pinned when a GPU exists)."""

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.logits)

    @property
    def bytes_per_token(self) -> float:
        """Host bytes per cached response position (2 * V for full bf16 logits)."""
        return self.num_bytes / max(sum(t.shape[0] for t in self.logits), 1)


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
def run_teacher_phase(engine, micro_batches: list[OPDBatch], *, pad_token_id: int) -> TeacherCache:
    """Phase 1: onload the teacher, forward every micro-batch, keep response logits on CPU, offload."""
    pin = torch.cuda.is_available()
    cached = []
    with engine.eval_mode():
        for micro_batch in micro_batches:
            logits = response_logits(engine, micro_batch, pad_token_id=pad_token_id)
            host = torch.empty(logits.shape, dtype=torch.bfloat16, pin_memory=pin)
            host.copy_(logits, non_blocking=pin)
            cached.append(host)
            del logits
        if pin:
            torch.cuda.synchronize()
    _free_device_memory()
    return TeacherCache(logits=cached)


def _free_device_memory() -> None:
    from verl.utils.memory_utils import aggressive_empty_cache

    aggressive_empty_cache(force_sync=True)

"""The rollout server: a Ray actor that owns a Hugging Face model and batches generate requests.

verl's agent loops call ``server.generate.remote(prompt_ids=..., sampling_params=...,
request_id=...)`` once per sample, concurrently. The server queues those calls, waits a few
milliseconds for more to arrive, and runs each group of requests with equal sampling rules as one
left-padded batch (see ``hf_generate``). Generation runs in a worker thread so the actor keeps
accepting requests, and under a lock that weight updates also take, so a batch never sees half
old and half new weights.

Memory: the server keeps its own copy of the weights for the whole run; sleep / wake-up are
no-ops because on a CPU host there is no device memory to hand back to the trainer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from .hf_generate import Generation, SamplingSpec, generate_batch, reset_generation_config

logger = logging.getLogger(__name__)

# How long the first request of a batch waits for company. Agent-loop requests of one training
# step arrive within milliseconds of each other; one extra forward pass costs far more.
BATCH_WINDOW_S = 0.02


@dataclass
class _Request:
    prompt_ids: list[int]
    spec: SamplingSpec
    max_new_tokens: int
    future: asyncio.Future = field(repr=False)


def _torch_dtype(name: str) -> torch.dtype:
    from verl.utils.torch_dtypes import PrecisionType

    return PrecisionType.to_dtype(name)


def _attn_implementation(model_config) -> str:
    """``sdpa`` unless ``eager`` was asked for: flash-attention kernels need a GPU."""
    requested = (model_config.override_config or {}).get("attn_implementation", "sdpa")
    return "eager" if requested == "eager" else "sdpa"


def _eos_token_ids(model_config) -> set[int]:
    """Every id that ends a response: the generation config's eos list plus the tokenizer's eos."""
    ids: set[int] = set()
    for source in (model_config.generation_config, model_config.hf_config, model_config.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError(f"no eos token id found for {model_config.local_path}")
    return ids


def _pad_token_id(model_config, eos_ids: set[int]) -> int:
    tokenizer = model_config.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return int(pad) if pad is not None else min(eos_ids)


class HFRolloutServer:
    """Token-in / token-out generation server with the interface verl's rollout replicas expose.

    Args:
        config: the rollout config (``verl.workers.config.RolloutConfig``).
        model_config: the model config (``HFModelConfig`` or its OmegaConf form).
        replica_rank: index of the replica this server belongs to.
        address: the key under which verl's load balancer registers this server.
    """

    def __init__(self, config, model_config, replica_rank: int, address: str):
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        if not isinstance(model_config, HFModelConfig):
            model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.config = omega_conf_to_dataclass(config)
        self.replica_rank = replica_rank
        self.address = address
        self.global_steps = None
        self.eos_token_ids = _eos_token_ids(model_config)
        self.pad_token_id = _pad_token_id(model_config, self.eos_token_ids)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_config.local_path,
            dtype=_torch_dtype(self.config.dtype),
            attn_implementation=_attn_implementation(model_config),
            trust_remote_code=model_config.trust_remote_code,
        ).eval()
        reset_generation_config(self.model)
        self._queue: list[_Request] = []
        self._runner: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ generation

    def _max_new_tokens(self, prompt_len: int, sampling_params: dict) -> int:
        """vLLM server's rule: explicit ``max_tokens`` else the response budget, within the context."""
        cfg = self.config
        context = cfg.max_model_len or cfg.prompt_length + cfg.response_length
        room = context - prompt_len
        if room < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a context of {context}")
        limit = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
        if limit is None:
            limit = min(cfg.response_length, cfg.prompt_length + cfg.response_length - prompt_len)
        return max(1, min(int(limit), room))

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict,
        request_id: str,
        image_data=None,
        video_data=None,
        **kwargs,
    ):
        """Generate one response; returns verl's ``TokenOutput`` (log-probs when ``logprobs`` is set).

        The response ends at the model's eos or at any of ``sampling_params["stop_token_ids"]``, that
        token included (vLLM's rule); requests with different stop tokens run in separate batches.
        """
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None:
            raise NotImplementedError("the HF rollout serves text-only models")
        prompt_ids = [int(t) for t in prompt_ids]
        spec = SamplingSpec.from_params(sampling_params, force_greedy=not self.config.do_sample)
        limit = self._max_new_tokens(len(prompt_ids), sampling_params)
        request = _Request(prompt_ids, spec, limit, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        result: Generation = await request.future
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    def _take_batch(self) -> list[_Request]:
        """Pop the oldest request and every queued one with the same sampling spec."""
        spec = self._queue[0].spec
        limit = self.config.max_num_seqs
        batch = [r for r in self._queue if r.spec == spec][:limit]
        taken = {id(r) for r in batch}
        self._queue = [r for r in self._queue if id(r) not in taken]
        return batch

    async def _drain(self) -> None:
        await asyncio.sleep(BATCH_WINDOW_S)
        while self._queue:
            batch = self._take_batch()
            try:
                async with self._lock:
                    results = await asyncio.to_thread(self._run_batch, batch)
            except Exception as exc:  # hand the error to every waiting caller
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():  # the caller may have been cancelled meanwhile
                    request.future.set_result(result)

    def _run_batch(self, batch: list[_Request]) -> list[Generation]:
        return generate_batch(
            self.model,
            [r.prompt_ids for r in batch],
            batch[0].spec,
            [r.max_new_tokens for r in batch],
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )

    # ------------------------------------------------------------------ weights

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy a bucket of ``(hf_name, tensor)`` pairs into the model (waits for running batches)."""
        async with self._lock:
            await asyncio.to_thread(self._copy_weights, named_tensors)

    @torch.no_grad()
    def _copy_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        # state_dict lists tied weights under both names, so lm_head / embed_tokens both resolve
        state = self.model.state_dict(keep_vars=True)
        unknown = [name for name, _ in named_tensors if name not in state]
        if unknown:
            raise KeyError(f"rollout model has no weights named {unknown[:5]} ({len(unknown)} unknown)")
        for name, tensor in named_tensors:
            state[name].data.copy_(tensor.to(state[name].dtype))

    async def set_global_steps(self, global_steps: int) -> None:
        """Record the trainer step whose weights are loaded; returned in every ``TokenOutput``."""
        self.global_steps = global_steps

    async def get_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the current weights (for tests of the weight sync)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    async def get_server_address(self) -> str:
        return self.address

    # ------------------------------------------------------------------ lifecycle (no-ops on CPU)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None  # generate() builds a fresh cache per batch

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reject_request: bool = False) -> dict:
        """Running batches cannot be interrupted; queued ones finish normally (sync trainers only)."""
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

"""verl glue for the Hugging Face rollout: a ``RolloutReplica`` and a ``BaseRollout`` adapter.

How verl uses them (async / agent-loop rollout, the only mode verl 0.9.1 has):

* ``LLMServerManager`` builds one :class:`HFRolloutReplica` per rollout replica (``rollout.name``
  looked up in ``RolloutReplicaRegistry``); ``launch_servers`` starts one
  :class:`~common.cpu_backend.hf_server.HFRolloutServer` actor per replica, named so the training
  processes can find it. Agent-loop workers send ``generate`` calls to it through verl's load
  balancer.
* Each training process (``ActorRolloutRefWorker`` with a rollout role) builds an
  :class:`HFServerAdapter` (``rollout.name`` looked up in ``_ROLLOUT_REGISTRY``). After every
  update step verl calls ``adapter.update_weights(generator)``; the adapter streams the trained
  weights to its replica's server in buckets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable

import ray
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica

from .hf_server import HFRolloutServer

logger = logging.getLogger(__name__)

SERVER_NAME_PREFIX = "hf_rollout_server"


def server_actor_name(replica_rank: int, kind: str = "", suffix: str = "") -> str:
    """Ray actor name of the server of one replica (``kind``: "", "reward_" or "teacher_")."""
    return f"{SERVER_NAME_PREFIX}_{kind}{replica_rank}{suffix}"


async def _aiter(items: Iterable | AsyncIterator) -> AsyncIterator:
    """Iterate a sync or async iterable (engines yield either)."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class HFRolloutReplica(RolloutReplica):
    """One rollout replica served by a single :class:`HFRolloutServer` actor."""

    def _kind(self) -> str:
        if self.is_reward_model:
            return "reward_"
        if self.is_teacher_model:
            return "teacher_"
        return ""

    async def _node_of_first_worker(self) -> str | None:
        if not self.workers:
            return None
        return await self.workers[0].__ray_call__.remote(
            lambda _self: ray.get_runtime_context().get_node_id()
        )

    async def launch_servers(self) -> None:
        """Start the server next to this replica's workers; verl reads the handle and address."""
        name = server_actor_name(self.replica_rank, self._kind(), self.name_suffix)
        options = {"name": name, "num_cpus": 0, "max_concurrency": self.max_concurrency}
        node_id = await self._node_of_first_worker()
        if node_id is not None:
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=True
            )
        server = (
            ray.remote(HFRolloutServer)
            .options(**options)
            .remote(
                config=self.config,
                model_config=self.model_config,
                replica_rank=self.replica_rank,
                address=name,
            )
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = await server.get_server_address.remote()


class HFServerAdapter(BaseRollout):
    """Rollout handle inside a training process: forwards trained weights to the HF server.

    Only the first rank of each replica talks to the server, but every rank drains the weight
    generator: the FSDP engine all-gathers each full tensor inside it, a collective all ranks must
    join.
    """

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        cfg = self.config
        replica_size = (
            cfg.tensor_model_parallel_size * cfg.data_parallel_size * cfg.pipeline_model_parallel_size
        )
        rank = int(os.environ.get("RANK", "0"))
        self.replica_rank = rank // replica_size if replica_rank == -1 else replica_rank
        self.is_leader_rank = rank % replica_size == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """Weights and cache stay resident on CPU; nothing to bring back."""
        return None

    async def release(self) -> None:
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs) -> None:
        """Send ``(name, tensor)`` pairs to the server in buckets of ``update_weights_bucket_megabytes``."""
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"HF rollout supports wire_format='named_tensors' only, got {wire_format!r}"
            )
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("HF rollout cannot load LoRA adapters; set model.lora.merge=True")
        server = self._server_handle() if self.is_leader_rank else None
        bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        bucket, size = [], 0
        async for name, tensor in _aiter(weights):
            if server is None:
                continue
            bucket.append((name, tensor.detach().to("cpu")))
            size += tensor.nbytes
            if size >= bucket_bytes:
                await server.update_weights.remote(bucket)
                bucket, size = [], 0
        if server is None:
            return
        if bucket:
            await server.update_weights.remote(bucket)
        global_steps = kwargs.get("global_steps")
        if global_steps is not None:
            await server.set_global_steps.remote(global_steps)

    def generate_sequences(self, prompts):
        raise NotImplementedError("verl 0.9.1 generates through the async server; see HFRolloutServer")


def load_replica_class() -> type[HFRolloutReplica]:
    """Loader for ``RolloutReplicaRegistry`` (it stores loaders, not classes)."""
    return HFRolloutReplica


__all__ = [
    "HFRolloutReplica",
    "HFRolloutServer",
    "HFServerAdapter",
    "load_replica_class",
    "server_actor_name",
]

"""Build the OPD worker in-process (no Ray) on tiny random models, for worker-level tests."""

from __future__ import annotations

import os
import socket

import torch
from tensordict import TensorDict

STUDENT_LAYERS, TEACHER_LAYERS = 2, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_opd_config(student: str, teacher: str, *extra: str):
    """The full trainer config, with the CPU backend's overrides, as ``python -m opd.main_opd`` builds it."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    from common import cpu_backend

    overrides = [
        *cpu_backend.cpu_hydra_overrides(),
        f"actor_rollout_ref.model.path={student}",
        f"opd.teacher_model_path={teacher}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "opd.chunk_size=8",
        *extra,
    ]
    with initialize_config_module(config_module="opd.config", version_base=None):
        config = compose(config_name="opd_trainer", overrides=overrides)
    with open_dict(config):
        config.actor_rollout_ref.opd = config.opd
    OmegaConf.resolve(config)
    return config


def make_worker(config, *, rank: int = 0, world_size: int = 1, port: int | None = None):
    """An initialised ``OPDActorRolloutWorker`` with role ``actor`` in this process."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
        VERL_PLATFORM="cpu",
    )
    from common import cpu_backend

    cpu_backend.activate()
    from opd.worker import OPDActorRolloutWorker

    worker = OPDActorRolloutWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def rollout_batch(num_samples: int, *, seed: int = 0, vocab: int = 259, mini_batch_size: int = 4) -> TensorDict:
    """What verl's agent loop stores per sample: jagged prompts, responses and response masks."""
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    prompts, responses, masks = [], [], []
    for _ in range(num_samples):
        prompt_len = int(torch.randint(3, 9, (1,), generator=generator))
        response_len = int(torch.randint(4, 12, (1,), generator=generator))
        prompts.append(torch.randint(3, vocab, (prompt_len,), generator=generator))
        responses.append(torch.randint(3, vocab, (response_len,), generator=generator))
        mask = torch.ones(response_len, dtype=torch.long)
        mask[1:3] = 0  # a tool span
        masks.append(mask)
    data = TensorDict(
        {
            "prompts": torch.nested.as_nested_tensor(prompts, layout=torch.jagged),
            "responses": torch.nested.as_nested_tensor(responses, layout=torch.jagged),
            "response_mask": torch.nested.as_nested_tensor(masks, layout=torch.jagged),
            "opd_sample_weight": torch.ones(num_samples, 1),
        },
        batch_size=[num_samples],
    )
    tu.assign_non_tensor(data, mini_batch_size=mini_batch_size)
    return data


def full_state(module) -> dict[str, torch.Tensor]:
    """Unsharded copy of an FSDP module's parameters."""
    state = {}
    for name, param in module.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = value.detach().float().clone()
    return state


def padding_only_batch(num_samples: int) -> TensorDict:
    """Rows like verl's synthetic padding samples: nothing in the loss."""
    data = rollout_batch(num_samples, seed=99)
    masks = [torch.zeros_like(m) for m in data["response_mask"].unbind()]
    data["response_mask"] = torch.nested.as_nested_tensor(masks, layout=torch.jagged)
    data["opd_sample_weight"] = torch.zeros(num_samples, 1)
    return data


def run_rank(rank: int, world_size: int, port: int, student: str, teacher: str, results) -> None:
    """One rank of a multi-process gloo run: rank 0 holds real rows, the others only padding rows."""
    config = compose_opd_config(student, teacher)
    worker = make_worker(config, rank=rank, world_size=world_size, port=port)
    data = rollout_batch(4, seed=11) if rank == 0 else padding_only_batch(1)
    results.put((rank, dict(worker.update_actor(data)["metrics"])))

"""The OPD worker in this process, without Ray: the harness of the worker tests and benchmarks.

Builds exactly the worker a training run builds (same hydra composition, same CPU-backend overrides
when no GPU is present), as a single rank of a ``torch.distributed`` group the caller describes.
"""

from __future__ import annotations

import os
import socket

import torch
from tensordict import TensorDict


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_opd_config(student: str, teacher: str, *overrides: str):
    """The trainer config ``python -m opd.main_opd`` would build, plus ``overrides`` (hydra syntax)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    from common import cpu_backend

    backend = cpu_backend.cpu_hydra_overrides() if cpu_backend.use_cpu_backend() else []
    paths = [f"actor_rollout_ref.model.path={student}", f"opd.teacher_model_path={teacher}"]
    with initialize_config_module(config_module="opd.config", version_base=None):
        config = compose(config_name="opd_trainer", overrides=[*backend, *paths, *overrides])
    with open_dict(config):
        config.actor_rollout_ref.opd = config.opd
    OmegaConf.resolve(config)
    return config


def make_worker(config, *, rank: int = 0, world_size: int = 1, port: int | None = None):
    """An initialised ``OPDActorRolloutWorker`` (role ``actor``) as rank ``rank`` of ``world_size``."""
    from common import cpu_backend

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
    )
    if cpu_backend.use_cpu_backend():
        os.environ["VERL_PLATFORM"] = "cpu"
        cpu_backend.activate()
    from opd.worker import OPDActorRolloutWorker

    worker = OPDActorRolloutWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def synthetic_rollout(
    num_samples: int,
    *,
    vocab: int,
    prompt_len: tuple[int, int] = (3, 9),
    response_len: tuple[int, int] = (4, 12),
    tool_span: bool = True,
    mini_batch_size: int | None = None,
    seed: int = 0,
) -> TensorDict:
    """Random samples in the layout verl's agent loop stores: jagged prompts, responses, response_mask.

    With ``tool_span`` the 2nd and 3rd response tokens are marked as tool output (mask 0).
    """
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    prompts, responses, masks = [], [], []
    for _ in range(num_samples):
        p_len = int(torch.randint(prompt_len[0], prompt_len[1], (1,), generator=generator))
        r_len = int(torch.randint(response_len[0], response_len[1], (1,), generator=generator))
        prompts.append(torch.randint(3, vocab, (p_len,), generator=generator))
        responses.append(torch.randint(3, vocab, (r_len,), generator=generator))
        mask = torch.ones(r_len, dtype=torch.long)
        if tool_span:
            mask[1:3] = 0
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
    tu.assign_non_tensor(data, mini_batch_size=mini_batch_size or num_samples)
    return data

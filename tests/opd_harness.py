"""Worker-test helpers on top of ``inprocess``: the tiny-model config and batches the tests share."""

from __future__ import annotations

import torch
from inprocess import compose_opd_config, make_worker, synthetic_rollout
from tensordict import TensorDict

from opd.batch import OPDBatch

TINY_OVERRIDES = (
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.optim.lr=1e-2",
    "opd.chunk_size=8",
)


def tiny_worker(student: str, teacher: str, *overrides: str, **kwargs):
    return make_worker(compose_opd_config(student, teacher, *TINY_OVERRIDES, *overrides), **kwargs)


def rollout_batch(num_samples: int, *, seed: int = 0) -> TensorDict:
    """Random rollout samples over the tiny tokenizer, mini-batches of 4 as in ``TINY_OVERRIDES``."""
    return synthetic_rollout(num_samples, vocab=259, mini_batch_size=4, seed=seed)


def padding_only_batch(num_samples: int) -> TensorDict:
    """Rows like verl's synthetic padding samples: nothing in the loss."""
    data = rollout_batch(num_samples, seed=99)
    masks = [torch.zeros_like(m) for m in data["response_mask"].unbind()]
    data["response_mask"] = torch.nested.as_nested_tensor(masks, layout=torch.jagged)
    data["opd_sample_weight"] = torch.zeros(num_samples, 1)
    return data


def run_rank(
    rank: int, world_size: int, port: int, student: str, teacher: str, results, others: str, *overrides
) -> None:
    """One rank of a multi-process gloo run: rank 0 holds real rows (with the student's rollout log-probs),
    the others only padding rows (``others="padding"``) or no rows at all (``others="none"``)."""
    worker = tiny_worker(student, teacher, *overrides, rank=rank, world_size=world_size, port=port)
    if rank == 0:
        metrics = worker.update_actor(with_rollout_log_probs(rollout_batch(4, seed=11), student))["metrics"]
    elif others == "padding":
        metrics = worker.update_actor(padding_only_batch(1))["metrics"]
    else:
        no_rows = torch.zeros(0, dtype=torch.long)
        empty = OPDBatch(input_ids=[], prompt_lengths=no_rows, loss_mask=[], sample_weights=no_rows.float())
        metrics = worker.update_on_batch(empty, global_mini_batch_size=4, step=1)
    results.put((rank, dict(metrics)))


def full_state(module) -> dict[str, torch.Tensor]:
    """Unsharded copy of an FSDP module's parameters."""
    state = {}
    for name, param in module.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = value.detach().float().clone()
    return state


def with_rollout_log_probs(data: TensorDict, model_dir: str, temperature: float = 1.0) -> TensorDict:
    """Add ``rollout_log_probs`` as an exact rollout engine would: the model's own log-prob of each response
    token at ``temperature``, one jagged row per sample (each sample run alone, so no padding is involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    rows = []
    with torch.no_grad():
        for prompt, response in zip(data["prompts"].unbind(), data["responses"].unbind(), strict=True):
            ids = torch.cat([prompt, response]).long().unsqueeze(0)
            logits = model(input_ids=ids).logits[0, prompt.numel() - 1 : -1].float() / temperature
            rows.append(torch.log_softmax(logits, -1).gather(-1, response.long()[:, None]).squeeze(-1))
    data["rollout_log_probs"] = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    return data


def with_advantages(data: TensorDict, per_sample: list[float]) -> TensorDict:
    """Add per-token task advantages, constant over each response as GRPO's are."""
    rows = [
        torch.full((r.numel(),), value)
        for r, value in zip(data["responses"].unbind(), per_sample, strict=True)
    ]
    data["advantages"] = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    return data


def recorded_gradients(worker, data, steps: int = 1) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """The student's gradients as each optimizer step sees them, and the metrics, over ``steps`` updates."""
    engine, seen, metrics = worker.student, [], []
    real_step = engine.optimizer_step

    def recording_step():
        seen.append(
            {
                name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
                for name, p in engine.module.named_parameters()
                if p.grad is not None
            }
        )
        return real_step()

    engine.optimizer_step = recording_step
    try:
        for _ in range(steps):
            metrics.append(worker.update_actor(data)["metrics"])
    finally:
        engine.optimizer_step = real_step
    return seen, metrics

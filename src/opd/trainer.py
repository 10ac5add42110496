"""The OPD trainer: verl's V1 synchronous trainer with the OPD worker and an OPD step.

Registered as ``trainer.v1.trainer_mode=opd``. Per step: sample rollouts (verl's agent loop, ``rollout.n``
samples per prompt), rule-based reward, balance across ranks, reward weights over the whole batch, then
the worker's two-phase update. No old/ref log-prob passes and no critic: pure OPD needs none.
The private trainer methods it overrides or calls are listed in ``common.verl_surface``.
"""

from __future__ import annotations

import json
import os

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer

from common.batch import chat_prompt_ids
from opd.config import OPDConfig
from opd.progress import format_progress, format_summary
from opd.reward_weights import sample_weights


@register_trainer("opd")
class OPDTrainer(PPOTrainerSync):
    """Synchronous OPD: rollout and the time-shared teacher/student update on the same GPUs."""

    def __init__(self, config):
        with open_dict(config):
            config.actor_rollout_ref.opd = config.opd
        super().__init__(config)
        self.opd_config = OPDConfig.from_dict(OmegaConf.to_container(config.opd, resolve=True))
        self.output_dir = os.path.expanduser(config.trainer.default_local_dir)
        self._history: list[dict] = []
        self._training_started = False
        self._held_out: list[list[int]] | None = None

    def _init_resource_pool_mgr(self):
        from opd.worker import OPDActorRolloutWorker

        super()._init_resource_pool_mgr()
        for role in list(self.role_worker_mapping):
            self.role_worker_mapping[role] = ray.remote(OPDActorRolloutWorker)

    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int):
        with marked_timer("gen", timing_raw, color="red"):
            self.on_sample_begin()
            batch, off_policy_metrics = self.replay_buffer.sample(
                global_steps=self.global_steps, partition_id="train", batch_size=sample_batch_size
            )
            metrics.update(off_policy_metrics)
            self.on_sample_end()
        if self.reward_loop_manager.reward_loop_worker_handles is None:
            with marked_timer("reward", timing_raw, color="yellow"):
                batch = self._compute_reward_colocate(batch, metrics=metrics)
        batch = self._balance_batch(batch, metrics=metrics)
        metrics.update(self._put_reward_weights(batch))
        with marked_timer("adv", timing_raw, color="brown"):
            batch = self._compute_advantage(batch, metrics=metrics)
        with marked_timer("update_actor", timing_raw, color="red"):
            batch = self._update_actor(batch, metrics=metrics)
        return batch

    def _put_reward_weights(self, batch) -> dict[str, float]:
        """Write ``opd_sample_weight`` (reward and pass-rate weights over the whole batch) per sample."""
        fields = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores", "uid"]
        )
        rewards = torch.stack([row.sum() for row in fields["rm_scores"].unbind()]).float()
        valid = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])
        weights, weight_metrics = sample_weights(
            rewards,
            valid,
            [str(uid) for uid in fields["uid"]],
            reward_beta=self.opd_config.reward_beta,
            pass_rate_weighting=self.opd_config.pass_rate_weighting,
        )
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({"opd_sample_weight": weights.unsqueeze(-1)}, batch_size=len(batch)),
        )
        return {
            **weight_metrics,
            "opd/reward_accuracy": float((rewards[valid] > 0).float().mean()),
            "opd/reward_weight_max": float(weights[valid].max()),
        }

    def _update_actor(self, batch, metrics: dict):
        rollout_n = self.config.actor_rollout_ref.rollout.n
        batch.extra_info["mini_batch_size"] = (
            self.config.actor_rollout_ref.actor.ppo_mini_batch_size * rollout_n
        )
        batch.extra_info["global_steps"] = self.global_steps
        output = self.actor_rollout_wg.update_actor(batch)
        metrics.update(_first_rank_metrics(output["metrics"]))
        return batch

    def on_train_begin(self):
        self._training_started = True

    def _validate(self) -> dict[str, float]:
        metrics = super()._validate()
        if self.opd_config.val_num_prompts > 0:
            metrics.update(self.actor_rollout_wg.evaluate_opd(self._held_out_prompts())[0])
        if not self._training_started:
            self._record(self.global_steps, metrics)
            print(format_progress(self.global_steps, self.total_training_steps, metrics), flush=True)
        return metrics

    def _held_out_prompts(self) -> list[list[int]]:
        """Token ids of the first ``opd.val_num_prompts`` validation prompts, templated as in rollout."""
        if self._held_out is None:
            dataset = self.val_dataloader.dataset
            count = min(self.opd_config.val_num_prompts, len(dataset))
            template_kwargs = dict(self.config.data.get("apply_chat_template_kwargs", {}) or {})
            self._held_out = [
                chat_prompt_ids(self.tokenizer, dataset[i]["raw_prompt"], **template_kwargs)
                for i in range(count)
            ]
        return self._held_out

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        self._record(global_steps, metrics)
        print(format_progress(global_steps, self.total_training_steps, metrics), flush=True)

    def _record(self, step: int, metrics: dict) -> None:
        """Append the step's scalar metrics to ``metrics.jsonl`` at once, so an interruption loses nothing."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items() if _is_scalar(v)}}
        self._history.append(record)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def fit(self, agent_loop_manager):
        super().fit(agent_loop_manager)
        print(format_summary(self._history), flush=True)
        if self.opd_config.plot:
            from opd.plotting import plot_training_curves

            path = plot_training_curves(self._history, os.path.join(self.output_dir, "training_curves.png"))
            print(f"[opd] training curves written to {path}", flush=True)


def _first_rank_metrics(metrics) -> dict[str, float]:
    # every rank returns the same all-reduced metrics; the collect step may wrap them in a list
    return dict(metrics[0] if isinstance(metrics, list) else metrics)


def _is_scalar(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True

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
from omegaconf import open_dict
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer

from agent.tools import row_tools
from opd import checkpoints
from opd.batch import chat_prompt_ids
from opd.config import OPDConfig
from opd.progress import StepClock, format_progress, format_summary
from opd.reward_weights import sample_weights
from opd.teacher_prompts import TEACHER_PROMPT_COLUMN, teacher_messages


@register_trainer("opd")
class OPDTrainer(PPOTrainerSync):
    """Synchronous OPD: rollout and the time-shared teacher/student update on the same GPUs."""

    def __init__(self, config):
        with open_dict(config):
            config.actor_rollout_ref.opd = config.opd
        super().__init__(config)
        self.opd_config = OPDConfig.from_node(config.opd)
        self.output_dir = os.path.expanduser(config.trainer.default_local_dir)
        self._history: list[dict] = []
        # set when training begins; until then validation is the one before training
        self._clock: StepClock | None = None
        self._held_out: list[list[int]] | None = None
        self._uncommitted_step: int | None = None
        if config.actor_rollout_ref.actor.get("checkpoint", {}).get("async_save", False):
            raise ValueError(
                "actor_rollout_ref.actor.checkpoint.async_save=true is not supported by the OPD "
                "trainer: a checkpoint is marked complete only once its files are written"
            )

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
        self._clock = StepClock(self.total_training_steps)
        # verl has set global_steps to the step about to run (restored step + 1 on resume)
        self._clock.start(self.global_steps - 1)

    def on_step_begin(self):
        """Stop before a new step when the driver asked to, with the last finished step checkpointed."""
        super().on_step_begin()
        if not checkpoints.stop_requested(self.output_dir):
            return
        finished = self.global_steps - 1
        if finished > 0 and checkpoints.read_tracker(self.output_dir) != finished:
            self._save_checkpoint(finished)
            self._commit_checkpoint()
        raise checkpoints.StopRequested(
            f"stopped on request after step {finished}; the next start with this run folder resumes from "
            f"step {checkpoints.read_tracker(self.output_dir) or 0}"
        )

    def _save_checkpoint(self, step: int | None = None):
        """Write the step's actor and data-loader state; it becomes resumable in :meth:`_commit_checkpoint`.

        Replaces verl's save (see :mod:`opd.checkpoints`): no tracker write here, no deletion of older
        steps by the worker, and no TransferQueue state, since a synchronous OPD step leaves nothing in
        flight and a restored queue would hand the resumed step samples that were already trained on.
        """
        step = self.global_steps if step is None else step
        folder = checkpoints.step_folder(self.output_dir, step)
        # files of an earlier, killed save of this step must not be listed in the new marker
        checkpoints.discard(folder)
        hdfs_dir = self.config.trainer.default_hdfs_dir
        remote = (
            None if hdfs_dir is None else os.path.join(hdfs_dir, f"{checkpoints.STEP_PREFIX}{step}", "actor")
        )
        self.actor_rollout_wg.save_checkpoint(
            os.path.join(folder, "actor"), remote, step, max_ckpt_to_keep=None
        )
        checkpoints.atomic_torch_save(self.train_dataloader.state_dict(), os.path.join(folder, "data.pt"))
        self._uncommitted_step = step
        checkpoints.kill_if_requested(step)

    def _commit_checkpoint(self) -> None:
        """Mark the saved step complete, point the tracker at it, then apply the retention limit.

        Runs after the step's line is in ``metrics.jsonl``, so a resumed run never restores a step whose
        metrics were lost.
        """
        step, self._uncommitted_step = self._uncommitted_step, None
        folder = checkpoints.step_folder(self.output_dir, step)
        checkpoints.mark_complete(folder, step)
        checkpoints.write_tracker(self.output_dir, step)
        trainer_config = self.config.trainer
        keep = (
            1
            if trainer_config.get("remove_previous_ckpt_in_save", False)
            else trainer_config.get("max_actor_ckpt_to_keep", None)
        )
        removed = checkpoints.remove_old_checkpoints(self.output_dir, keep)
        checkpoints.log(f"checkpoint {folder} complete{f'; removed steps {removed}' if removed else ''}")
        self.checkpoint_callback.on_save(
            trainer=self, global_step=step, checkpoint_dir=folder, async_save=False
        )

    def _load_checkpoint(self):
        """verl's resume, from the newest complete checkpoint; ``metrics.jsonl`` is cut back to it."""
        trainer_config = self.config.trainer
        if trainer_config.resume_mode != "auto":
            super()._load_checkpoint()
        else:
            step = checkpoints.resume_step(self.output_dir)
            with open_dict(trainer_config):
                mode, path = trainer_config.resume_mode, trainer_config.get("resume_from_path")
                trainer_config.resume_mode = "disable" if step is None else "resume_path"
                trainer_config.resume_from_path = (
                    None if step is None else os.path.abspath(checkpoints.step_folder(self.output_dir, step))
                )
                try:
                    super()._load_checkpoint()
                finally:
                    trainer_config.resume_mode, trainer_config.resume_from_path = mode, path
        self._history = checkpoints.truncate_metrics(self._metrics_path(), self.global_steps)

    def _validate(self) -> dict[str, float]:
        metrics = super()._validate()
        if self.opd_config.val_num_prompts > 0:
            prompts, teacher_prompts = self._held_out_prompts()
            metrics.update(self.actor_rollout_wg.evaluate_opd(prompts, teacher_prompts)[0])
        if self._clock is None:
            self._record_validation_before_training(metrics)
            print(format_progress(self.global_steps, self.total_training_steps, metrics), flush=True)
        return metrics

    def _held_out_prompts(self) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids of the first ``opd.val_num_prompts`` validation prompts, templated as in rollout, and
        the teacher's own prompts for them (None unless ``opd.teacher_prompt`` gives it a privileged one)."""
        if self._held_out is None:
            dataset = self.val_dataloader.dataset
            rows = [dataset[i] for i in range(min(self.opd_config.val_num_prompts, len(dataset)))]
            template_kwargs = dict(self.config.data.get("apply_chat_template_kwargs", {}) or {})
            prompts = [
                chat_prompt_ids(self.tokenizer, row["raw_prompt"], **template_kwargs, **self._row_tools(row))
                for row in rows
            ]
            self._held_out = (prompts, self._held_out_teacher_prompts(rows, template_kwargs))
        return self._held_out

    def _held_out_teacher_prompts(self, rows, template_kwargs) -> list[list[int]] | None:
        mode = self.opd_config.teacher_prompt
        if mode == "same":
            return None
        template = self.opd_config.teacher_prompt_template
        fields = (TEACHER_PROMPT_COLUMN, "reward_model", "extra_info")
        return [
            chat_prompt_ids(
                self.tokenizer,
                teacher_messages(
                    {"prompt": row["raw_prompt"], **{k: row[k] for k in fields if k in row}},
                    mode,
                    template,
                    index=i,
                ),
                **template_kwargs,
                **self._row_tools(row),
            )
            for i, row in enumerate(rows)
        ]

    def _row_tools(self, row) -> dict:
        return row_tools(self.config.actor_rollout_ref.rollout.multi_turn, row.get("extra_info"))

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        self._record(global_steps, metrics)
        if self._uncommitted_step is not None:
            self._commit_checkpoint()
        eta = self._clock.eta_s(global_steps) if self._clock else None
        print(format_progress(global_steps, self.total_training_steps, metrics, eta), flush=True)

    def _metrics_path(self) -> str:
        return os.path.join(self.output_dir, checkpoints.METRICS)

    def _record(self, step: int, metrics: dict) -> None:
        """Append the step's scalar metrics to ``metrics.jsonl`` at once, so an interruption loses nothing."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items() if _is_scalar(v)}}
        self._history.append(record)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self._metrics_path(), "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _record_validation_before_training(self, metrics: dict) -> None:
        """Record the first validation; a resumed run adds it to the restored step's line, once per step."""
        if not self._history or self._history[-1]["step"] != self.global_steps:
            self._record(self.global_steps, metrics)
            return
        self._history[-1].update({k: float(v) for k, v in metrics.items() if _is_scalar(v)})
        checkpoints.write_metrics(self._metrics_path(), self._history)

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

"""The OPD verl worker: verl's actor/rollout worker plus a frozen teacher engine.

``update_actor`` runs the two-phase update on this rank's share of the batch:

1. teacher phase (``opd.teacher``): onload the teacher, forward every micro-batch, cache the response
   logits on CPU, offload the teacher and free device memory;
2. student phase (``opd.student``): onload the student and its optimizer (verl's train-mode context),
   chunked divergence + backward per micro-batch, one clipped step per mini-batch, offload.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine_workers import ActorRolloutRefWorker

from agent.tools import row_tools
from opd.agent_metrics import agent_metrics, agent_sums
from opd.batch import OPDBatch, build_opd_batch, micro_batch_rows
from opd.config import OPDConfig
from opd.devices import current_device, phase_meter
from opd.evaluation import evaluate_held_out
from opd.objectives import ObjectiveContext
from opd.objectives.teacher_signal import SignalSpec
from opd.student import train_student_step
from opd.teacher import build_teacher_engine, choose_signal, run_teacher_phase
from opd.teacher_prompts import TEACHER_PROMPT_COLUMN, teacher_messages, tokenize_teacher_prompts


class OPDActorRolloutWorker(ActorRolloutRefWorker):
    """Actor + rollout (+ teacher) on the same GPUs, taking turns."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        self.opd_config = OPDConfig.from_node(self.config.opd)
        actor_config = omega_conf_to_dataclass(self.config.actor)
        self.rollout_temperature = float(self.config.rollout.temperature)
        self.opd_config.check_rollout_temperature(self.rollout_temperature)
        # the policy-gradient losses read clip ratios and loss mode from here; token weights normalise
        self.policy_config = omega_conf_to_dataclass(self.config.actor)
        self.policy_config.global_batch_info.clear()
        self.teacher = build_teacher_engine(
            model_config=self._teacher_model_config(),
            engine_config=actor_config.engine,
            optimizer_config=actor_config.optim,
            checkpoint_config=actor_config.checkpoint,
        )
        self.student = self.actor.engine
        tokenizer = self.student.model_config.tokenizer
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.micro_batch_size = int(self.config.actor.ppo_micro_batch_size_per_gpu)
        self._teacher_answers: dict[tuple, list[torch.Tensor]] = {}
        self.signal_spec = SignalSpec(
            kind=choose_signal(self.opd_config, self.teacher),
            topk=self.opd_config.topk,
            temperature=self.opd_config.temperature,
            chunk_size=self.opd_config.chunk_size,
            vocab_limit=int(self.student.model_config.hf_config.vocab_size),
        )

    def _teacher_model_config(self):
        teacher_path = self.config.opd.teacher_model_path
        overrides = {"path": teacher_path, "tokenizer_path": teacher_path, "hf_config_path": teacher_path}
        # the teacher is never trained: no LoRA, no gradient checkpointing
        overrides.update(lora_rank=0, lora_adapter_path=None, enable_gradient_checkpointing=False)
        return omega_conf_to_dataclass(OmegaConf.merge(self.config.model, overrides))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data: TensorDict) -> TensorDict:
        metrics = self.update_on_batch(
            self._opd_batch(data),
            global_mini_batch_size=int(tu.get(data, key="mini_batch_size", default=len(data))),
            step=int(tu.get(data, "global_steps", default=1)),
        )
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics}).cpu()

    def update_on_batch(self, batch: OPDBatch, *, global_mini_batch_size: int, step: int) -> dict[str, float]:
        """Both phases on this rank's rows (possibly none: the rank then runs matching no-op work)."""
        agent = self._agent_metrics(batch) if self.config.rollout.multi_turn.enable else {}
        steps = self._plan_steps(batch, global_mini_batch_size)
        micro_batches = [mb for step_mbs in steps for mb in step_mbs]
        with phase_meter() as teacher_phase:
            # the teacher reads its own prompt (privileged context) followed by the student's response
            cache = run_teacher_phase(
                self.teacher,
                [mb.teacher_view() for mb in micro_batches],
                pad_token_id=self.pad_token_id,
                spec=self.signal_spec,
            )
        with phase_meter() as student_phase:
            metrics = self._student_phase(steps, iter(cache.signals), step)
        metrics.update(
            {
                "opd/num_samples": float(_all_reduce(len(batch), dist.ReduceOp.SUM)),
                "opd/truncated_samples": float(_all_reduce(batch.num_truncated, dist.ReduceOp.SUM)),
                "opd/cache_bytes_per_token": cache.bytes_per_token,
                "opd/timing/teacher_s": teacher_phase["seconds"],
                "opd/timing/student_s": student_phase["seconds"],
                "opd/memory/teacher_peak_gb": teacher_phase["peak_gb"],
                "opd/memory/student_peak_gb": student_phase["peak_gb"],
                **agent,
            }
        )
        return metrics

    def _agent_metrics(self, batch: OPDBatch) -> dict[str, float]:
        """``opd/agent/*`` and ``opd/tool_mask/*`` over every rank's real samples."""
        responses = [ids[int(p) :] for ids, p in zip(batch.input_ids, batch.prompt_lengths, strict=True)]
        sums = agent_sums(
            responses,
            batch.loss_mask,
            self.student.model_config.tokenizer,
            self.config.rollout.multi_turn.max_assistant_turns,
        )
        maximum = _all_reduce(int(sums.pop("turns_max")), dist.ReduceOp.MAX)
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=current_device())
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return agent_metrics({**dict(zip(keys, totals.tolist(), strict=True)), "turns_max": float(maximum)})

    def _student_phase(self, steps: list[list[OPDBatch]], cached_signals, step: int) -> dict[str, float]:
        """One optimizer step per mini-batch inside verl's train-mode context (onload, step, offload)."""
        step_metrics = []
        with self.student.train_mode():
            for micro_batches in steps:
                step_metrics.append(
                    train_student_step(
                        self.student,
                        micro_batches,
                        [next(cached_signals) for _ in micro_batches],
                        ctx=ObjectiveContext(
                            config=self.opd_config,
                            step=step,
                            rollout_temperature=self.rollout_temperature,
                            policy_config=self.policy_config,
                        ),
                        pad_token_id=self.pad_token_id,
                        dp_group=self.student.get_data_parallel_group(),
                        device=current_device(),
                    )
                )
            lr = self.student.lr_scheduler_step()
        return {**_mean_over_steps(step_metrics), "opd/lr": lr}

    def _opd_batch(self, data: TensorDict) -> OPDBatch:
        weights = _per_sample(data["opd_sample_weight"]) if "opd_sample_weight" in data.keys() else None
        has_prompts = "prompts" in data.keys()
        return build_opd_batch(
            rollout_log_probs=_per_token(data, "rollout_log_probs", self.opd_config.needs_rollout_log_probs),
            advantages=_per_token(data, "advantages", self.opd_config.task_loss_coef > 0),
            responses=list(data["responses"].unbind()),
            response_mask=list(data["response_mask"].unbind()),
            prompts=list(data["prompts"].unbind()) if has_prompts else None,
            raw_prompts=None if has_prompts else list(data["raw_prompt"]),
            tokenizer=self.student.model_config.tokenizer,
            teacher_prompts=self._teacher_prompts(data),
            max_length=self.opd_config.max_length,
            overlength=self.opd_config.overlength,
            sample_weights=weights,
        )

    def _teacher_prompts(self, data: TensorDict) -> list[torch.Tensor] | None:
        """The teacher's prompt ids per sample (``opd.teacher_prompt``); None when it reads the student's."""
        mode = self.opd_config.teacher_prompt
        if mode == "same":
            return None
        fields = (TEACHER_PROMPT_COLUMN, "reward_model", "extra_info")
        columns = {k: list(data[k]) for k in fields if k in data.keys()}
        columns["prompt"] = list(data["raw_prompt"])
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        template = self.opd_config.teacher_prompt_template
        messages = [teacher_messages(row, mode, template, index=i) for i, row in enumerate(rows)]
        template_kwargs = dict(self.config.get("apply_chat_template_kwargs") or {})
        # agent runs: the teacher's prompt shows the tool schemas the student's showed in the rollout
        tools = [row_tools(self.config.rollout.multi_turn, row.get("extra_info")) for row in rows]
        return tokenize_teacher_prompts(self.teacher.model_config.tokenizer, messages, template_kwargs, tools)

    def _plan_steps(self, batch: OPDBatch, global_mini_batch_size: int) -> list[list[OPDBatch]]:
        """Mini-batches (one optimizer step each) of micro-batches, equal in count on every rank."""
        dp_size = dist.get_world_size(group=self.student.get_data_parallel_group())
        local_mini = max(global_mini_batch_size // dp_size, 1)
        steps = []
        for mini_rows in micro_batch_rows(len(batch), local_mini):
            mini = batch.select(mini_rows)
            steps.append([mini.select(rows) for rows in micro_batch_rows(len(mini), self.micro_batch_size)])
        filler = batch.zero_weight_copy() if len(batch) else _no_op_batch(self.pad_token_id)
        return _pad_to_common_shape(steps, filler, self.student.get_data_parallel_group())

    def _digit_ids(self) -> list[int]:
        """Token ids whose text is a digit: the final answer of a held-out trace is its last run of them."""
        tokenizer = self.student.model_config.tokenizer
        return sorted(
            {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_vocab() if t.strip().isdigit()}
        )

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def evaluate_opd(
        self, prompts: list[list[int]], teacher_prompts: list[list[int]] | None = None
    ) -> dict[str, float]:
        """Held-out student-vs-teacher metrics (``val-opd/*``); every rank evaluates the same prompts.

        ``teacher_prompts``: the teacher's privileged prompt per held-out prompt (``opd.teacher_prompt``).
        """
        key = (
            tuple(map(tuple, prompts)),
            None if teacher_prompts is None else tuple(map(tuple, teacher_prompts)),
        )
        metrics, answers = evaluate_held_out(
            student=self.student,
            teacher=self.teacher,
            prompts=[torch.tensor(p, dtype=torch.long) for p in prompts],
            teacher_prompts=None
            if teacher_prompts is None
            else [torch.tensor(p, dtype=torch.long) for p in teacher_prompts],
            config=self.opd_config,
            eos_token_id=self.student.model_config.tokenizer.eos_token_id,
            pad_token_id=self.pad_token_id,
            micro_batch_size=self.micro_batch_size,
            teacher_answers=self._teacher_answers.get(key),
            final_answer_ids=self._digit_ids(),
        )
        self._teacher_answers = {key: answers}
        return metrics


def _per_token(data: TensorDict, key: str, needed: bool) -> list[torch.Tensor] | None:
    """Per-sample rows of a per-token field (jagged, one row per sample); None when not needed or absent."""
    return list(data[key].unbind()) if needed and key in data.keys() else None


def _per_sample(field: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 from a per-sample scalar field, dense or (as TransferQueue may return it) jagged."""
    rows = field.unbind() if field.is_nested else field.reshape(field.shape[0], -1)
    return torch.stack([row.reshape(-1)[0] for row in rows]).float()


def _no_op_batch(pad_token_id: int) -> OPDBatch:
    """One padding row, nothing in the loss: the filler of a rank that was dealt no rows at all."""
    zero = torch.zeros(1)
    return OPDBatch(
        input_ids=[torch.full((2,), pad_token_id, dtype=torch.long)],
        prompt_lengths=torch.ones(1, dtype=torch.long),
        loss_mask=[zero],
        sample_weights=zero.clone(),
        rollout_logp=[zero.clone()],
        advantages=[zero.clone()],
    )


def _pad_to_common_shape(steps: list[list[OPDBatch]], filler: OPDBatch, group) -> list[list[OPDBatch]]:
    """Append ``filler`` micro-batches so every rank runs the same forwards, backwards and steps."""
    num_steps = _all_reduce(len(steps), dist.ReduceOp.MAX, group)
    padded = [list(s) for s in steps] + [[] for _ in range(num_steps - len(steps))]
    for micro_batches in padded:
        target = _all_reduce(len(micro_batches), dist.ReduceOp.MAX, group)
        micro_batches.extend([filler] * (target - len(micro_batches)))
    return padded


def _mean_over_steps(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    keys = step_metrics[0].keys()
    merged = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in keys}
    merged["opd/num_tokens"] = sum(m["opd/num_tokens"] for m in step_metrics)
    merged["opd/skipped_step"] = sum(m["opd/skipped_step"] for m in step_metrics)
    return merged


def _all_reduce(value: int, op, group=None) -> int:
    tensor = torch.tensor([value], dtype=torch.long, device=current_device())
    dist.all_reduce(tensor, op=op, group=group)
    return int(tensor.item())

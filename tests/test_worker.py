"""The OPD worker in-process on tiny random models: phase order, what changes, the no-signal case."""

import pytest
import torch
from opd_harness import full_state, rollout_batch, tiny_worker
from tiny_models import TOKENIZER_SIZE, build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / "student", num_layers=2, seed=0)
    # a padded output head on the teacher, as Qwen2.5-7B (152064) vs 1.5B (151936)
    build_tiny_model(root / "teacher", num_layers=3, seed=1, vocab_size=TOKENIZER_SIZE + 13)
    return str(root / "student"), str(root / "teacher")


@pytest.fixture(scope="module")
def worker(models):
    return tiny_worker(*models)


def _record_order(worker):
    events = []
    teacher_to = worker.teacher.to

    def recording_to(device, **kwargs):
        events.append(("teacher.to", device))
        return teacher_to(device, **kwargs)

    worker.teacher.to = recording_to
    worker.teacher.module.register_forward_pre_hook(lambda *_: events.append(("teacher.forward", None)))
    worker.student.module.register_forward_pre_hook(lambda *_: events.append(("student.forward", None)))
    return events


def test_teacher_runs_for_every_micro_batch_and_is_offloaded_before_the_student(worker):
    events = _record_order(worker)
    worker.update_actor(rollout_batch(6, seed=3))
    names = [name for name, _ in events]
    first_student = names.index("student.forward")
    last_teacher = max(i for i, name in enumerate(names) if name == "teacher.forward")
    assert last_teacher < first_student
    # 6 samples, micro-batch 2, mini-batch 4 -> 3 teacher forwards, all before any student forward
    assert names.count("teacher.forward") == 3
    offloads = [i for i, (name, device) in enumerate(events) if name == "teacher.to" and device == "cpu"]
    assert any(last_teacher < i < first_student for i in offloads)
    assert all(p.device.type == "cpu" for p in worker.teacher.module.parameters())


def test_a_step_changes_the_student_and_never_the_teacher(worker):
    student_before, teacher_before = full_state(worker.student.module), full_state(worker.teacher.module)
    output = worker.update_actor(rollout_batch(4, seed=4))
    student_after, teacher_after = full_state(worker.student.module), full_state(worker.teacher.module)
    assert any(not torch.equal(student_before[k], student_after[k]) for k in student_before)
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not any(p.requires_grad for p in worker.teacher.module.parameters())
    metrics = output["metrics"]
    for key in (
        "opd/loss",
        "opd/sampled_reverse_kl",
        "opd/teacher_nll",
        "opd/student_entropy",
        "opd/grad_norm",
    ):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["opd/loss"] > 0 and metrics["opd/skipped_step"] == 0


def test_num_tokens_counts_model_tokens_only(worker):
    data = rollout_batch(4, seed=5)
    expected = sum(int(m.sum()) for m in data["response_mask"].unbind())
    assert worker.update_actor(data)["metrics"]["opd/num_tokens"] == expected


def test_cache_is_the_teachers_hidden_states_by_default_and_full_logits_on_request(models, worker):
    # the tiny teacher's head is a plain linear map: its final hidden states (H = 64) in bf16
    assert worker.update_actor(rollout_batch(2, seed=6))["metrics"]["opd/cache_bytes_per_token"] == 2 * 64
    full = tiny_worker(*models, "opd.teacher_signal=full")
    metrics = full.update_actor(rollout_batch(2, seed=6))["metrics"]
    assert metrics["opd/cache_bytes_per_token"] == 2 * (TOKENIZER_SIZE + 13)


def test_student_equal_to_teacher_gives_zero_divergence(models):
    student, _ = models
    worker = tiny_worker(student, student)
    metrics = worker.update_actor(rollout_batch(4, seed=7))["metrics"]
    assert abs(metrics["opd/loss"]) < 1e-5
    # first order in the logit difference: the teacher keeps bf16 weights, the student fp32 masters
    assert abs(metrics["opd/sampled_reverse_kl"]) < 1e-3
    # a zero loss still runs the backward (every rank issues the same collectives)
    assert metrics["opd/grad_norm"] < 1e-3


def test_non_finite_gradient_skips_the_step_and_reports_it(worker, monkeypatch):
    import opd.worker

    real_phase = opd.worker.run_teacher_phase

    def poisoned_phase(*args, **kwargs):
        cache = real_phase(*args, **kwargs)
        for signal in cache.signals:
            signal.hidden = torch.full_like(signal.hidden, float("nan"))
        return cache

    monkeypatch.setattr(opd.worker, "run_teacher_phase", poisoned_phase)
    before = full_state(worker.student.module)
    metrics = worker.update_actor(rollout_batch(4, seed=8))["metrics"]
    after = full_state(worker.student.module)
    assert metrics["opd/skipped_step"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_topk_signal_caches_a_few_bytes_per_token_and_trains(models):
    student, teacher = models
    worker = tiny_worker(student, teacher, "opd.loss_type=forward_kl_topk", "opd.topk=8")
    before = full_state(worker.student.module)
    metrics = worker.update_actor(rollout_batch(4, seed=9))["metrics"]
    # 8 x (int32 id + fp32 log-prob) + fp32 tail + fp32 sampled-token log-prob
    assert metrics["opd/cache_bytes_per_token"] == 8 * 8 + 4 + 4
    assert 0 < metrics["opd/teacher_topk_mass"] <= 1
    assert 0 <= metrics["opd/sampled_token_in_topk"] <= 1
    assert metrics["opd/loss"] > 0 and metrics["opd/skipped_step"] == 0
    after = full_state(worker.student.module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_topk_equal_to_full_vocabulary_matches_forward_kl(models):
    student, teacher = models
    data = rollout_batch(4, seed=10)
    full = tiny_worker(student, teacher, "opd.loss_type=forward_kl").update_actor(data)["metrics"]
    topk = tiny_worker(student, teacher, "opd.loss_type=forward_kl_topk", f"opd.topk={TOKENIZER_SIZE}")
    assert topk.update_actor(data)["metrics"]["opd/loss"] == pytest.approx(full["opd/loss"], rel=1e-3)


def test_paced_schedule_switches_from_forward_to_reverse_kl(models):
    from verl.utils import tensordict_utils as tu

    student, teacher = models

    def first_loss(loss_type, step, *extra):
        worker = tiny_worker(
            student, teacher, f"opd.loss_type={loss_type}", "actor_rollout_ref.actor.optim.lr=0", *extra
        )
        data = rollout_batch(4, seed=12)
        tu.assign_non_tensor(data, global_steps=step)
        return worker.update_actor(data)["metrics"]["opd/loss"]

    paced = ("opd.paced_switch_step=3",)
    assert first_loss("forward_then_reverse_kl", 2, *paced) == pytest.approx(
        first_loss("forward_kl", 2), rel=1e-4
    )
    assert first_loss("forward_then_reverse_kl", 3, *paced) == pytest.approx(
        first_loss("reverse_kl", 3), rel=1e-4
    )


def test_rollout_temperature_does_not_change_the_distillation_loss(models):
    student, teacher = models
    lr0 = "actor_rollout_ref.actor.optim.lr=0"
    losses = [
        tiny_worker(student, teacher, lr0, f"actor_rollout_ref.rollout.temperature={t}").update_actor(
            rollout_batch(4, seed=13)
        )["metrics"]["opd/loss"]
        for t in (1.0, 0.6)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    # while the loss temperature does change it (both sides scaled alike)
    hot = tiny_worker(student, teacher, lr0, "opd.temperature=2.0")
    assert hot.update_actor(rollout_batch(4, seed=13))["metrics"]["opd/loss"] != pytest.approx(
        losses[0], rel=1e-3
    )


def test_held_out_evaluation_forwards_in_training_micro_batches(models, monkeypatch):
    import opd.evaluation

    student, teacher = models
    worker = tiny_worker(student, teacher, "opd.val_max_new_tokens=4")
    sizes, graphs = [], []
    real_logits = opd.evaluation.response_logits

    def recording_logits(engine, batch, **kwargs):
        sizes.append(len(batch))
        logits = real_logits(engine, batch, **kwargs)
        graphs.append(torch.is_grad_enabled() or logits.requires_grad)
        return logits

    monkeypatch.setattr(opd.evaluation, "response_logits", recording_logits)
    prompts = [p.tolist() for p in rollout_batch(5, seed=30)["prompts"].unbind()]
    metrics = worker.evaluate_opd(prompts)
    # 5 student answers and 5 teacher answers, ppo_micro_batch_size_per_gpu=2 from the tiny overrides
    assert sizes == [2, 2, 1, 2, 2, 1]
    # metrics only: no forward of the evaluation may keep an autograd graph (activation memory)
    assert not any(graphs)
    assert metrics["val-opd/reverse_kl"] > 0 and metrics["val-opd/teacher_answer_nll"] > 0


def _gradients_at_each_step(worker, data) -> list[dict[str, torch.Tensor]]:
    """The student's gradients as each optimizer step of ``update_actor(data)`` sees them, before clipping."""
    engine, seen = worker.student, []
    real_step = engine.optimizer_step

    def recording_step():
        seen.append(
            {
                name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for name, p in engine.module.named_parameters()
                if p.grad is not None
            }
        )
        return real_step()

    engine.optimizer_step = recording_step
    try:
        worker.update_actor(data)
    finally:
        engine.optimizer_step = real_step
    return seen


def _rows(data, rows):
    """A new rollout TensorDict with the given rows (jagged fields cannot be sliced on the batch dim)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    rows = list(rows)
    fields = {}
    for key in ("prompts", "responses", "response_mask"):
        parts = data[key].unbind()
        fields[key] = torch.nested.as_nested_tensor([parts[r] for r in rows], layout=torch.jagged)
    fields["opd_sample_weight"] = data["opd_sample_weight"][rows]
    out = TensorDict(fields, batch_size=[len(rows)])
    tu.assign_non_tensor(out, mini_batch_size=len(rows))
    return out


def test_each_mini_batch_steps_on_its_own_gradient(models):
    """Two mini-batches in one update: the second step's gradient is the second mini-batch's alone.

    With lr 0 the weights never move, so the second mini-batch taken alone, from the same weights, must
    give exactly the gradient the second step of the two-step update saw (not mb1 + mb2)."""

    student, teacher = models
    worker = tiny_worker(student, teacher, "actor_rollout_ref.actor.optim.lr=0")
    both = rollout_batch(8, seed=21)
    steps = _gradients_at_each_step(worker, both)
    assert len(steps) == 2
    second = _rows(both, range(4, 8))
    alone = _gradients_at_each_step(worker, second)
    assert len(alone) == 1 and steps[1].keys() == alone[0].keys()
    for name, grad in alone[0].items():
        torch.testing.assert_close(steps[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(steps[0][k], steps[1][k]) for k in steps[0])


def _chat_rollout(student_dir: str, seed: int):
    """Rollout samples whose prompt ids are the templated ``raw_prompt``, with the dataset's columns."""
    import numpy as np
    from transformers import AutoTokenizer
    from verl.utils import tensordict_utils as tu

    from opd.batch import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    data = rollout_batch(4, seed=seed)
    messages = np.empty(4, dtype=object)
    for row in range(4):
        messages[row] = [{"role": "user", "content": f"What is {row} + {row + 2}?"}]
    prompts = [torch.tensor(chat_prompt_ids(tokenizer, m)) for m in messages]
    fields = {key: data[key] for key in ("responses", "response_mask", "opd_sample_weight")}
    fields["prompts"] = torch.nested.as_nested_tensor(prompts, layout=torch.jagged)
    answers = np.array([{"ground_truth": str(2 * row + 2)} for row in range(4)], dtype=object)
    out = tu.get_tensordict(
        tensor_dict=fields,
        non_tensor_dict={"raw_prompt": messages, "teacher_prompt": messages.copy(), "reward_model": answers},
    )
    tu.assign_non_tensor(out, mini_batch_size=4)
    return out


def _student_inputs(worker) -> list[torch.Tensor]:
    seen = []
    worker.student.module.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return seen


def test_teacher_prompt_equal_to_the_students_gives_zero_divergence(models):
    student, _ = models
    worker = tiny_worker(student, student, "opd.teacher_prompt=column")
    metrics = worker.update_actor(_chat_rollout(student, seed=40))["metrics"]
    assert abs(metrics["opd/loss"]) < 1e-5 and metrics["opd/grad_norm"] < 1e-3


def test_privileged_prompt_changes_the_teacher_signal_and_nothing_of_the_student(models):
    student, _ = models
    lr0 = "actor_rollout_ref.actor.optim.lr=0"
    runs = {}
    for mode in ("same", "template"):
        worker = tiny_worker(student, student, lr0, f"opd.teacher_prompt={mode}")
        inputs = _student_inputs(worker)
        runs[mode] = (worker.update_actor(_chat_rollout(student, seed=41))["metrics"], inputs)
    (same, same_inputs), (privileged, privileged_inputs) = runs["same"], runs["template"]
    assert abs(same["opd/loss"]) < 1e-5
    # the teacher read the answer-bearing prompt: its signal, and so the loss, moved
    assert privileged["opd/loss"] > 1e-4
    assert privileged["opd/teacher_nll"] != pytest.approx(same["opd/teacher_nll"], rel=1e-4)
    # the student saw exactly the same tokens, and scored them the same
    assert len(same_inputs) == len(privileged_inputs)
    assert all(torch.equal(a, b) for a, b in zip(same_inputs, privileged_inputs, strict=True))
    assert privileged["opd/student_entropy"] == pytest.approx(same["opd/student_entropy"], rel=1e-6)


def test_teacher_signal_at_tool_tokens_never_reaches_the_student(models, monkeypatch):
    """Tool tokens (response_mask 0) are outside the loss: scrambling the teacher's signal there leaves
    every student gradient bit-identical."""
    import dataclasses

    import opd.worker

    student, teacher = models
    data = rollout_batch(4, seed=50)  # tokens 2 and 3 of every response are tool output
    real_phase = opd.worker.run_teacher_phase

    def scrambled_phase(engine, micro_batches, **kwargs):
        cache = real_phase(engine, micro_batches, **kwargs)
        generator = torch.Generator().manual_seed(0)
        for micro_batch, signal in zip(micro_batches, cache.signals, strict=True):
            tool = torch.cat(micro_batch.loss_mask) == 0
            assert tool.any()
            for field in dataclasses.fields(signal):
                value = getattr(signal, field.name)
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and value.shape[:1] == tool.shape
                ):
                    noise = torch.randn(value[tool].shape, generator=generator).to(value.dtype)
                    value[tool] = value[tool] + 10 * noise
        return cache

    clean = _gradients_at_each_step(tiny_worker(student, teacher, "actor_rollout_ref.actor.optim.lr=0"), data)
    monkeypatch.setattr(opd.worker, "run_teacher_phase", scrambled_phase)
    scrambled = _gradients_at_each_step(
        tiny_worker(student, teacher, "actor_rollout_ref.actor.optim.lr=0"), data
    )
    assert len(clean) == len(scrambled) == 1
    for name, grad in clean[0].items():
        assert torch.equal(grad, scrambled[0][name]), name
    assert any(grad.abs().sum() > 0 for grad in clean[0].values())


def test_teacher_trace_gaps_are_zero_without_privilege_and_positive_with_it(models):
    student, _ = models
    data = _chat_rollout(student, seed=60)
    prompts = [p.tolist() for p in data["prompts"].unbind()]
    worker = tiny_worker(student, student, "opd.val_max_new_tokens=6")
    same = worker.evaluate_opd(prompts, prompts)
    assert abs(same["val-opd/teacher_trace_nll_gap"]) < 1e-4
    assert abs(same["val-opd/final_answer_gap"]) < 1e-4
    # a teacher prompt the student never sees: the student is worse on the teacher's own traces
    privileged = [[*p[:-3], *b"The answer is 7.", *p[-3:]] for p in prompts]
    gaps = worker.evaluate_opd(prompts, privileged)
    assert gaps["val-opd/teacher_trace_nll_gap"] != pytest.approx(0.0, abs=1e-3)
    assert "val-opd/teacher_trace_nll_gap" not in worker.evaluate_opd(prompts)

"""The fused output head (``opd.fused_output_head``): the objective computes ``hidden @ W^T`` chunk by chunk.

Claims checked here: for every objective and every teacher signal the fused head gives the loss and the
gradients w.r.t. the hidden states and ``W`` of the float64 reference (the logits ``hidden @ W^T`` through
plain autograd), for padded heads too; with a bf16 matmul it matches the unfused bf16 head up to bf16
rounding; a divergence computes each chunk's logits once, for its value and gradient; the real worker (verl
FSDP2, tied and untied embeddings, with and without remove-padding) sees the same gradients and ends several
steps at the same weights fused or not; a head that is not a plain linear map falls back to the model's own
head with the reason logged once. ``test_loss_memory.py`` bounds its memory.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch
from inprocess import free_port
from opd_harness import (
    full_state,
    recorded_gradients,
    rollout_batch,
    tiny_worker,
    with_advantages,
    with_rollout_log_probs,
)
from test_hidden_signal import tiny_causal_lm
from test_inf_teacher import CHUNK, LENGTHS, STEP, TEMPERATURE, make_config, reference, rollout_logp
from test_pg_losses import policy_config  # noqa: F401  (module-scoped fixture: verl's actor config)
from test_worker import models  # noqa: F401  (module-scoped fixture: student, padded-vocabulary teacher)
from tiny_models import build_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective, task_policy_loss
from opd.objectives.divergences import LOSS_REGISTRY, chunked_distill_loss
from opd.objectives.engine import OutputHead
from opd.objectives.policy_gradient import PG_OBJECTIVES
from opd.objectives.teacher_signal import CachedSignal, HiddenTimesHead, SignalSpec, signal_from_logits
from opd.objectives.topk import TOPK_LOSS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOKENS = sum(LENGTHS)
HIDDEN = 16
HEADS = {"same": (31, 31), "student-larger": (35, 31), "teacher-larger": (31, 35)}
CASES = [(name, signal) for name in sorted(LOSS_REGISTRY) for signal in ("full", "hidden")] + [
    (TOPK_LOSS, "topk"),
    *((name, "sampled") for name in PG_OBJECTIVES),
]


def random_head(v_s: int, v_t: int, seed: int):
    """float64 student hidden [N, H] and head [v_s, H], teacher hidden [N, H] and head [v_t, H], ids, weights.

    Both heads are scaled so the logits spread like a real model's (std about 3).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(v_s, HIDDEN, generator=g, dtype=torch.float64) * 3 / HIDDEN**0.5
    teacher_hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    teacher_head = torch.randn(v_t, HIDDEN, generator=g, dtype=torch.float64) * 3 / HIDDEN**0.5
    ids = torch.randint(0, min(v_s, v_t), (TOKENS,), generator=g)
    weights = torch.rand(TOKENS, generator=g, dtype=torch.float64) + 0.1
    weights[7] = 0.0
    return hidden, weight, teacher_hidden, teacher_head, ids, (weights / weights.sum()).float()


def make_signal(kind: str, config, teacher_hidden, teacher_head, ids, v_s: int) -> CachedSignal:
    """The cached signal of ``kind`` in float64 (the teacher phase's conversions, without the bf16 cast)."""
    if kind == "hidden":
        return CachedSignal(hidden=teacher_hidden, head=teacher_head)
    logits = teacher_hidden @ teacher_head.T
    if kind == "full":
        return CachedSignal(logits=logits)
    spec = SignalSpec(
        kind=kind, topk=config.topk, temperature=config.temperature, chunk_size=CHUNK, vocab_limit=v_s
    )
    return signal_from_logits(logits, ids, spec)


def objective(config, student, signal, ids, weights, rollout, policy_config):  # noqa: F811
    tokens = MicroBatchTokens(student, ids, (weights != 0).float(), LENGTHS, rollout, CHUNK, TEMPERATURE)
    ctx = ObjectiveContext(config, step=STEP, rollout_temperature=TEMPERATURE, policy_config=policy_config)
    return distillation_objective(tokens, signal, weights, ctx)


def fused_and_unfused(config, hidden, weight, signal, ids, weights, policy_config):  # noqa: F811
    """{"fused": ..., "unfused": ...} -> (output, grad of hidden, grad of W) from the same inputs."""
    rollout = rollout_logp(hidden @ weight.T, ids)
    runs = {}
    for name in ("fused", "unfused"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        student = OutputHead(h, w, torch.float64) if name == "fused" else h @ w.T
        out = objective(config, student, signal, ids, weights, rollout, policy_config)
        out.loss.backward()
        runs[name] = (out, h.grad, w.grad)
    return runs


@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize(("loss_type", "signal_kind"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_fused_head_is_the_float64_reference(loss_type, signal_kind, heads, policy_config):  # noqa: F811
    v_s, v_t = HEADS[heads]
    config = make_config(loss_type)
    hidden, weight, teacher_hidden, teacher_head, ids, weights = random_head(v_s, v_t, seed=80)
    signal = make_signal(signal_kind, config, teacher_hidden, teacher_head, ids, v_s)
    runs = fused_and_unfused(config, hidden, weight, signal, ids, weights, policy_config)
    logits = hidden @ weight.T
    ref_loss, ref_logit_grad = reference(
        config, logits, teacher_hidden @ teacher_head.T, ids, weights, signal
    )
    fused, (unfused_out, unfused_hidden_grad, unfused_weight_grad) = runs["fused"], runs["unfused"]
    out, hidden_grad, weight_grad = fused
    # the policy-gradient objectives hand verl float32 advantages; everything else stays float64
    tol = 1e-6 if loss_type in PG_OBJECTIVES else 1e-10
    for got, want in (
        (out.loss, ref_loss),
        (hidden_grad, ref_logit_grad @ weight),
        (weight_grad, ref_logit_grad.T @ hidden),
    ):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    # and the unfused path (logits through autograd) is the same computation
    torch.testing.assert_close(out.loss, unfused_out.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hidden_grad, unfused_hidden_grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(weight_grad, unfused_weight_grad, rtol=1e-10, atol=1e-13)
    for field in ("divergence", "student_logp", "teacher_logp", "student_entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(unfused_out, field), rtol=1e-10, atol=1e-12)
    # the vocabulary rule: the student's padded head rows get no gradient from a divergence
    if loss_type not in PG_OBJECTIVES and v_s > v_t:
        assert torch.all(weight_grad[v_t:] == 0)
    assert float(weight_grad.abs().max()) > 0 and float(hidden_grad.abs().max()) > 0


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("loss_type", ["reverse_kl", "jsd"])
def test_each_chunk_computes_its_logits_once(loss_type):
    """Value and gradient come from one computation of each chunk's logits: with the fused head and the
    hidden signal, four products per row range in forward (student and teacher logits, the gradients of the
    hidden states and of W) and none in backward. A second backward through the retained graph recomputes
    and gives the same gradients."""
    v = 31
    hidden, weight, teacher_hidden, teacher_head, ids, weights = random_head(v, v, seed=81)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    teacher = HiddenTimesHead(teacher_hidden, teacher_head)
    with MatmulShapes() as forward:
        loss, _ = chunked_distill_loss(
            OutputHead(hidden, weight, torch.float64),
            teacher,
            ids,
            weights,
            chunk_size=CHUNK,
            loss_type=loss_type,
        )
    with MatmulShapes() as backward:
        loss.backward(retain_graph=True)
    logits = [shape for shape in forward.shapes if shape[1] == v]
    # student and teacher logits alternate, each row once
    assert sum(rows for rows, _ in logits[::2]) == TOKENS and logits[::2] == logits[1::2], forward.shapes
    assert len(forward.shapes) == 2 * len(logits), forward.shapes
    assert backward.shapes == []
    first = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    loss.backward()
    torch.testing.assert_close((hidden.grad, weight.grad), first, rtol=1e-12, atol=1e-15)


def test_tip_probe_and_task_loss_through_the_fused_head(policy_config):  # noqa: F811
    """TIP's no-grad probe and GRPO + OPD's task loss read the fused head like the unfused logits."""
    config = make_config("jsd")
    hidden, weight, teacher_hidden, teacher_head, ids, weights = random_head(31, 35, seed=81)
    signal = make_signal("hidden", config, teacher_hidden, teacher_head, ids, 31)
    rollout = rollout_logp(hidden @ weight.T, ids)
    advantages = torch.linspace(-1.0, 1.0, TOKENS)
    ctx = ObjectiveContext(config, STEP, TEMPERATURE, policy_config)
    results = {}
    for name in ("fused", "unfused"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        student = OutputHead(h, w, torch.float64) if name == "fused" else h @ w.T
        tokens = MicroBatchTokens(student, ids, (weights != 0).float(), LENGTHS, rollout, CHUNK, TEMPERATURE)
        with torch.no_grad():
            probe = distillation_objective(tokens, signal, weights, ctx)
        loss, _ = task_policy_loss(tokens, advantages, weights, ctx)
        loss.backward()
        results[name] = (probe, loss.detach(), h.grad, w.grad)
    (probe, loss, h_grad, w_grad), (ref_probe, ref_loss, ref_h_grad, ref_w_grad) = results.values()
    assert not probe.loss.requires_grad
    for field in ("divergence", "student_entropy", "student_logp"):
        torch.testing.assert_close(getattr(probe, field), getattr(ref_probe, field), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h_grad, ref_h_grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(w_grad, ref_w_grad, rtol=1e-10, atol=1e-13)
    assert float(w_grad.abs().max()) > 0


@pytest.mark.parametrize(("loss_type", "signal_kind"), [("reverse_kl", "hidden"), (TOPK_LOSS, "topk")])
def test_bf16_matmul_matches_the_unfused_bf16_head(loss_type, signal_kind, policy_config):  # noqa: F811
    """Under bf16 autocast the model's head returns bf16 logits; the fused head computes the same bf16 product
    per chunk, so the two agree up to bf16 rounding (the fused backward's products run in float32)."""
    config = make_config(loss_type)
    hidden, weight, teacher_hidden, teacher_head, ids, weights = random_head(31, 31, seed=82)
    hidden, weight = hidden.bfloat16(), weight.float()
    signal = make_signal(signal_kind, config, teacher_hidden.float(), teacher_head.float(), ids, 31)
    runs = {}
    for name in ("fused", "unfused"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if name == "fused":
            student = OutputHead(h, w, torch.bfloat16)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                student = torch.nn.functional.linear(h, w)
            assert student.dtype == torch.bfloat16
        out = objective(config, student, signal, ids, weights, None, policy_config)
        out.loss.backward()
        runs[name] = (out.loss.detach(), h.grad.float(), w.grad)
    (loss, h_grad, w_grad), (ref_loss, ref_h_grad, ref_w_grad) = runs["fused"], runs["unfused"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)  # the same bf16 logits
    for got, want in ((h_grad, ref_h_grad), (w_grad, ref_w_grad)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * float(want.abs().max()))


# ------------------------------------------------------------------------------------------------------------
# Choosing the fused head
# ------------------------------------------------------------------------------------------------------------


def test_a_head_that_is_not_a_plain_linear_map_falls_back_with_the_reason_logged_once(monkeypatch, caplog):
    import opd.student

    calls = []
    monkeypatch.setattr(opd.student, "response_logits", lambda *a, **k: calls.append("logits") or "logits")
    monkeypatch.setattr(opd.student, "response_hidden_states", lambda *a, **k: calls.append("hidden"))
    monkeypatch.setattr("opd.console._warned", set())
    capped = SimpleNamespace(
        module=tiny_causal_lm(final_logit_softcapping=30.0), _autocast_dtype=torch.float32
    )
    with caplog.at_level(logging.WARNING, logger="opd.student"):
        for fused in (True, True, False):
            assert opd.student.student_rows(capped, None, 0, torch.device("cpu"), fused) == "logits"
    assert calls == ["logits"] * 3
    assert len(caplog.records) == 1 and "final_logit_softcapping=30.0" in caplog.text
    plain = SimpleNamespace(module=tiny_causal_lm(), _autocast_dtype=torch.bfloat16)
    monkeypatch.setattr(opd.student, "response_hidden_states", lambda *a, **k: torch.zeros(3, 32))
    rows = opd.student.student_rows(plain, None, 0, torch.device("cpu"), True)
    assert isinstance(rows, OutputHead) and rows.matmul_dtype == torch.bfloat16
    assert rows.weight.shape == (40, 32) and rows.weight.requires_grad


# ------------------------------------------------------------------------------------------------------------
# The real in-process worker (verl FSDP2 engines, tiny models)
# ------------------------------------------------------------------------------------------------------------

LR0 = "actor_rollout_ref.actor.optim.lr=0"


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied_student")
    build_tiny_model(path, num_layers=2, seed=3, tie_word_embeddings=True)
    return str(path)


def hidden_state_forwards(worker) -> list[str]:
    """Records, per student forward, whether its head ran (logits) or was bypassed (hidden states)."""
    kinds = []
    head = worker.student.module.get_output_embeddings()
    vocab = head.weight.shape[0]
    worker.student.module.register_forward_hook(
        lambda _m, _args, out: kinds.append("logits" if out.logits.shape[-1] == vocab else "hidden")
    )
    return kinds


FP32 = "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"
"""FSDP computes in float32 (autocast off): the fused and unfused heads then differ by rounding order only."""


def assert_same_gradients(fused: dict, unfused: dict, tolerance: float) -> None:
    """Every parameter's gradient equal up to ``tolerance`` relative to its largest entry."""
    assert fused.keys() == unfused.keys()
    for name, grad in unfused.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(fused[name], grad, rtol=tolerance, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize(
    ("student_kind", "overrides", "tolerance"),
    [
        ("tied", (FP32,), 1e-4),
        ("untied", (FP32,), 1e-4),
        ("tied", (FP32, "actor_rollout_ref.model.use_remove_padding=false"), 1e-4),
        ("untied", (FP32, "opd.loss_type=forward_kl_topk", "opd.topk=8", "opd.task_loss_coef=1.0"), 1e-4),
        # bf16 autocast: the unfused head rounds its logits' gradient to bf16, the fused one keeps float32
        ("tied", (), 3e-2),
    ],
    ids=["tied", "untied", "tied-padded-batch", "untied-topk-task", "tied-bf16"],
)
def test_worker_gradients_are_the_same_fused_or_not(models, tied_student, student_kind, overrides, tolerance):  # noqa: F811
    student, teacher = models
    student = tied_student if student_kind == "tied" else student
    data = rollout_batch(4, seed=60)
    if "opd.task_loss_coef=1.0" in overrides:
        data = with_advantages(with_rollout_log_probs(data, student), [1.0, -1.0, 0.5, -0.5])
    grads, kinds = {}, {}
    for fused in (True, False):
        worker = tiny_worker(student, teacher, LR0, f"opd.fused_output_head={fused}", *overrides)
        kinds[fused] = hidden_state_forwards(worker)
        grads[fused], _ = recorded_gradients(worker, data)
    assert set(kinds[True]) == {"hidden"} and set(kinds[False]) == {"logits"}
    assert_same_gradients(grads[True][0], grads[False][0], tolerance)


def test_tied_student_ends_several_steps_at_the_same_weights(tied_student, models):  # noqa: F811
    """Three Adam steps: the shared embedding / head matrix and every other weight move the same way."""
    _, teacher = models
    data = rollout_batch(4, seed=61)
    moved = {}
    for fused in (True, False):
        worker = tiny_worker(tied_student, teacher, FP32, f"opd.fused_output_head={fused}")
        before = full_state(worker.student.module)
        _, metrics = recorded_gradients(worker, data, steps=3)
        after = full_state(worker.student.module)
        moved[fused] = ({k: after[k] - before[k] for k in before}, [m["opd/loss"] for m in metrics])
    (fused_delta, fused_losses), (delta, losses) = moved[True], moved[False]
    assert fused_losses == pytest.approx(losses, rel=1e-5)
    assert losses[1] < losses[0]  # the steps did train
    assert "model.embed_tokens.weight" in delta and "lm_head.weight" not in delta  # one shared matrix
    for name, change in delta.items():
        assert float(change.norm()) > 0, name
        assert float((fused_delta[name] - change).norm()) <= 1e-3 * float(change.norm()), name


def two_rank_gradients(rank: int, port: int, student: str, teacher: str, results, *overrides: str) -> None:
    """One rank of a two-rank gloo run, both ranks with real (different) rows: its recorded gradients."""
    worker = tiny_worker(student, teacher, LR0, *overrides, rank=rank, world_size=2, port=port)
    grads, metrics = recorded_gradients(worker, rollout_batch(4, seed=70 + rank))
    results.put((rank, {k: v.tolist() for k, v in grads[0].items()}, metrics[0]["opd/loss"]))


def run_two_ranks(student: str, teacher: str, *overrides: str):
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    procs = [
        context.Process(target=two_rank_gradients, args=(rank, port, student, teacher, results, *overrides))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        collected = {rank: (grads, loss) for rank, grads, loss in (results.get(timeout=300) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(timeout=60)  # tearing down a rank takes a while on a loaded machine
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    grads, loss = collected[0]
    return {k: torch.tensor(v) for k, v in grads.items()}, loss


@pytest.mark.slow
@pytest.mark.parametrize("student_kind", ["tied", "untied"])
def test_two_ranks_average_the_head_gradient_as_fsdp_does(models, tied_student, student_kind):  # noqa: F811
    """Two ranks with different rows: the head is a sharded DTensor, its gathered copy's gradient must come
    back to each shard averaged over both ranks, as FSDP averages the rest."""
    student, teacher = models
    student = tied_student if student_kind == "tied" else student
    fused, fused_loss = run_two_ranks(student, teacher, FP32, "opd.fused_output_head=true")
    unfused, loss = run_two_ranks(student, teacher, FP32, "opd.fused_output_head=false")
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert_same_gradients(fused, unfused, 1e-4)

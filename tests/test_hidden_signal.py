"""The 'hidden' teacher signal: exact full-vocabulary divergences from cached final hidden states.

The teacher phase caches the teacher's final (post-norm) hidden states ``[sum R_i, H]`` in bf16 and keeps its
output head ``[V_t, H]`` on the device; the loss rebuilds the teacher's logits chunk by chunk as
``hidden @ head^T``. Claims checked here: with float64 inputs it is the float64 reference exactly; in bf16 it
gives the loss and gradients of the 'full' signal (the cached bf16 logits) up to bf16 rounding, for every
full-vocabulary objective, padded heads and the TIP probe included; the real worker caches ``2 * H`` bytes per
token and matches 'full' for tied and untied teachers; a head that is not a plain linear map falls back to
'full' with the reason logged.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch
from inprocess import free_port
from opd_harness import recorded_gradients, rollout_batch, run_rank, tiny_worker
from test_inf_teacher import CHUNK, LENGTHS, STEP, TEMPERATURE, make_config, reference
from test_loss_memory import row_reading
from test_worker import models  # noqa: F401  (module-scoped fixture: student, padded-vocabulary teacher)
from tiny_models import TOKENIZER_SIZE, build_tiny_model

from opd.config import OPDConfig, OPDConfigError
from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective
from opd.objectives.divergences import LOSS_REGISTRY
from opd.objectives.teacher_signal import CachedSignal
from opd.objectives.token_selection import tip_keep_mask, tip_scores
from opd.teacher import choose_signal

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FULL_VOCABULARY = sorted(LOSS_REGISTRY)
HIDDEN = 24
TOKENS = sum(LENGTHS)
HEADS = {"same": (31, 31), "teacher-larger": (31, 35), "student-larger": (35, 31)}


def hidden_inputs(v_s: int, v_t: int, seed: int):
    """Student logits [N, v_s] fp32; bf16 teacher hidden [N, H] and head [v_t, H]; ids [N]; weights [N].

    The head is scaled so the teacher's logits spread like a real model's (std about 3).
    """
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(TOKENS, v_s, generator=g) * 3
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16()
    head = (torch.randn(v_t, HIDDEN, generator=g) * 3 / HIDDEN**0.5).bfloat16()
    ids = torch.randint(0, min(v_s, v_t), (TOKENS,), generator=g)
    weights = torch.rand(TOKENS, generator=g) + 0.1
    weights[7] = 0.0
    return student, hidden, head, ids, weights / weights.sum()


def exact_logits(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Float64 ``hidden @ head^T``; [N, H], [V_t, H] -> [N, V_t]."""
    return hidden.double() @ head.double().T


def run(config: OPDConfig, student: torch.Tensor, signal: CachedSignal, ids, weights):
    """(ObjectiveOutput, gradient of the student logits) of one objective call plus backward."""
    x = student.clone().requires_grad_(True)
    tokens = MicroBatchTokens(
        student=x,
        token_ids=ids,
        mask=(weights != 0).float(),
        lengths=LENGTHS,
        rollout_logp=None,
        chunk_size=CHUNK,
        rollout_temperature=TEMPERATURE,
    )
    ctx = ObjectiveContext(config, step=STEP, rollout_temperature=TEMPERATURE)
    out = distillation_objective(tokens, signal, weights, ctx)
    out.loss.backward()
    return out, x.grad


# ------------------------------------------------------------------------------------------------------------
# Unit level: the loss on random tensors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize("loss_type", FULL_VOCABULARY)
def test_hidden_signal_is_the_float64_reference(loss_type, heads):
    """All float64: rebuilding the logits chunk by chunk, in forward and backward, loses nothing."""
    config = make_config(loss_type)
    student, hidden, head, ids, weights = hidden_inputs(*HEADS[heads], seed=70)
    signal = CachedSignal(hidden=hidden.double(), head=head.double())
    out, grad = run(config, student.double(), signal, ids, weights)
    logits = exact_logits(hidden, head)
    ref_loss, ref_grad = reference(config, student, logits, ids, weights, signal)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    shared = min(HEADS[heads])
    teacher_logp = torch.log_softmax(logits[:, :shared] / TEMPERATURE, -1).gather(-1, ids[:, None])
    torch.testing.assert_close(out.teacher_logp.double(), teacher_logp.squeeze(-1), rtol=1e-6, atol=1e-6)
    assert torch.all(grad[:, shared:] == 0)


@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize("loss_type", FULL_VOCABULARY)
def test_hidden_signal_matches_full_within_bf16_rounding(loss_type, heads):
    """As cached: bf16 hidden states and head vs the bf16 logits the 'full' signal caches."""
    config = make_config(loss_type)
    student, hidden, head, ids, weights = hidden_inputs(*HEADS[heads], seed=71)
    logits = exact_logits(hidden, head)
    hidden_out, hidden_grad = run(config, student, CachedSignal(hidden=hidden, head=head), ids, weights)
    full_out, full_grad = run(config, student, CachedSignal(logits=logits.bfloat16()), ids, weights)
    ref_loss, ref_grad = reference(config, student, logits, ids, weights, None)
    for loss, grad in ((hidden_out.loss, hidden_grad), (full_out.loss, full_grad)):
        assert_bf16_close(loss.double(), ref_loss)
        assert_bf16_close(grad.double(), ref_grad)
    assert_bf16_close(hidden_out.loss, full_out.loss)
    assert_bf16_close(hidden_grad, full_grad)
    assert_bf16_close(hidden_out.divergence, full_out.divergence)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to what rounding the teacher logits to bf16 moves (measured here: at most 7e-4 relative on
    the losses, 6e-3 of the largest gradient entry); the teacher at T = 1 instead of 0.8 moves them 7%+."""
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("loss_type", FULL_VOCABULARY)
def test_tip_probe_keeps_the_same_tokens(loss_type):
    """TIP's no-grad probe reads the objective's divergence: the same ranking from either signal."""
    config = make_config(loss_type)
    student, hidden, head, ids, weights = hidden_inputs(31, 31, seed=72)
    masks = [m for m in (weights != 0).float().split(LENGTHS)]
    kept = []
    for signal in (CachedSignal(hidden=hidden, head=head), CachedSignal(logits=exact_logits(hidden, head))):
        with torch.no_grad():
            tokens = MicroBatchTokens(student, ids, (weights != 0).float(), LENGTHS, None, CHUNK, TEMPERATURE)
            probe = distillation_objective(
                tokens, signal, weights, ObjectiveContext(config, STEP, TEMPERATURE)
            )
        scores = tip_scores(probe.student_entropy, probe.divergence, "entropy_plus_divergence")
        kept.append(tip_keep_mask(scores, masks, 0.5))
    assert torch.equal(kept[0], kept[1]) and 0 < kept[0].sum() < TOKENS


@pytest.mark.parametrize("loss_type", FULL_VOCABULARY)
def test_student_equal_to_teacher_gives_zero(loss_type):
    config = make_config(loss_type)
    _, hidden, head, ids, weights = hidden_inputs(31, 31, seed=73)
    student = torch.nn.functional.linear(hidden, head).float()  # the teacher's own bf16 logits
    out, grad = run(config, student, CachedSignal(hidden=hidden, head=head), ids, weights)
    assert abs(float(out.loss)) < 1e-6 and float(grad.abs().max()) < 1e-6
    assert float(out.divergence.abs().max()) < 1e-6


MEMORY_VOCAB, MEMORY_HIDDEN = 4096, 64


def hidden_loss_step(n: int, chunk: int, hidden: torch.Tensor | None = None):
    """A closure running one reverse-KL forward + backward with the hidden signal on ``n`` random tokens,
    and the student logits [n, MEMORY_VOCAB] it differentiates."""
    g = torch.Generator().manual_seed(n)
    student = torch.randn(n, MEMORY_VOCAB, generator=g).requires_grad_(True)
    hidden = torch.randn(n, MEMORY_HIDDEN, generator=g).bfloat16() if hidden is None else hidden
    head = torch.randn(MEMORY_VOCAB, MEMORY_HIDDEN, generator=g).bfloat16()
    tokens = MicroBatchTokens(student, torch.zeros(n, dtype=torch.long), torch.ones(n), [n], None, chunk, 1.0)
    ctx = ObjectiveContext(OPDConfig(teacher_model_path="unused", chunk_size=chunk), 1, 1.0)

    def step():
        out = distillation_objective(
            tokens, CachedSignal(hidden=hidden, head=head), torch.full((n,), 1 / n), ctx
        )
        out.loss.backward()
        return out.loss

    return step, student


def test_forward_and_backward_each_read_one_chunk_of_hidden_rows_at_a_time():
    """The [N, H] cache stays on the host; each pass rebuilds one chunk of teacher logits from it."""
    n, chunk, reads = 256, 32, []
    step, _ = hidden_loss_step(n, chunk, row_reading(torch.randn(n, MEMORY_HIDDEN).bfloat16(), reads))
    step()
    assert max(reads) <= chunk, reads
    assert len(reads) >= 2 * n // chunk, reads  # forward's chunks, then backward's again


# ------------------------------------------------------------------------------------------------------------
# Choosing the signal
# ------------------------------------------------------------------------------------------------------------


def tiny_causal_lm(*, bias: bool = False, **config_values):
    """An in-memory tiny Qwen2 causal LM, its head given a bias on request, extra config values set."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        **config_values,
    )
    model = AutoModelForCausalLM.from_config(config)
    if bias:
        model.lm_head = torch.nn.Linear(32, 40, bias=True)
    return model


NOT_PLAIN = {
    "bias": ({"bias": True}, "output head has a bias"),
    "softcapping": ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    "scaling": ({"logit_scale": 0.0625}, "logit_scale=0.0625"),
}


@pytest.mark.parametrize("case", NOT_PLAIN, ids=list(NOT_PLAIN))
def test_a_head_that_is_not_a_plain_linear_map_falls_back_to_full(case, caplog):
    values, reason = NOT_PLAIN[case]
    engine = SimpleNamespace(module=tiny_causal_lm(**values))
    with caplog.at_level(logging.WARNING, logger="opd.teacher"):
        assert choose_signal(OPDConfig(teacher_model_path="unused"), engine) == "full"
    assert len(caplog.records) == 1 and reason in caplog.text and "full bf16 logits" in caplog.text
    with pytest.raises(OPDConfigError, match=reason):
        choose_signal(OPDConfig(teacher_model_path="unused", teacher_signal="hidden"), engine)


def test_a_plain_head_gets_hidden_unless_full_is_asked_for(caplog):
    engine = SimpleNamespace(module=tiny_causal_lm())
    with caplog.at_level(logging.WARNING, logger="opd.teacher"):
        assert choose_signal(OPDConfig(teacher_model_path="unused"), engine) == "hidden"
        assert choose_signal(OPDConfig(teacher_model_path="unused", loss_type="jsd"), engine) == "hidden"
        assert choose_signal(OPDConfig(teacher_model_path="unused", teacher_signal="full"), engine) == "full"
        for loss_type, signal in (("forward_kl_topk", "topk"), ("sampled_rkl_pg", "sampled")):
            assert (
                choose_signal(OPDConfig(teacher_model_path="unused", loss_type=loss_type), engine) == signal
            )
    assert not caplog.records


def test_the_config_accepts_hidden_for_full_vocabulary_objectives_only(tmp_path):
    for loss_type in FULL_VOCABULARY:
        config = OPDConfig(teacher_model_path=str(tmp_path), loss_type=loss_type, teacher_signal="hidden")
        assert config.validate().teacher_signal == "hidden" and config.teacher_signal_given
    unset = OPDConfig(teacher_model_path=str(tmp_path)).validate()
    assert unset.teacher_signal == "full" and not unset.teacher_signal_given
    for loss_type, signal in (("forward_kl_topk", "hidden"), ("iw_opd", "full"), ("reverse_kl", "logits")):
        bad = OPDConfig(teacher_model_path=str(tmp_path), loss_type=loss_type, teacher_signal=signal)
        with pytest.raises(OPDConfigError, match="opd.teacher_signal"):
            bad.validate()


# ------------------------------------------------------------------------------------------------------------
# The real in-process worker
# ------------------------------------------------------------------------------------------------------------

LR0 = "actor_rollout_ref.actor.optim.lr=0"


@pytest.fixture(scope="module")
def tied_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied_teacher")
    build_tiny_model(path, num_layers=3, seed=2, tie_word_embeddings=True)
    return str(path)


def one_update(student: str, teacher: str, signal: str, *overrides: str, seed: int = 30):
    """Metrics, gradients of the one optimizer step, and the worker, for 4 samples at lr 0."""
    worker = tiny_worker(student, teacher, LR0, f"++opd.teacher_signal={signal}", *overrides)
    grads, (metrics,) = recorded_gradients(worker, rollout_batch(4, seed=seed))
    assert len(grads) == 1
    return metrics, grads[0], worker


def assert_same_update(hidden, full) -> None:
    (hidden_metrics, hidden_grads, _), (full_metrics, full_grads, _) = hidden, full
    # Both paths multiply the same bf16 hidden states by the same bf16 head (bitwise equal on this CPU); a
    # GPU's GEMMs of other shapes may round a few logits the other way, which moves these far less.
    assert hidden_metrics["opd/loss"] > 0
    assert hidden_metrics["opd/loss"] == pytest.approx(full_metrics["opd/loss"], rel=1e-3)
    assert hidden_metrics["opd/grad_norm"] == pytest.approx(full_metrics["opd/grad_norm"], rel=1e-3)
    for name, grad in full_grads.items():
        torch.testing.assert_close(hidden_grads[name], grad, rtol=1e-3, atol=5e-3 * float(grad.abs().max()))


@pytest.mark.parametrize("teacher_kind", ["untied-padded", "tied"])
def test_worker_update_with_hidden_equals_full(models, tied_teacher, teacher_kind):  # noqa: F811
    student, padded = models
    teacher = padded if teacher_kind == "untied-padded" else tied_teacher
    hidden = one_update(student, teacher, "hidden")
    full = one_update(student, teacher, "full")
    assert_same_update(hidden, full)
    rows = TOKENIZER_SIZE + 13 if teacher_kind == "untied-padded" else TOKENIZER_SIZE
    assert hidden[0]["opd/cache_bytes_per_token"] == 2 * 64  # the tiny models' hidden size
    assert full[0]["opd/cache_bytes_per_token"] == 2 * rows
    # with the signal left unset the worker's teacher engine (FSDP2, offloaded) qualifies for 'hidden'
    assert choose_signal(OPDConfig(teacher_model_path=teacher), hidden[2].teacher) == "hidden"


def test_worker_tip_with_jsd_equals_full(models):  # noqa: F811
    tip = ("opd.loss_type=jsd", "opd.tip_keep_fraction=0.5", "opd.tip_score=entropy_plus_divergence")
    hidden = one_update(*models, "hidden", *tip, seed=31)
    full = one_update(*models, "full", *tip, seed=31)
    assert hidden[0]["opd/kept_token_fraction"] == full[0]["opd/kept_token_fraction"] < 1
    assert_same_update(hidden, full)


def test_worker_student_equal_to_teacher_gives_zero_loss(models):  # noqa: F811
    student, _ = models
    metrics, _, _ = one_update(student, student, "hidden")
    assert metrics["opd/cache_bytes_per_token"] == 2 * 64
    assert abs(metrics["opd/loss"]) < 1e-5  # measured: 2e-7, as with the full signal


def two_rank_metrics(student: str, teacher: str, *overrides: str) -> dict[str, float]:
    """Rank 0's metrics of one update on two gloo ranks (rank 1 holds only padding rows)."""
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    procs = [
        context.Process(
            target=run_rank, args=(rank, 2, port, student, teacher, results, "padding", *overrides)
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        collected = dict(results.get(timeout=300) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return collected[0]


@pytest.mark.slow
def test_two_ranks_gather_the_sharded_head(models):  # noqa: F811
    """With two ranks the head is a DTensor sharded across them: gathered whole, it gives 'full''s update."""
    hidden = two_rank_metrics(*models, LR0, "++opd.teacher_signal=hidden")
    full = two_rank_metrics(*models, LR0, "++opd.teacher_signal=full")
    assert hidden["opd/cache_bytes_per_token"] == 2 * 64
    for key in ("opd/loss", "opd/grad_norm", "opd/teacher_nll"):
        assert hidden[key] == pytest.approx(full[key], rel=1e-3), key

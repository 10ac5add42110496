"""Output heads of different sizes (padded rows) on either side, for every teacher signal.

The rule (``opd.objectives``): the divergence compares the shared ids ``< V = min(V_s, V_t)``, with both
distributions renormalised there; a student's extra rows get no gradient from it. The policy-gradient
ratio alone keeps the student's whole head, which is what the rollout sampled from.
"""

from __future__ import annotations

import pytest
import torch
from test_inf_teacher import TEMPERATURE, make_config, reference, run_objective, teacher_logp
from test_losses import make_inputs
from test_pg_losses import policy_config  # noqa: F401

from opd.objectives.policy_gradient import PG_OBJECTIVES
from opd.objectives.teacher_signal import TEACHER_LOGP_FLOOR

SHARED = 25
HEADS = {"student-larger": (SHARED + 4, SHARED), "teacher-larger": (SHARED, SHARED + 4)}
LOSS_TYPES = ["reverse_kl", "jsd", "forward_kl_topk", "sampled_rkl_pg", "iw_opd"]  # full, topk, sampled


def padded_inputs(v_s: int, v_t: int):
    """Random logits whose extra rows hold much of each model's mass, so a wrong normaliser shows."""
    student, teacher, ids, weights = make_inputs(12, v_s, v_t, seed=62)
    student[:, SHARED:] += 4.0
    teacher[:, SHARED:] += 4.0
    weights[7] = 0.0
    return student, teacher.bfloat16().float(), ids, weights / weights.sum()


@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_signal_compares_the_shared_ids(loss_type, heads, policy_config):  # noqa: F811
    v_s, v_t = HEADS[heads]
    config = make_config(loss_type)
    student, teacher, ids, weights = padded_inputs(v_s, v_t)
    loss, grad, out, signal = run_objective(config, student, teacher, ids, weights, policy_config)
    assert grad.shape == student.shape
    ref_loss, ref_grad = reference(config, student, teacher, ids, weights, signal)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    keep = weights != 0
    shared_s = torch.log_softmax(student[:, :SHARED].double() / TEMPERATURE, -1)
    shared_t = teacher_logp(teacher, SHARED).clamp(min=TEACHER_LOGP_FLOOR)
    for got, want in ((out.student_logp, shared_s), (out.teacher_logp, shared_t)):
        want = want.gather(-1, ids[:, None]).squeeze(-1)
        torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-5, atol=1e-5)
    if loss_type not in PG_OBJECTIVES:
        assert torch.all(grad[:, SHARED:] == 0)


def test_the_extra_rows_carry_mass():
    """Renormalising on the shared ids must matter for the inputs above, or the test proves nothing."""
    for v_s, v_t in HEADS.values():
        student, teacher, _, _ = padded_inputs(v_s, v_t)
        for logits in (student, teacher):
            whole = torch.log_softmax(logits.double(), -1)[:, :SHARED]
            cut = torch.log_softmax(logits[:, :SHARED].double(), -1)
            if logits.shape[1] > SHARED:
                assert float((cut - whole).min()) > 0.2  # over a fifth of the mass in the extra rows

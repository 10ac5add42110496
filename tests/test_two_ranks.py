"""Two gloo ranks, one holding only padding rows or none: same collectives on both, no hang, same metrics."""

import multiprocessing as mp
import queue

import pytest
import torch
from inprocess import free_port
from opd_harness import rollout_batch, run_rank
from tiny_models import build_tiny_model

TIMEOUT_S = 300


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_type", "others"), [("reverse_kl", "padding"), ("iw_opd", "padding"), ("reverse_kl", "none")]
)
def test_rank_with_only_padding_rows_or_none_completes(tmp_path, loss_type, others):
    build_tiny_model(tmp_path / "student", num_layers=2, seed=0)
    build_tiny_model(tmp_path / "teacher", num_layers=3, seed=1)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(
            target=run_rank,
            args=(
                rank,
                2,
                port,
                str(tmp_path / "student"),
                str(tmp_path / "teacher"),
                results,
                others,
                f"opd.loss_type={loss_type}",
            ),
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    collected = {}
    try:
        for _ in procs:
            rank, metrics = results.get(timeout=TIMEOUT_S)
            collected[rank] = metrics
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(2)) - set(collected))} did not finish in {TIMEOUT_S}s (hang)")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    # the training metrics are all-reduced: both ranks report the same numbers
    for key in ("opd/loss", "opd/sampled_reverse_kl", "opd/teacher_nll", "opd/grad_norm", "opd/num_samples"):
        assert collected[0][key] == pytest.approx(collected[1][key]), key
    real_tokens = sum(int(m.sum()) for m in rollout_batch(4, seed=11)["response_mask"].unbind())
    assert collected[0]["opd/num_tokens"] == real_tokens
    assert torch.isfinite(torch.tensor(collected[0]["opd/loss"]))
    if loss_type == "iw_opd":
        # the min/max reductions ran on both ranks, the padding rank contributing nothing
        assert collected[0]["opd/iw_opd/weight_max"] == pytest.approx(collected[1]["opd/iw_opd/weight_max"])
        assert 1.0 <= collected[0]["opd/iw_opd/weight_min"] <= collected[0]["opd/iw_opd/weight_max"] <= 1.5
    else:
        assert collected[0]["opd/loss"] > 0

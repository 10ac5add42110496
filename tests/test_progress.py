"""The console summary at the end of a run."""

from opd.progress import StepClock, format_progress, format_summary


def test_summary_shows_held_out_changes_and_tool_calls():
    history = [
        {"step": 0, "val-opd/reverse_kl": 1.0, "val-opd/teacher_trace_nll_gap": 0.2},
        {"step": 1, "opd/agent/tool_calls_per_sample": 1.5},
        {"step": 2, "opd/agent/tool_calls_per_sample": 2.5, "val-opd/reverse_kl": 0.6},
        {"step": 2, "val-opd/teacher_trace_nll_gap": 0.15},
    ]
    text = format_summary(history)
    assert "val-opd/reverse_kl: 1.0000 -> 0.6000 (-40.0%)" in text
    assert "val-opd/teacher_trace_nll_gap: 0.2000 -> 0.1500 (-25.0%)" in text
    calls = "tool calls per sample: 1.50 (first step) -> 2.50 (last step), 2.00 on average over 2 steps"
    assert calls in text


def test_single_turn_summary_has_no_tool_line():
    text = format_summary([{"val-opd/reverse_kl": 1.0}, {"val-opd/reverse_kl": 0.5}])
    assert "tool calls" not in text


def test_progress_line_shows_agent_and_gap_metrics_when_present():
    line = format_progress(3, 8, {"opd/loss": 0.5, "opd/agent/tool_calls_per_sample": 1.25})
    assert line == "[opd] step 3/8 | loss 0.5000 | calls 1.25"


def test_the_progress_line_ends_with_the_time_left():
    assert format_progress(2, 8, {"opd/loss": 0.5}, eta_s=281.4) == "[opd] step 2/8 | loss 0.5000 | eta 4m41s"


def test_the_time_left_comes_from_the_steps_this_start_finished(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("opd.progress.time.monotonic", lambda: now[0])
    clock = StepClock(total_steps=10)
    clock.start(finished_step=4)  # resumed after step 4
    assert clock.eta_s(4) is None
    now[0] += 30.0
    assert clock.eta_s(5) == 150.0  # 30 s per step, 5 steps left
    now[0] += 50.0
    assert abs(clock.eta_s(7) - 80.0) < 1e-9  # 80 s over 3 steps, 3 left
    assert clock.eta_s(10) == 0.0

"""The console summary at the end of a run."""

from opd.progress import format_progress, format_summary


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

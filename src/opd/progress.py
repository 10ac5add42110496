"""Console output: a one-line progress report per step and the before/after summary of a run."""

from __future__ import annotations

import time

_FIELDS = (
    ("loss", "opd/loss", "{:.4f}"),
    ("rkl", "opd/sampled_reverse_kl", "{:.4f}"),
    ("teacher_nll", "opd/teacher_nll", "{:.3f}"),
    ("entropy", "opd/student_entropy", "{:.3f}"),
    ("acc", "opd/reward_accuracy", "{:.2f}"),
    ("grad_norm", "opd/grad_norm", "{:.3f}"),
    ("tokens", "opd/num_tokens", "{:.0f}"),
    ("teacher", "opd/timing/teacher_s", "{:.1f}s"),
    ("student", "opd/timing/student_s", "{:.1f}s"),
    ("step", "timing_s/step", "{:.1f}s"),
    ("mem_t", "opd/memory/teacher_peak_gb", "{:.2f}GB"),
    ("mem_s", "opd/memory/student_peak_gb", "{:.2f}GB"),
    ("turns", "opd/agent/turns_mean", "{:.2f}"),
    ("calls", "opd/agent/tool_calls_per_sample", "{:.2f}"),
    ("tool_err", "opd/agent/tool_error_fraction", "{:.2f}"),
    ("tool_tok", "opd/tool_mask/tool_fraction", "{:.2f}"),
    ("val_rkl", "val-opd/reverse_kl", "{:.4f}"),
    ("val_teacher_answer_nll", "val-opd/teacher_answer_nll", "{:.4f}"),
    ("val_trace_gap", "val-opd/teacher_trace_nll_gap", "{:.4f}"),
    ("val_final_gap", "val-opd/final_answer_gap", "{:.4f}"),
)

_HELD_OUT = (
    "val-opd/reverse_kl",
    "val-opd/teacher_answer_nll",
    "val-opd/forward_kl",
    "val-opd/teacher_trace_nll_gap",
    "val-opd/final_answer_gap",
)


_TOOL_CALLS = "opd/agent/tool_calls_per_sample"


def format_progress(step: int, total_steps: int, metrics: dict, eta_s: float | None = None) -> str:
    """``[opd] step 3/20 | loss 0.81 | rkl 0.75 | ... | eta 4m10s`` with whatever of the known metrics is
    present."""
    parts = [f"[opd] step {step}/{total_steps}"]
    for label, key, fmt in _FIELDS:
        if key in metrics:
            parts.append(f"{label} {fmt.format(float(metrics[key]))}")
    if eta_s is not None:
        minutes, seconds = divmod(round(eta_s), 60)
        parts.append(f"eta {minutes}m{seconds:02d}s")
    return " | ".join(parts)


class StepClock:
    """Time left in a run, from the mean wall time of the steps this start has finished (validation and
    checkpoints included, so the estimate covers what the remaining steps will really cost)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._start: tuple[int, float] | None = None

    def start(self, finished_step: int) -> None:
        """Training (re)starts after ``finished_step`` (the restored step on resume, else 0)."""
        self._start = (finished_step, time.monotonic())

    def eta_s(self, finished_step: int) -> float | None:
        if self._start is None or finished_step <= self._start[0]:
            return None
        first, started = self._start
        per_step = (time.monotonic() - started) / (finished_step - first)
        return per_step * max(self.total_steps - finished_step, 0)


def format_summary(history: list[dict]) -> str:
    """The held-out metrics at the first and the last evaluation, with the relative change."""
    lines = ["[opd] held-out summary (first -> last evaluation):"]
    for key in _HELD_OUT:
        values = [record[key] for record in history if key in record]
        if len(values) < 2:
            continue
        first, last = values[0], values[-1]
        change = 100.0 * (last - first) / abs(first) if first else float("nan")
        lines.append(f"[opd]   {key}: {first:.4f} -> {last:.4f} ({change:+.1f}%)")
    if len(lines) == 1:
        lines.append("[opd]   (fewer than two held-out evaluations)")
    calls = [record[_TOOL_CALLS] for record in history if _TOOL_CALLS in record]
    if calls:
        # agent runs: whether the student kept calling tools while it was distilled
        lines.append(
            f"[opd] tool calls per sample: {calls[0]:.2f} (first step) -> {calls[-1]:.2f} (last step), "
            f"{sum(calls) / len(calls):.2f} on average over {len(calls)} steps"
        )
    return "\n".join(lines)

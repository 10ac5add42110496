"""PNG of the training curves of one run."""

from __future__ import annotations

import math

_PANELS = (
    ("distillation loss", ("opd/loss",)),
    ("sampled-token reverse KL", ("opd/sampled_reverse_kl",)),
    ("teacher NLL of student tokens", ("opd/teacher_nll",)),
    ("student entropy", ("opd/student_entropy",)),
    ("reward accuracy", ("opd/reward_accuracy",)),
    ("held-out", ("val-opd/reverse_kl", "val-opd/teacher_answer_nll")),
    ("tool use (agent runs)", ("opd/agent/tool_calls_per_sample", "opd/agent/turns_mean")),
    ("tool errors and mask", ("opd/agent/tool_error_fraction", "opd/tool_mask/tool_fraction")),
    ("teacher-trace gaps (privileged)", ("val-opd/teacher_trace_nll_gap", "val-opd/final_answer_gap")),
)


def plot_training_curves(history: list[dict], path: str) -> str:
    """Draw one panel per metric group against the step; return ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a panel only for metrics the run logged (single-turn runs have no agent metrics)
    panels = [(title, keys) for title, keys in _PANELS if any(k in r for r in history for k in keys)]
    rows = max(1, math.ceil(len(panels) / 3))
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.5 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o", markersize=3, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

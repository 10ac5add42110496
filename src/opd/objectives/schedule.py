"""Step-dependent settings: PACED's forward-then-reverse KL schedule."""

from __future__ import annotations


def reverse_kl_weight(step: int, switch_step: int, blend_steps: int) -> float:
    """Weight of reverse KL in ``forward_then_reverse_kl`` at training ``step`` (1-based).

    0 before ``switch_step``; from there 1 at once (``blend_steps = 0``) or rising linearly to 1 over
    ``blend_steps`` steps.
    """
    if step < switch_step:
        return 0.0
    if blend_steps <= 0:
        return 1.0
    return min(1.0, (step - switch_step + 1) / blend_steps)

"""Evaluation of a model on the prepared benchmarks through verl's validation path.

``eval.scoring`` wraps the reward so every graded sample keeps its benchmark in verl's validation
dump; ``eval.report`` turns that dump (and verl's validation metrics) into per-benchmark accuracy,
mean@k and pass@k. ``scripts/eval/eval_math.sh`` runs both.
"""

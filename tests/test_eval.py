"""Evaluation reports: pass@k, parsing verl's metrics, and eval_math.sh through verl's validation."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import defaultdict

import pandas as pd
import pytest
from script_runs import PARITY_REWARD, dry_run, run_script, script_env, write_inputs

from eval import report, scoring

E2E_TIMEOUT_S = 600


@pytest.mark.parametrize(("n", "c"), [(1, 0), (1, 1), (4, 1), (5, 2), (6, 6), (6, 0)])
def test_pass_at_k_equals_enumeration_of_subsets(n, c):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert report.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_report_ks_and_benchmark_names():
    assert (
        report.report_ks(1) == [1]
        and report.report_ks(4) == [1, 2, 4]
        and report.report_ks(6) == [1, 2, 4, 6]
    )
    assert report.benchmark_name("opd/math500") == "math500" and report.benchmark_name("gsm8k") == "gsm8k"


def _rows(source, scores_per_prompt):
    return [
        {"input": f"q{i}", "output": "", "score": s, "data_source": source, "prompt_id": f"{source}:{i}"}
        for i, scores in enumerate(scores_per_prompt)
        for s in scores
    ]


def test_summary_from_samples_is_exact_per_benchmark():
    rows = _rows("opd/math500", [[1, 0, 0, 0], [0, 0, 0, 0]]) + _rows("opd/aime2024", [[1, 1, 1, 1]])
    summary = report.summarize_generations(rows)
    assert set(summary) == {"math500", "aime2024"}
    math500 = summary["math500"]
    assert (math500["num_prompts"], math500["samples_per_prompt"]) == (2, 4)
    assert math500["accuracy"] == pytest.approx(1 / 8) and math500["mean@4"] == pytest.approx(1 / 8)
    assert math500["pass@1"] == pytest.approx(1 / 8)
    assert math500["pass@2"] == pytest.approx((1 - math.comb(3, 2) / math.comb(4, 2)) / 2)
    assert math500["pass@4"] == pytest.approx(0.5)  # exact; verl's bootstrap best@4 would give ~0.34
    assert summary["aime2024"]["pass@4"] == 1.0


def test_rows_without_benchmark_are_rejected():
    with pytest.raises(ValueError, match="eval.scoring"):
        report.summarize_generations([{"input": "q", "score": 1.0}])


def test_verl_metrics_from_console_and_file_logger(tmp_path):
    console = (
        "(TaskRunnerV1 pid=1) step:0 - val-aux/opd/math500/reward/mean@2:np.float64(0.25) - "
        "val-core/opd/math500/acc/mean@2:np.float64(0.25) - val-core/opd/math500/acc/best@2/mean:0.4 - "
        "val-aux/opd/math500/acc/std@2:0.1 - val-aux/num_turns/min:np.int64(2)\n"
    )
    (tmp_path / "console.log").write_text("noise\n" + console)
    record = {
        "step": 0,
        "data": {"val-core/opd/math500/acc/mean@2": 0.25, "val-core/opd/math500/acc/best@2/mean": 0.4},
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "data": {"actor/loss": 1}}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps(record) + "\n")
    for name in ("console.log", "val.jsonl"):
        summary = report.summarize_metrics(report.load_validation_metrics(tmp_path / name))
        assert summary["math500"]["mean@2"] == 0.25 and summary["math500"]["best@2/mean"] == 0.4
    with pytest.raises(ValueError, match="no validation metrics"):
        report.load_validation_metrics(tmp_path / "metrics.jsonl")
    # without a dump the report falls back to verl's numbers
    fallback = report.build_report(None, report.load_validation_metrics(tmp_path / "val.jsonl"))
    assert fallback["benchmarks"]["math500"] == {
        "data_source": "opd/math500",
        "samples_per_prompt": 2,
        "accuracy": 0.25,
        "mean@2": 0.25,
        "pass@1": 0.25,
        "pass@2": 0.4,
    }
    assert "| math500 |  | 2 | 25.0 | 25.0 | 25.0 | 40.0 |" in report.to_markdown(fallback)


def test_scoring_wrapper_keeps_benchmark_and_prompt(tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(PARITY_REWARD)
    result = scoring.compute_score("opd/math500", "ab", "x", extra_info={"index": 7}, reward=str(reward))
    assert result == {"score": 1.0, "acc": 1.0, "data_source": "opd/math500", "prompt_id": "opd/math500:7"}
    # the default grades by data_source with the project's rules; a reward name grades every row with it
    assert scoring.compute_score("opd/math500", "so \\boxed{4}", "4")["score"] == 1.0
    assert scoring.compute_score("opd/math500", "so \\boxed{4}", "4", reward="dapo_reward")["score"] == 0.0
    assert scoring.named_score("opd/math500", "Answer: 4", "4", reward="dapo_reward") == 1.0


def _benchmark_dir(inputs, root):
    """Two benchmark files in verl's RL format (plus a train file the script must skip)."""
    val = pd.read_parquet(inputs["data"] / "val.parquet")
    folder = root / "bench" / "plain"
    folder.mkdir(parents=True)
    val.head(6).to_parquet(folder / "arithmetic.parquet")
    math500 = val.tail(4).assign(data_source="opd/math500")
    math500.to_parquet(folder / "math500.parquet")
    val.to_parquet(folder / "train.parquet")
    return folder.parent


def test_eval_command_uses_verl_validation_only(tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    bench = _benchmark_dir(inputs, tmp_path)
    env = script_env(
        dict(os.environ),
        MODEL_PATH=inputs["model"],
        DATA_DIR=bench,
        INSTRUCTION_VARIANT="plain",
        EVAL_DRY_RUN=1,
        OUTPUT_ROOT=tmp_path / "out",
    )
    _, o = dry_run("eval/eval_math.sh", [], env)
    assert o["trainer.val_only"] == "true" and o["trainer.val_before_train"] == "true"
    assert o["trainer.resume_mode"] == "disable"
    # graded by data_source, through the dict reward that keeps each sample's benchmark in the dump
    assert o["reward.custom_reward_function.path"] == "pkg://eval.scoring"
    assert o["reward.custom_reward_function.reward_kwargs.reward"] == ""
    files = o["data.val_files"]
    assert "arithmetic.parquet" in files and "math500.parquet" in files and "train.parquet" not in files
    arf = "actor_rollout_ref.rollout.val_kwargs"
    assert (o[f"{arf}.n"], o[f"{arf}.do_sample"], o[f"{arf}.temperature"]) == ("1", "false", "0")
    _, o = dry_run("eval/eval_math.sh", [], {**env, "VAL_N": "4", "VAL_TOP_P": "0.9", "VAL_TOP_K": "20"})
    assert (o[f"{arf}.n"], o[f"{arf}.do_sample"], o[f"{arf}.temperature"]) == ("4", "true", "1.0")
    assert (o[f"{arf}.top_p"], o[f"{arf}.top_k"]) == ("0.9", "20")


@pytest.mark.slow
def test_eval_math_reports_every_benchmark(isolated_run_env, tmp_path):
    inputs = write_inputs(tmp_path / "inputs", reward=PARITY_REWARD)
    eval_dir = tmp_path / "eval"
    env = script_env(
        isolated_run_env,
        MODEL_PATH=inputs["model"],
        MODEL_NAME="tiny",
        DATA_DIR=_benchmark_dir(inputs, tmp_path),
        INSTRUCTION_VARIANT="plain",
        REWARD_FUNCTION=inputs["reward"],
        VAL_N=2,
        MAX_PROMPT_LENGTH=256,
        MAX_RESPONSE_LENGTH=16,
        EVAL_DIR=eval_dir,
    )
    start = time.monotonic()
    rc, log = run_script("eval/eval_math.sh", [], env, tmp_path, tmp_path / "eval.log", E2E_TIMEOUT_S)
    print(f"eval_math.sh, 10 prompts x 2 samples: {time.monotonic() - start:.1f}s wall")
    assert rc == 0, log[-6000:]
    assert "step:1 " not in log and not (eval_dir / "checkpoints").exists()  # no training step

    result = json.loads((eval_dir / "report.json").read_text())
    benchmarks = result["benchmarks"]
    assert set(benchmarks) == {"arithmetic", "math500"}
    assert result["model"] == "tiny" and result["val_n"] == "2"

    # recompute from the per-sample dump, independently of the report code
    rows = [json.loads(line) for line in (eval_dir / "generations" / "0.jsonl").read_text().splitlines()]
    assert len(rows) == (6 + 4) * 2
    groups = defaultdict(lambda: defaultdict(list))
    for row in rows:
        assert row["score"] == float(len(row["output"].encode()) % 2 == 0)  # the REWARD_FUNCTION given
        groups[row["data_source"]][row["prompt_id"]].append(row["score"])
    for name, prompts in (("arithmetic", 6), ("math500", 4)):
        stats, samples = benchmarks[name], groups[f"opd/{name}"]
        assert (stats["num_prompts"], stats["samples_per_prompt"]) == (prompts, 2)
        assert all(len(s) == 2 for s in samples.values())
        flat = [x for s in samples.values() for x in s]
        assert stats["accuracy"] == pytest.approx(sum(flat) / len(flat)) == pytest.approx(stats["pass@1"])
        assert stats["pass@2"] == pytest.approx(sum(max(s) for s in samples.values()) / prompts)
        # verl's own validation metrics agree on the mean
        assert result["verl_metrics"][name]["mean@2"] == pytest.approx(stats["mean@2"])
    table = (eval_dir / "report.md").read_text()
    assert "| benchmark | prompts | n | accuracy | mean@2 | pass@1 | pass@2 |" in table
    assert "| math500 | 4 | 2 |" in table

"""Start-up check that the prompts' answer format and the reward grading them agree."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.instructions import MathProblem, apply_instruction, build_row
from rewards import dispatch
from rewards.agreement import check_reward_agreement, main

PROBLEM = MathProblem("What is 2 + 2?", "4", "p0")


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prepared_file(tmp_path: Path, variant: str, benchmark: str = "aime2024", name: str | None = None) -> Path:
    rows = [
        build_row(PROBLEM, benchmark=benchmark, variant=variant, split="test", index=i, source_file="x")
        for i in range(3)
    ]
    return write_rows(tmp_path / (name or f"{benchmark}-{variant}.parquet"), rows)


@pytest.mark.parametrize("variant", ["boxed", "dapo", "none"])
def test_prepared_files_agree(tmp_path, variant):
    entries = check_reward_agreement(
        [prepared_file(tmp_path, variant), prepared_file(tmp_path, variant, "gsm8k")]
    )
    rewards = {e.data_source: e.reward for e in entries}
    expected = {"boxed": "math_reward", "dapo": "dapo_reward", "none": "free_form_reward"}[variant]
    assert rewards[f"opd/aime2024{'' if variant == 'boxed' else '@' + variant}"] == expected
    assert entries[0].rows == 3
    assert "gsm8k_reward" in rewards.values()


def test_boxed_prompts_under_an_answer_parser_fail(tmp_path):
    # The anchor repo's defect: prompts ask for \boxed{}, the data_source picks the Answer: parser.
    rows = [
        build_row(PROBLEM, benchmark="dapo_math", variant="boxed", split="train", index=0, source_file="x")
    ]
    rows[0]["data_source"] = "opd/dapo_math@dapo"
    path = write_rows(tmp_path / "train.parquet", rows)
    with pytest.raises(
        ValueError, match=r"ask for the answer in \\boxed\{\}.*dapo_reward grades the last 'Answer:'"
    ):
        check_reward_agreement(path)


@pytest.mark.parametrize(
    ("variant", "reward", "message"),
    [
        ("boxed", "dapo_reward", "dapo_reward grades the last 'Answer:' line"),
        ("dapo", "math_reward", "math_reward grades the last \\boxed{}"),
        ("none", "math_reward", "ask for no answer format"),
    ],
)
def test_named_reward_must_match_the_prompts(tmp_path, variant, reward, message):
    path = prepared_file(tmp_path, variant)
    with pytest.raises(ValueError, match="agreement check failed") as err:
        check_reward_agreement([path], reward_function_name=reward)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("variant", ["boxed", "dapo", "none"])
def test_format_agnostic_rewards_accept_every_variant(tmp_path, variant):
    path = prepared_file(tmp_path, variant)
    for reward in ("free_form_reward", "gsm8k_reward"):
        assert check_reward_agreement(path, reward)[0].reward == reward


def test_unknown_reward_function_and_data_source(tmp_path):
    with pytest.raises(ValueError, match="unknown reward function 'nope'.*dapo_reward"):
        check_reward_agreement(prepared_file(tmp_path, "boxed"), reward_function_name="nope")
    rows = [build_row(PROBLEM, benchmark="mystery", variant="boxed", split="test", index=0, source_file="x")]
    with pytest.raises(ValueError, match="no reward for data_source 'opd/mystery'"):
        check_reward_agreement(write_rows(tmp_path / "m.parquet", rows))


def test_untagged_files_are_judged_by_prompt_text(tmp_path):
    # Files written elsewhere carry no extra_info.instruction_variant: the prompt text tells.
    def row(variant: str, data_source: str) -> dict:
        content = apply_instruction(PROBLEM.question, variant)
        return {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": content}],
            "reward_model": {"style": "rule", "ground_truth": "4"},
            "extra_info": {"index": 0},
        }

    good = write_rows(
        tmp_path / "good.parquet", [row("dapo", "opd/math500@dapo"), row("boxed", "opd/math500")]
    )
    assert {e.instruction_variant for e in check_reward_agreement(good)} == {"dapo", "boxed"}
    bad = write_rows(tmp_path / "bad.parquet", [row("boxed", "opd/math500@dapo")])
    with pytest.raises(ValueError, match="instruction_variant 'boxed'"):
        check_reward_agreement(bad)


def test_reads_only_the_tag_when_present(tmp_path):
    # No prompt column at all: the check must not need it when extra_info carries the variant.
    rows = [{"data_source": "opd/gsm8k@dapo", "extra_info": {"index": 0, "instruction_variant": "dapo"}}]
    assert check_reward_agreement(write_rows(tmp_path / "t.parquet", rows))[0].reward == "gsm8k_reward"


def test_unknown_variant_missing_file_and_missing_column(tmp_path):
    rows = [{"data_source": "opd/math500", "extra_info": {"index": 0, "instruction_variant": "latex"}}]
    with pytest.raises(ValueError, match="unknown instruction_variant 'latex'"):
        check_reward_agreement(write_rows(tmp_path / "v.parquet", rows))
    with pytest.raises(ValueError, match="no such data file: .*absent.parquet"):
        check_reward_agreement(tmp_path / "absent.parquet")
    with pytest.raises(ValueError, match="no 'data_source' column"):
        check_reward_agreement(write_rows(tmp_path / "c.parquet", [{"prompt": "x"}]))
    with pytest.raises(ValueError, match="no data files"):
        check_reward_agreement([])


def test_custom_scorer_without_declared_format_is_not_judged(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "_SCORERS", dict(dispatch._SCORERS))
    dispatch.register_scorer("opd/mystery@dapo", lambda solution, truth: 0.0)
    rows = [build_row(PROBLEM, benchmark="mystery", variant="dapo", split="test", index=0, source_file="x")]
    assert check_reward_agreement(write_rows(tmp_path / "m.parquet", rows))[0].rows == 1


def test_cli(tmp_path, capsys):
    path = prepared_file(tmp_path, "dapo")
    assert main([str(path)]) == 0
    assert "opd/aime2024@dapo [dapo] -> dapo_reward" in capsys.readouterr().out
    assert main([str(path), "--reward-function", "math_reward"]) == 1
    assert "agreement check failed" in capsys.readouterr().err

"""Math data preparation: readers for every published shape, instruction variants, splits, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import prepare_grpo_data as prep
from data import process_eval_data as evaldata
from data.instructions import (
    BOXED_INSTRUCTION,
    DAPO_PREFIX,
    DAPO_SUFFIX,
    apply_instruction,
    data_source_name,
    detect_variant,
    strip_instruction,
)
from data.sources import DataError, as_answer, as_solution
from opd.teacher_prompts import check_teacher_prompts
from rewards.agreement import check_reward_agreement

# The real GSM8K / MATH-500 / AIME 2024 files live in the `shared` folder beside the checkout.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file(),
    reason=f"real data sets not present at {SHARED_DATA} (only on the project's own machines)",
)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def dapo_prompt(question: str) -> list[dict]:
    # DAPO-Math-17k ships its problems wrapped in its own Answer: instruction.
    return [{"role": "user", "content": f"{DAPO_PREFIX}\n\n{question}\n\n{DAPO_SUFFIX}"}]


def write_anchor_layout(root: Path, dapo_count: int = 20) -> Path:
    """Small files in the anchor repo's default layout, in each published shape."""
    dapo = [
        {
            "data_source": "math_dapo",
            "prompt": dapo_prompt(f"What is {i} plus {i}? Give the sum."),
            "ability": "MATH",
            "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{i}"},
        }
        for i in range(dapo_count)
    ]
    dapo.append(dict(dapo[0], extra_info={"index": "uuid-duplicate"}))  # the same question twice
    write_parquet(root / "DAPO-Math-17k-dedup" / "distinct-prompts-with-rewards.parquet", dapo)
    write_parquet(
        root / "AIME_2024" / "aime_2024_problems.parquet",
        [
            {
                "ID": f"2024-I-{i}",
                "Problem": f"AIME 2024 problem number {i}.",
                "Solution": "Long. " * 40,
                "Answer": i,
            }
            for i in range(1, 4)
        ],
    )
    write_jsonl(
        root / "AIME_2025" / "train.jsonl",
        [{"question": f"AIME 2025 problem number {i}.", "answer": str(100 + i)} for i in range(2)],
    )
    write_jsonl(
        root / "MATH-500" / "test.jsonl",
        [
            {
                "problem": "Compute one half as a fraction.",
                "solution": "It is $\\boxed{\\frac{1}{2}}$. " * 5,
                "answer": "\\frac{1}{2}",
                "unique_id": "test/algebra/1.json",
            }
        ],
    )
    return root


# --------------------------------------------------------------------------------------------------
# instructions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["boxed", "dapo", "none"])
def test_instruction_round_trip(variant):
    question = "What is 2 + 2?"
    text = apply_instruction(question, variant)
    assert strip_instruction(text) == question
    assert detect_variant(text) == variant


def test_data_source_names_encode_the_variant():
    assert data_source_name("aime2024", "boxed") == "opd/aime2024"
    assert data_source_name("aime2024", "dapo") == "opd/aime2024@dapo"
    assert data_source_name("gsm8k", "none") == "opd/gsm8k@none"
    with pytest.raises(ValueError, match="unknown instruction variant 'latex'"):
        data_source_name("gsm8k", "latex")


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("Natalia sold 72 clips.\n#### 72", "72"),
        ("So 2,125 in total.\n#### 2,125", "2125"),
        ({"ground_truth": "34", "style": "rule"}, "34"),
        (204, "204"),
        (7.0, "7"),
        ("  ", None),
        (None, None),
    ],
)
def test_answer_cells(cell, expected):
    assert as_answer(cell) == expected


# --------------------------------------------------------------------------------------------------
# the real files in shared/data
# --------------------------------------------------------------------------------------------------


@needs_shared
def test_real_files(tmp_path):
    prepared = prep.prepare_grpo_data(SHARED_DATA, tmp_path, train_ratio=0.95, seed=0)
    assert prepared.train_source == "gsm8k"  # no DAPO in shared/data: GSM8K train is the fallback
    assert prepared.counts["train"] + prepared.counts["val"] == 7473
    assert set(prepared.benchmarks) == {"aime2024", "math500", "gsm8k"}

    aime = read_rows(prepared.benchmarks["aime2024"])
    assert len(aime) == 30 and aime[0]["reward_model"]["ground_truth"] == "204"
    assert aime[0]["extra_info"]["source_id"] == "60"
    math500 = read_rows(prepared.benchmarks["math500"])
    assert len(math500) == 500 and math500[0]["data_source"] == "opd/math500"
    assert math500[0]["reward_model"]["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    gsm8k = read_rows(prepared.benchmarks["gsm8k"])
    assert len(gsm8k) == 1319 and gsm8k[0]["reward_model"]["ground_truth"] == "18"
    assert all("," not in row["reward_model"]["ground_truth"] for row in gsm8k)  # "#### 2,125" -> "2125"
    assert all(row["prompt"][0]["content"].endswith(BOXED_INSTRUCTION) for row in gsm8k)
    check_reward_agreement([prepared.train, prepared.val, *prepared.benchmarks.values()])


# --------------------------------------------------------------------------------------------------
# fixtures in every other published shape
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["boxed", "dapo", "none"])
def test_anchor_layout_every_shape(tmp_path, variant):
    data_dir = write_anchor_layout(tmp_path / "data")
    out = tmp_path / "out"
    prepared = prep.prepare_grpo_data(data_dir, out, train_ratio=0.75, seed=3, variant=variant)
    assert prepared.train_source == "dapo_math"
    assert prepared.counts == {"train": 15, "val": 5}  # 21 rows, one duplicate question removed
    assert set(prepared.benchmarks) == {"aime2024", "aime2025", "math500"}

    train = read_rows(prepared.train)
    row = train[0]
    assert row["data_source"] == data_source_name("dapo_math", variant)
    assert row["ability"] == "math"
    assert row["reward_model"]["style"] == "rule"
    assert row["extra_info"]["instruction_variant"] == variant and row["extra_info"]["split"] == "train"
    assert row["extra_info"]["source_id"].startswith("uuid-")
    content = row["prompt"][0]["content"]
    # DAPO's own instruction was stripped, so the chosen one appears exactly once.
    assert content.count("Answer:") == (2 if variant == "dapo" else 0)
    assert ("\\boxed{}" in content) is (variant == "boxed")

    aime24 = read_rows(prepared.benchmarks["aime2024"])
    assert [r["reward_model"]["ground_truth"] for r in aime24] == ["1", "2", "3"]
    assert [r["extra_info"]["source_id"] for r in aime24] == ["2024-I-1", "2024-I-2", "2024-I-3"]
    assert "AIME 2024 problem number 1." in aime24[0]["prompt"][0]["content"]
    aime25 = read_rows(prepared.benchmarks["aime2025"])
    assert [r["reward_model"]["ground_truth"] for r in aime25] == ["100", "101"]
    assert read_rows(prepared.benchmarks["math500"])[0]["reward_model"]["ground_truth"] == "\\frac{1}{2}"

    entries = check_reward_agreement([prepared.train, prepared.val, *prepared.benchmarks.values()])
    assert {e.instruction_variant for e in entries} == {variant}


def test_split_is_disjoint_and_seeded(tmp_path):
    data_dir = write_anchor_layout(tmp_path / "data", dapo_count=40)

    def questions(seed: int, name: str) -> list[str]:
        prepared = prep.prepare_grpo_data(data_dir, tmp_path / f"out{seed}{name}", train_ratio=0.8, seed=seed)
        return [r["prompt"][0]["content"] for r in read_rows(getattr(prepared, name))]

    train, val = questions(1, "train"), questions(1, "val")
    assert len(train) == 32 and len(val) == 8
    assert not set(train) & set(val)
    assert questions(1, "val") == val  # same seed, same split
    assert questions(2, "val") != val


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_train_ratio_must_leave_both_splits(tmp_path, ratio):
    with pytest.raises(SystemExit):
        prep.main(["--data-dir", str(write_anchor_layout(tmp_path)), "--train-ratio", str(ratio)])


def test_columns_detected_by_name_and_content(tmp_path):
    # Upper-case names, "problem" instead of "question", and a worked solution that is no answer.
    write_jsonl(
        tmp_path / "AIME_2025" / "train.jsonl",
        [
            {
                "PROBLEM": "Find x if 2x = 10.",
                "Solution": "Divide by two. " * 20,
                "Final_Answer": "5",
                "Id": "a",
            }
        ],
    )
    written = evaldata.write_benchmark_files(tmp_path, tmp_path / "out", source_keys=["aime2025"])
    row = read_rows(written["aime2025"])[0]
    assert row["reward_model"]["ground_truth"] == "5"
    assert row["extra_info"]["source_id"] == "a"
    assert row["prompt"][0]["content"].startswith("Find x if 2x = 10.")


def test_missing_answer_column_names_it(tmp_path, capsys):
    path = write_parquet(
        tmp_path / "AIME_2024" / "aime_2024_problems.parquet",
        [{"ID": "2024-I-1", "Problem": "A problem without answer.", "Solution": "Long solution text. " * 10}],
    )
    with pytest.raises(DataError, match="no answer column") as err:
        evaldata.write_benchmark_files(tmp_path, tmp_path / "out", source_keys=["aime2024"])
    message = str(err.value)
    assert "AIME 2024" in message and str(path) in message and "Solution" in message
    assert "worked solutions" in message  # why the Solution column was not taken as the answer

    assert evaldata.main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 1
    assert "no answer column" in capsys.readouterr().err


def test_missing_question_column_names_it(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "What is 1 + 1 here?", "answer": "2"}])
    with pytest.raises(DataError, match="no question column.*problem, question"):
        evaldata.write_benchmark_files(tmp_path, tmp_path / "out", files={"math500": tmp_path / "x.jsonl"})


def test_missing_files(tmp_path, capsys):
    # An explicitly given file must exist.
    with pytest.raises(DataError, match="MATH-500 file not found: .*nope.jsonl"):
        evaldata.write_benchmark_files(tmp_path, tmp_path / "out", files={"math500": tmp_path / "nope.jsonl"})
    # No training set at all: the error names both places looked at.
    code = prep.main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "no training set found" in err and "distinct-prompts-with-rewards.parquet" in err
    assert "gsm8k/train.jsonl" in err


def test_gsm8k_fallback_and_skipped_benchmarks(tmp_path, capsys):
    rows = [
        {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"so\n#### {i + 2}"}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    code = prep.main(
        ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--train-ratio", "0.8"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "skip AIME 2024" in out and "skip MATH-500" in out  # optional benchmarks: logged skips
    assert "train: 8 rows" in out and "val: 2 rows" in out
    train = read_rows(tmp_path / "out" / "train.parquet")
    assert train[0]["data_source"] == "opd/gsm8k"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.parquet", "val.parquet"]


def test_eval_and_training_preparation_build_the_same_rows(tmp_path):
    data_dir = write_anchor_layout(tmp_path / "data")
    code = evaldata.main(
        ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval"), "--instruction-variant", "dapo"]
    )
    assert code == 0
    prepared = prep.prepare_grpo_data(data_dir, tmp_path / "grpo", variant="dapo")
    for benchmark, path in prepared.benchmarks.items():
        assert read_rows(tmp_path / "eval" / f"{benchmark}.parquet") == read_rows(path)


def test_default_output_folder_is_per_variant(tmp_path, monkeypatch):
    # scripts/eval/eval_math.sh reads DATA_DIR/<INSTRUCTION_VARIANT>/*.parquet.
    data_dir = write_anchor_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert evaldata.main(["--data-dir", str(data_dir), "--instruction-variant", "none"]) == 0
    written = sorted(p.name for p in (tmp_path / "data" / "eval_processed" / "none").iterdir())
    assert written == ["aime2024.parquet", "aime2025.parquet", "math500.parquet"]


# --------------------------------------------------------------------------------------------------
# worked solutions and the privileged teacher's prompt
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "answer_cell", "expected"),
    [
        ("She sold 48/2 = <<48/2=24>>24 clips.\nSo 72.\n#### 72", True, "She sold 48/2 = 24 clips.\nSo 72."),
        ("\\frac{1}{2}", True, None),  # a plain answer holds no solution
        (204, True, None),
        ("  It is $\\boxed{5}$.  ", False, "It is $\\boxed{5}$."),
        ("   ", False, None),
        (None, False, None),
    ],
)
def test_solution_cells(cell, answer_cell, expected):
    assert as_solution(cell, answer_cell=answer_cell) == expected


def test_solutions_are_kept_in_extra_info_without_a_teacher_column(tmp_path):
    prepared = prep.prepare_grpo_data(write_anchor_layout(tmp_path / "data"), tmp_path / "out")
    assert "solution" not in read_rows(prepared.train)[0]["extra_info"]  # DAPO has none
    aime24 = read_rows(prepared.benchmarks["aime2024"])
    assert aime24[0]["extra_info"]["solution"] == ("Long. " * 40).strip()
    assert read_rows(prepared.benchmarks["math500"])[0]["extra_info"]["solution"].startswith("It is $\\boxed")
    for path in [prepared.train, prepared.val, *prepared.benchmarks.values()]:
        assert "teacher_prompt" not in pq.read_schema(path).names


def test_teacher_context_solution_puts_a_teacher_prompt_on_every_row(tmp_path):
    prepared = prep.prepare_grpo_data(
        write_anchor_layout(tmp_path / "data"), tmp_path / "out", teacher_context="solution"
    )
    files = [prepared.train, prepared.val, *prepared.benchmarks.values()]
    for path in files:
        assert check_teacher_prompts(path, "column") == len(read_rows(path))
    # DAPO and AIME 2025 have no solution: the teacher is given the answer
    for row in read_rows(prepared.val) + read_rows(prepared.benchmarks["aime2025"]):
        teacher = row["teacher_prompt"][0]["content"]
        assert teacher.startswith(row["prompt"][0]["content"])
        assert f"the correct final answer is {row['reward_model']['ground_truth']}." in teacher
    # AIME 2024 and MATH-500 have one: the teacher is given the worked solution
    for benchmark in ("aime2024", "math500"):
        row = read_rows(prepared.benchmarks[benchmark])[0]
        teacher = row["teacher_prompt"][0]["content"]
        assert teacher.startswith(row["prompt"][0]["content"]) and row["extra_info"]["solution"] in teacher
    check_reward_agreement(files)  # the extra column leaves the reward check as it was


def test_teacher_context_answer_never_shows_the_solution(tmp_path):
    data_dir = write_anchor_layout(tmp_path / "data")
    code = evaldata.main(
        ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval"), "--teacher-context", "answer"]
    )
    assert code == 0
    row = read_rows(tmp_path / "eval" / "math500.parquet")[0]
    teacher = row["teacher_prompt"][0]["content"]
    assert (
        row["extra_info"]["solution"] not in teacher
        and "the correct final answer is \\frac{1}{2}." in teacher
    )
    with pytest.raises(SystemExit):
        prep.main(["--data-dir", str(data_dir), "--teacher-context", "hint"])


def test_gsm8k_worked_solution_reaches_train_and_val(tmp_path):
    rows = [
        {
            "question": f"Tom has {i} apples and buys 2. How many?",
            "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}",
        }
        for i in range(10)
    ]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    code = prep.main(
        ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--teacher-context", "solution"]
    )
    assert code == 0
    for name in ("train.parquet", "val.parquet"):
        for row in read_rows(tmp_path / "out" / name):
            answer = int(row["reward_model"]["ground_truth"])
            assert row["extra_info"]["solution"] == f"{answer - 2} + 2 = {answer}"
            assert row["extra_info"]["solution"] in row["teacher_prompt"][0]["content"]


@needs_shared
def test_real_files_with_teacher_context(tmp_path):
    prepared = prep.prepare_grpo_data(SHARED_DATA, tmp_path, seed=0, teacher_context="solution")
    for path in [prepared.train, prepared.val, *prepared.benchmarks.values()]:
        solutions = pq.read_table(path, columns=["extra_info.solution"]).column("solution").to_pylist()
        assert all(solutions), path  # every GSM8K, MATH-500 and AIME 2024 row has one
        assert check_teacher_prompts(path, "column") == len(solutions)
    first = read_rows(prepared.benchmarks["gsm8k"])[0]
    assert first["extra_info"]["solution"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    assert "<<" not in first["teacher_prompt"][0]["content"]

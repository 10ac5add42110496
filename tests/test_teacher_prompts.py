"""Teacher prompts per row: the three modes, template checks, the launch-time file scan, tokenising and
the batch the teacher reads (its prompt + exactly the student's response)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import build_tiny_tokenizer

from opd.batch import build_opd_batch, chat_prompt_ids, response_token_ids
from opd.config import OPDConfig, OPDConfigError
from opd.teacher_prompts import (
    DEFAULT_TEMPLATE,
    SOLUTION_TEMPLATE,
    TeacherPromptError,
    check_teacher_prompts,
    context_messages,
    teacher_messages,
    template_placeholders,
    tokenize_teacher_prompts,
)


def _row(index: int = 0, **fields) -> dict:
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {index} + 2?"},
        ],
        "reward_model": {"style": "rule", "ground_truth": str(index + 2)},
        "extra_info": {"index": index, "solution": f"{index} + 2 = {index + 2}"},
        "teacher_prompt": [{"role": "user", "content": f"What is {index} + 2? It is {index + 2}."}],
    }
    row.update(fields)
    return row


# --------------------------------------------------------------------------------------------------
# teacher_messages
# --------------------------------------------------------------------------------------------------


def test_same_is_a_copy_of_the_students_prompt():
    row = _row()
    messages = teacher_messages(row, "same")
    assert messages == row["prompt"]
    messages[1]["content"] = "changed"
    assert row["prompt"][1]["content"] == "What is 0 + 2?"


def test_column_reads_the_teacher_prompt_column():
    assert teacher_messages(_row(3), "column") == [{"role": "user", "content": "What is 3 + 2? It is 5."}]


def test_default_template_rewrites_only_the_last_user_message():
    row = _row(
        prompt=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "What is 1 + 2?"},
        ]
    )
    messages = teacher_messages(row, "template")
    assert messages[:2] == row["prompt"][:2]
    assert messages[2]["content"] == DEFAULT_TEMPLATE.format(prompt="What is 1 + 2?", answer="2")
    assert messages[2]["content"].startswith("What is 1 + 2?\n\n")
    assert "the correct final answer is 2." in messages[2]["content"]
    assert "on your own" in messages[2]["content"]  # reason to it, do not copy it
    assert row["prompt"][2]["content"] == "What is 1 + 2?"


def test_custom_template_fills_every_placeholder_and_keeps_literal_braces():
    row = _row(4, reward_model={"ground_truth": "\\frac{1}{2}"})
    template = "{prompt} [{solution}] ({answer}) in \\boxed{{}}"
    content = teacher_messages(row, "template", template)[-1]["content"]
    # values are inserted verbatim: braces inside them are never parsed as placeholders
    assert content == "What is 4 + 2? [4 + 2 = 6] (\\frac{1}{2}) in \\boxed{}"


def test_numeric_answers_are_written_as_text():
    content = teacher_messages(_row(reward_model={"ground_truth": 204}), "template", "{prompt}={answer}")
    assert content[-1]["content"] == "What is 0 + 2?=204"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prompt} {hint} {answer.text}", r"unknown placeholder\(s\) \{answer.text\}, \{hint\}"),
        ("{prompt} {}", r"unknown placeholder\(s\) \{\}"),
        ("Answer: {answer}", r"must contain \{prompt\}"),
        ("{prompt", "malformed"),
    ],
)
def test_bad_templates_are_named(template, message):
    with pytest.raises(TeacherPromptError, match=message):
        template_placeholders(template)
    with pytest.raises(TeacherPromptError, match=message):
        teacher_messages(_row(), "template", template)


@pytest.mark.parametrize(
    ("mode", "template", "fields", "message"),
    [
        ("column", None, {"teacher_prompt": None}, "row 7: 'teacher_prompt' is missing"),
        ("column", None, {"teacher_prompt": []}, "row 7: 'teacher_prompt' is missing"),
        (
            "template",
            None,
            {"reward_model": {"ground_truth": " "}},
            r"row 7: reward_model.ground_truth .*\{answer\}",
        ),
        ("template", None, {"reward_model": None}, "row 7: reward_model.ground_truth is missing"),
        ("template", "{prompt}{solution}", {"extra_info": {}}, r"row 7: extra_info.solution .*\{solution\}"),
        (
            "template",
            None,
            {"prompt": [{"role": "system", "content": "x"}]},
            "row 7: 'prompt' has no user message",
        ),
        ("same", None, {"prompt": "What is 1 + 1?"}, "row 7: 'prompt' is missing or not a non-empty list"),
        ("same", None, {"prompt": [{"content": "x"}]}, "row 7: 'prompt' holds an entry without a 'role'"),
        ("same", None, {"prompt": [{"role": "user", "content": None}]}, "without text 'content'"),
    ],
)
def test_a_row_without_the_needed_field_names_the_row_and_field(mode, template, fields, message):
    with pytest.raises(TeacherPromptError, match=message):
        teacher_messages(_row(**fields), mode, template, index=7)


def test_the_row_index_defaults_to_extra_info_index():
    with pytest.raises(TeacherPromptError, match="row 12: 'teacher_prompt'"):
        teacher_messages(_row(12, teacher_prompt=None), "column")


def test_unknown_mode_and_context_are_rejected():
    with pytest.raises(TeacherPromptError, match="unknown teacher prompt mode 'teacher'"):
        teacher_messages(_row(), "teacher")
    with pytest.raises(TeacherPromptError, match="unknown teacher context 'hint'"):
        context_messages(_row(), "hint")


def test_context_solution_falls_back_to_the_answer():
    with_solution = context_messages(_row(1), "solution")[-1]["content"]
    assert "1 + 2 = 3" in with_solution and with_solution.startswith("What is 1 + 2?")
    without = context_messages(_row(1, extra_info={"index": 1}), "solution")[-1]["content"]
    assert without == context_messages(_row(1), "answer")[-1]["content"]
    assert "the correct final answer is 3." in without


# --------------------------------------------------------------------------------------------------
# the launch-time scan of a parquet file
# --------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_check_scans_every_row_in_batches_and_names_file_row_and_field(tmp_path):
    rows = [_row(i) for i in range(7)]
    rows[5]["extra_info"] = {"index": 5, "solution": None}
    path = _write(tmp_path / "train.parquet", rows)
    assert check_teacher_prompts(path, "template", batch_rows=2) == 7  # the default uses the answer only
    assert check_teacher_prompts(path, "column", batch_rows=2) == 7
    with pytest.raises(TeacherPromptError, match=rf"{path}: row 5: extra_info.solution is missing"):
        check_teacher_prompts(path, "template", "{prompt} {solution}", batch_rows=2)


def test_check_needs_only_the_fields_the_mode_uses(tmp_path):
    bare = [{"prompt": r["prompt"], "reward_model": {"ground_truth": "2"}} for r in [_row(), _row(1)]]
    path = _write(tmp_path / "val.parquet", bare)
    assert check_teacher_prompts(path, "same") == 2
    assert check_teacher_prompts(path, "template") == 2
    with pytest.raises(
        TeacherPromptError, match=rf"{path}: no 'teacher_prompt' field.*teacher_prompt=column"
    ):
        check_teacher_prompts(path, "column")
    with pytest.raises(TeacherPromptError, match="no 'extra_info.solution' field"):
        check_teacher_prompts(path, "template", "{prompt}{solution}")
    with pytest.raises(TeacherPromptError, match="no such data file"):
        check_teacher_prompts(tmp_path / "missing.parquet", "column")


# --------------------------------------------------------------------------------------------------
# tokenising and the teacher's batch
# --------------------------------------------------------------------------------------------------


def test_tokenize_uses_the_teacher_chat_template_and_the_students_kwargs():
    class Teacher:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
            assert add_generation_prompt and tokenize and kwargs == {"enable_thinking": False}
            return [100 + len(m["content"]) for m in messages] + [99]

    ids = tokenize_teacher_prompts(
        Teacher(), [[{"role": "user", "content": "abc"}]], {"enable_thinking": False}
    )
    assert [t.tolist() for t in ids] == [[103, 99]] and ids[0].dtype == torch.long


def test_privileged_teacher_batch_scores_exactly_the_students_response(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    rows = [_row(0), _row(31)]
    student = [torch.tensor(chat_prompt_ids(tokenizer, r["prompt"])) for r in rows]
    teacher = tokenize_teacher_prompts(tokenizer, [teacher_messages(r, "template") for r in rows])
    assert tokenizer.decode(teacher[1]).endswith("<|im_start|>assistant\n")
    assert all(t.numel() > s.numel() for t, s in zip(teacher, student, strict=True))
    responses = [torch.tensor([40, 41, 2]), torch.tensor([42, 2])]
    batch = build_opd_batch(
        responses=responses,
        response_mask=[torch.ones(3), torch.ones(2)],
        prompts=student,
        teacher_prompts=teacher,
    )
    view = batch.teacher_view()
    assert response_token_ids(view).tolist() == response_token_ids(batch).tolist() == [40, 41, 2, 42, 2]
    assert view.prompt_lengths.tolist() == [t.numel() for t in teacher]


# --------------------------------------------------------------------------------------------------
# the opd.teacher_prompt / opd.teacher_prompt_template keys
# --------------------------------------------------------------------------------------------------


def test_teacher_prompt_defaults_to_the_students(tmp_path):
    config = OPDConfig(teacher_model_path=str(tmp_path)).validate()
    assert (config.teacher_prompt, config.teacher_prompt_template) == ("same", None)
    chosen = OPDConfig.from_dict({"teacher_model_path": str(tmp_path), "teacher_prompt": "template"})
    assert chosen.validate().teacher_prompt == "template"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_prompt": "privileged"}, "opd.teacher_prompt must be one of"),
        ({"teacher_prompt_template": "{prompt} {answer}"}, "opd.teacher_prompt_template is set but unused"),
        (
            {"teacher_prompt": "template", "teacher_prompt_template": "{prompt} {hint}"},
            r"opd.teacher_prompt_template: .*unknown placeholder\(s\) \{hint\}",
        ),
    ],
)
def test_bad_config_values_are_named(tmp_path, overrides, message):
    with pytest.raises(OPDConfigError, match=message):
        OPDConfig(teacher_model_path=str(tmp_path), **overrides).validate()


def test_built_in_templates_by_name():
    row = _row(3, extra_info={"solution": "3 + 2 = 5"})
    by_name = teacher_messages(row, "template", "solution")
    assert by_name == teacher_messages(row, "template", SOLUTION_TEMPLATE)
    assert "3 + 2 = 5" in by_name[-1]["content"]
    assert teacher_messages(row, "template", "answer") == teacher_messages(row, "template", None)
    named = OPDConfig(teacher_model_path=".", teacher_prompt="template", teacher_prompt_template="solution")
    assert named.validate().teacher_prompt_template == "solution"

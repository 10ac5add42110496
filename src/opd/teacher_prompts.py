"""The teacher's prompt per dataset row, for privileged-context self-distillation.

In self-distillation the frozen teacher can be the student's own initial weights shown a privileged
prompt (the reference solution or answer) while the student sees the normal prompt; both score the
same response. ``opd.teacher_prompt`` picks the teacher's chat for each row:

* ``same``: the student's prompt (plain distillation);
* ``column``: the row's ``teacher_prompt`` column, chat messages written by data preparation
  (``--teacher-context solution|answer``);
* ``template``: the student's messages with the content of the last user message replaced by
  ``opd.teacher_prompt_template`` (null = :data:`DEFAULT_TEMPLATE`) formatted with ``{prompt}`` (the
  content it replaces), ``{answer}`` (``reward_model.ground_truth``) and ``{solution}``
  (``extra_info.solution``, the worked solution data preparation stores with each problem).

The teacher's input is its prompt followed by exactly the student's response tokens
(``opd.batch.OPDBatch.teacher_view``). :func:`check_teacher_prompts` scans every data file at launch,
so a row without the field its mode needs stops the run before any model loads.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEACHER_PROMPT_MODES = ("same", "column", "template")
TEACHER_PROMPT_COLUMN = "teacher_prompt"
PLACEHOLDERS = ("prompt", "answer", "solution")
# Teacher contexts data preparation can write into the teacher_prompt column.
TEACHER_CONTEXTS = ("solution", "answer")

# The reference is framed as a check, and the teacher is asked to reason on its own, so that its
# distribution over the student's reasoning stays that of a solver rather than of a copier.
DEFAULT_TEMPLATE = (
    "{prompt}\n\n"
    "(For you only: the correct final answer is {answer}. Do not simply state it. Solve the problem "
    "step by step on your own, as if you had not been told, and make sure your reasoning arrives at "
    "this answer.)"
)
SOLUTION_TEMPLATE = (
    "{prompt}\n\n"
    "(For you only, a reference solution:\n{solution}\n"
    "Do not copy it. Solve the problem step by step in your own words, using the reference only to "
    "stay correct.)"
)

_FIELD_OF = {"answer": "reward_model.ground_truth", "solution": "extra_info.solution"}
# opd.teacher_prompt_template may name a built-in template instead of giving its text
NAMED_TEMPLATES = {"answer": DEFAULT_TEMPLATE, "solution": SOLUTION_TEMPLATE}


def template_text(template: str | None) -> str:
    """The text of ``opd.teacher_prompt_template``: null = :data:`DEFAULT_TEMPLATE`, 'answer' / 'solution' =
    the built-in templates, anything else is the template itself."""
    if template is None:
        return DEFAULT_TEMPLATE
    return NAMED_TEMPLATES.get(template, template)


class TeacherPromptError(ValueError):
    """A row lacks what its teacher prompt needs, or a template is malformed; the message names it."""


@functools.lru_cache(maxsize=32)
def template_placeholders(template: str) -> frozenset[str]:
    """The placeholders ``template`` uses; raise :class:`TeacherPromptError` naming any unknown one.

    ``{prompt}`` is required: without it the teacher would not see the problem it is scoring.
    A literal brace is written doubled, as in :meth:`str.format`.
    """
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise TeacherPromptError(f"teacher prompt template is malformed: {error}") from None
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown)
        raise TeacherPromptError(
            f"teacher prompt template uses unknown placeholder(s) {shown}; known: "
            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write a literal brace as {{{{ or }}}})"
        )
    if "prompt" not in fields:
        raise TeacherPromptError("teacher prompt template must contain {prompt}, the student's question")
    return frozenset(fields)


def check_mode(mode: str) -> str:
    """Return ``mode`` if known; raise :class:`TeacherPromptError` listing the modes otherwise."""
    if mode not in TEACHER_PROMPT_MODES:
        raise TeacherPromptError(
            f"unknown teacher prompt mode {mode!r}; choose one of {TEACHER_PROMPT_MODES}"
        )
    return mode


def teacher_messages(
    row: Mapping[str, Any],
    mode: str,
    template: str | None = None,
    *,
    index: int | None = None,
    prompt_key: str = "prompt",
) -> list[dict[str, Any]]:
    """The teacher's chat messages for one dataset row.

    Args:
        row: the row's fields: ``row[prompt_key]`` (the student's messages), and as the mode needs
            ``teacher_prompt``, ``reward_model.ground_truth`` or ``extra_info.solution``.
        mode: ``same``, ``column`` or ``template`` (see the module docstring).
        template: the ``template`` mode's text or the name of a built-in one (:func:`template_text`).
        index: the row's position, for error messages; None = ``extra_info.index`` when present.

    Returns:
        New message dicts; ``row`` is not modified.

    Raises:
        TeacherPromptError: naming the row and the missing or unusable field.
    """
    where = f"row {_row_index(row, index)}"
    if check_mode(mode) == "column":
        return _messages(row.get(TEACHER_PROMPT_COLUMN), where, TEACHER_PROMPT_COLUMN)
    messages = _messages(row.get(prompt_key), where, prompt_key)
    if mode == "same":
        return messages
    template = template_text(template)
    last_user = _last_user_message(messages, where, prompt_key)
    values = {
        name: _privileged_value(row, name, where) for name in template_placeholders(template) & {*_FIELD_OF}
    }
    values["prompt"] = messages[last_user]["content"]
    messages[last_user]["content"] = template.format(**values)
    return messages


def context_messages(row: Mapping[str, Any], context: str, *, index: int | None = None) -> list[dict]:
    """The ``teacher_prompt`` column data preparation writes for ``--teacher-context``.

    ``solution``: the worked solution (``extra_info.solution``) where the row has one, else the answer;
    ``answer``: the final answer only.
    """
    if context not in TEACHER_CONTEXTS:
        raise TeacherPromptError(f"unknown teacher context {context!r}; choose one of {TEACHER_CONTEXTS}")
    has_solution = bool((row.get("extra_info") or {}).get("solution"))
    template = SOLUTION_TEMPLATE if context == "solution" and has_solution else DEFAULT_TEMPLATE
    return teacher_messages(row, "template", template, index=index)


def tokenize_teacher_prompts(
    tokenizer,
    messages_per_row: Sequence[Sequence[Mapping]],
    chat_template_kwargs: Mapping | None = None,
    tools_per_row: Sequence[Mapping] | None = None,
):
    """Token ids of each teacher chat, templated as the rollout templates the student's prompt.

    Use the TEACHER's tokenizer (its chat template) and the student's ``apply_chat_template_kwargs``
    (``data.apply_chat_template_kwargs``), so the two prompts differ only in their content; in agent runs
    ``tools_per_row`` holds each row's ``{"tools": schemas}`` (``agent.tools.row_tools``).

    Returns:
        Per row a ``[P'_i]`` long tensor ending with the assistant header, for
        ``build_opd_batch(teacher_prompts=...)``.
    """
    # Imported here: data preparation builds messages with this module and needs no torch.
    import torch

    from opd.batch import chat_prompt_ids

    kwargs = dict(chat_template_kwargs or {})
    tools_per_row = tools_per_row or [{}] * len(messages_per_row)
    return [
        torch.as_tensor(chat_prompt_ids(tokenizer, messages, **kwargs, **tools), dtype=torch.long)
        for messages, tools in zip(messages_per_row, tools_per_row, strict=True)
    ]


def check_teacher_prompts(
    parquet_path: str | Path,
    mode: str,
    template: str | None = None,
    *,
    prompt_key: str = "prompt",
    batch_rows: int = 4096,
) -> int:
    """Build the teacher prompt of every row of a parquet file; return the number of rows checked.

    Reads only the columns the mode needs, in batches of ``batch_rows``, so a large file costs
    little memory. Call it on every training and validation file before any model loads: verl takes
    the worker's fields from the first row of each batch, so one file without the column breaks a run
    late.

    Raises:
        TeacherPromptError: naming the file, the row and the field.
    """
    import pyarrow.parquet as pq

    path = Path(parquet_path)
    columns = _needed_columns(check_mode(mode), template, prompt_key)
    if not path.is_file():
        raise TeacherPromptError(f"teacher prompt check: no such data file: {path}")
    parquet = pq.ParquetFile(path)
    if mode == "same":
        return parquet.metadata.num_rows
    _require_columns(parquet.schema_arrow, columns, path, mode)
    row_number = 0
    for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        for row in record_batch.to_pylist():
            try:
                teacher_messages(row, mode, template, index=row_number, prompt_key=prompt_key)
            except TeacherPromptError as error:
                raise TeacherPromptError(f"{path}: {error}") from None
            row_number += 1
    return row_number


def _needed_columns(mode: str, template: str | None, prompt_key: str) -> list[str]:
    if mode == "column":
        return [TEACHER_PROMPT_COLUMN]
    if mode == "same":
        return []
    placeholders = template_placeholders(template_text(template))
    return [prompt_key] + [field for name, field in _FIELD_OF.items() if name in placeholders]


def _require_columns(schema, columns: list[str], path: Path, mode: str) -> None:
    import pyarrow as pa

    for column in columns:
        top, _, child = column.partition(".")
        present = top in schema.names
        if present and child:
            kind = schema.field(top).type
            present = isinstance(kind, pa.StructType) and kind.get_field_index(child) >= 0
        if not present:
            raise TeacherPromptError(
                f"{path}: no {column!r} field, needed by opd.teacher_prompt={mode}; every file, validation "
                "included, must carry it (prepare the data with --teacher-context, or choose another mode)"
            )


def _row_index(row: Mapping[str, Any], index: int | None) -> Any:
    if index is not None:
        return index
    extra = row.get("extra_info")
    return extra.get("index", "?") if isinstance(extra, Mapping) else "?"


def _messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    """A fresh copy of a chat (a non-empty list of role/content messages) or an error naming ``field``."""
    if value is None or isinstance(value, (str, bytes, Mapping)) or len(value) == 0:
        raise TeacherPromptError(f"{where}: {field!r} is missing or not a non-empty list of chat messages")
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TeacherPromptError(f"{where}: {field!r} holds an entry without a 'role': {message!r}")
        if not isinstance(message.get("content"), str):
            raise TeacherPromptError(f"{where}: {field!r} holds a message without text 'content'")
        messages.append(dict(message))
    return messages


def _last_user_message(messages: list[dict[str, Any]], where: str, field: str) -> int:
    for position in range(len(messages) - 1, -1, -1):
        if messages[position]["role"] == "user":
            return position
    raise TeacherPromptError(f"{where}: {field!r} has no user message for the template to replace")


def _privileged_value(row: Mapping[str, Any], name: str, where: str) -> str:
    """The text of ``{answer}`` or ``{solution}``: a non-empty string (a numeric answer as text)."""
    parent, _, child = _FIELD_OF[name].partition(".")
    container = row.get(parent)
    value = container.get(child) if isinstance(container, Mapping) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise TeacherPromptError(f"{where}: {_FIELD_OF[name]} is missing or empty, needed by {{{name}}}")
    return value

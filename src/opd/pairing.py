"""Teacher/student compatibility: every token id must mean the same thing on both sides.

Distillation compares the two next-token distributions id by id, so the tokenizers must agree on every
id the student can produce. Output heads may be padded past the tokenizer (Qwen2.5-7B has 152064 rows,
Qwen2.5-1.5B 151936): those extra rows carry no token and are ignored by the losses, which work on the
shared first ``min(V_student, V_teacher)`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opd.config import OPDConfigError
from opd.console import warn

logger = logging.getLogger(__name__)

# How messages name the two model folders: the config key and the variable of train_opd.sh.
STUDENT = "actor_rollout_ref.model.path (MODEL_PATH)"
TEACHER = "opd.teacher_model_path (TEACHER_MODEL_PATH)"


@dataclass(frozen=True)
class VocabPairing:
    """What the compatibility check found."""

    tokenizer_size: int
    """Number of token ids the tokenizers define (identical on both sides)."""

    student_rows: int
    """Rows of the student's output head."""

    teacher_rows: int
    """Rows of the teacher's output head."""

    @property
    def shared_rows(self) -> int:
        """Rows the losses compare: the common prefix of both output heads."""
        return min(self.student_rows, self.teacher_rows)


def check_pairing(student_path: str, teacher_path: str) -> VocabPairing:
    """Compare tokenizers and output-head sizes; raise :class:`OPDConfigError` on a mismatch.

    Reads tokenizer files and ``config.json`` only, never weights, so it is cheap enough to run
    before Ray or any model starts.
    """
    from transformers import AutoConfig

    student_tok, teacher_tok = _tokenizer(student_path, STUDENT), _tokenizer(teacher_path, TEACHER)
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    _check_same_ids(student_vocab, teacher_vocab)
    _check_special_tokens(student_tok, teacher_tok)
    _warn_on_chat_template(student_tok, teacher_tok)

    student_rows = output_rows(AutoConfig.from_pretrained(student_path), student_path)
    teacher_rows = output_rows(AutoConfig.from_pretrained(teacher_path), teacher_path)
    pairing = VocabPairing(len(teacher_vocab), student_rows, teacher_rows)
    highest_id = max(teacher_vocab.values())
    if highest_id >= pairing.shared_rows:
        raise OPDConfigError(
            f"opd.teacher_model_path: token id {highest_id} exists in the tokenizer but the output heads "
            f"share only {pairing.shared_rows} rows (student {student_rows}, teacher {teacher_rows})"
        )
    return pairing


def _tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    # broken tokenizer files surface as anything from a JSON error to the Rust library's bare Exception
    except Exception as error:
        raise OPDConfigError(
            f"{what} {path}: the tokenizer cannot be read ({type(error).__name__}: {error})"
        ) from None


def _check_same_ids(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> None:
    missing = [tok for tok in teacher_vocab if tok not in student_vocab]
    moved = [tok for tok, idx in teacher_vocab.items() if tok in student_vocab and student_vocab[tok] != idx]
    extra = [tok for tok in student_vocab if tok not in teacher_vocab]
    if missing or moved or extra:
        examples = [f"{t!r}: teacher id {teacher_vocab[t]}, student id {student_vocab[t]}" for t in moved[:3]]
        examples += [f"{t!r}: teacher id {teacher_vocab[t]}, not in the student" for t in missing[:3]]
        examples += [f"{t!r}: student id {student_vocab[t]}, not in the teacher" for t in extra[:3]]
        raise OPDConfigError(
            "opd.teacher_model_path: teacher and student tokenizers disagree on "
            f"{len(moved)} moved, {len(missing)} teacher-only and {len(extra)} student-only tokens, "
            f"e.g. {'; '.join(examples)}"
        )


# The teacher scores the student's end of turn and start of sequence: they must be the same tokens.
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id")


def _check_special_tokens(student_tok, teacher_tok) -> None:
    for attribute in _SPECIAL_TOKENS:
        student_id, teacher_id = getattr(student_tok, attribute), getattr(teacher_tok, attribute)
        if student_id != teacher_id:
            raise OPDConfigError(
                f"opd.teacher_model_path: {attribute} differs: student {student_id}, teacher {teacher_id}"
            )


def _warn_on_chat_template(student_tok, teacher_tok) -> None:
    # the teacher reads the student's prompt as templated for the student; a different template is
    # allowed (same tokens, other formatting) but usually a mistake worth seeing
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        warn(
            logger,
            "the teacher's chat template differs from the student's; the teacher will score "
            "prompts formatted with the student's template"
        )


def output_rows(hf_config, path: str) -> int:
    """Rows of the output head of the model whose ``config.json`` (at ``path``) gave ``hf_config``."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    rows = getattr(text_config, "vocab_size", None)
    if not rows:
        raise OPDConfigError(f"{path}: config.json has no vocab_size")
    return int(rows)

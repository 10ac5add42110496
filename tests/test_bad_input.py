"""Bad input is refused before any model loads, the message naming the key, variable, file, row or column.

A test (or parametrized case) for each row of the catalogue in docs/bad_input.md, but for the two accepted
pairings test_config.py covers (padded teacher head, chat-template warning). Python checks are called
directly; shell checks run ``scripts/opd/train_opd.sh`` (or a function of ``scripts/lib/common.sh``) in a
subprocess that must stop within seconds, before Python, a model or Ray starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from script_runs import SCRIPT_VARS
from tiny_models import TOKENIZER_SIZE, build_tiny_model, build_tiny_tokenizer

from data.arithmetic import write_arithmetic_dataset
from opd import input_checks
from opd.config import OPDConfig, OPDConfigError
from opd.input_checks import (
    STUDENT,
    TEACHER,
    ModelFolder,
    check_data_file,
    check_lengths,
    check_model_folder,
    check_override_keys,
    check_run_dir,
    check_topk,
)
from opd.pairing import check_pairing

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "opd" / "train_opd.sh"
COMMON_SH = ROOT / "scripts" / "lib" / "common.sh"
# Variables train_opd.sh reads beyond those every script reads.
OPD_SCRIPT_VARS = (
    "OPD_LOSS_TYPE OPD_CHUNK_SIZE OPD_MAX_LENGTH OPD_REWARD_BETA OPD_TOPK OPD_TIP_KEEP_FRACTION "
    "OPD_TASK_LOSS_COEF ROLLOUT_TEMPERATURE ENABLE_THINKING"
).split()
# A refusal in the script must come before any of these.
STARTED_MARKERS = ("[train_opd.sh] student", "opd.main_opd", "Ray")


def _refused(check, *args, **kwargs) -> str:
    """The message of the OPDConfigError ``check(*args, **kwargs)`` raises."""
    with pytest.raises(OPDConfigError) as info:
        check(*args, **kwargs)
    return str(info.value)


def _copy(model_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / name))


# ---------------------------------------------------------------------------------------------- opd keys


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"topk": "abc"}, "opd.topk must be a whole number, got 'abc' (str)"),
        ({"topk": True}, "opd.topk must be a whole number, got True (bool)"),
        ({"chunk_size": 1.5}, "opd.chunk_size must be a whole number, got 1.5 (float)"),
        ({"beta": "high"}, "opd.beta must be a finite number, got 'high' (str)"),
        ({"beta": False}, "opd.beta must be a finite number, got False (bool)"),
        ({"temperature": float("inf")}, "opd.temperature must be a finite number, got inf (float)"),
        ({"max_length": "long"}, "opd.max_length must be a whole number or null, got 'long' (str)"),
        ({"plot": "yes"}, "opd.plot must be true or false, got 'yes' (str)"),
        ({"pass_rate_weighting": 1}, "opd.pass_rate_weighting must be true or false, got 1 (int)"),
        ({"loss_type": 3}, "opd.loss_type must be a string, got 3 (int)"),
        ({"extra": "x"}, "opd.extra must be a mapping, got 'x' (str)"),
        ({"teacher_model_path": 5}, "opd.teacher_model_path must be a string or null, got 5 (int)"),
        ({"loss_type": "kl_of_doom"}, "opd.loss_type: unknown loss 'kl_of_doom'; choose one of ["),
        ({"beta": 0.0}, "opd.beta must be strictly between 0 and 1, got 0.0"),
        ({"beta": 1.5}, "opd.beta must be strictly between 0 and 1, got 1.5"),
        ({"skew_alpha": 1.0}, "opd.skew_alpha must satisfy 0 <= alpha < 1, got 1.0"),
        ({"skew_alpha": -0.1}, "opd.skew_alpha must satisfy 0 <= alpha < 1, got -0.1"),
        ({"topk": 0}, "opd.topk must be > 0, got 0"),
        ({"paced_switch_step": 0}, "opd.paced_switch_step must be > 0, got 0"),
        ({"paced_blend_steps": -1}, "opd.paced_blend_steps must be >= 0, got -1"),
        ({"iw_opd_gamma": -0.1}, "opd.iw_opd_gamma must be >= 0, got -0.1"),
        ({"iw_opd_epsilon": 0.0}, "opd.iw_opd_epsilon must be > 0, got 0.0"),
        ({"tip_keep_fraction": 0.0}, "opd.tip_keep_fraction must be in (0, 1], got 0.0"),
        ({"tip_keep_fraction": 1.5}, "opd.tip_keep_fraction must be in (0, 1], got 1.5"),
        ({"tip_score": "vibes"}, "opd.tip_score must be one of ('entropy', 'entropy_plus_divergence')"),
        ({"task_loss_coef": -1.0}, "opd.task_loss_coef must be >= 0, got -1.0"),
        ({"distill_loss_coef": -1.0}, "opd.distill_loss_coef must be >= 0, got -1.0"),
        ({"distill_loss_coef": 0.0}, "opd.distill_loss_coef and opd.task_loss_coef are both 0"),
        ({"chunk_size": 0}, "opd.chunk_size must be > 0, got 0"),
        ({"chunk_size": -5}, "opd.chunk_size must be > 0, got -5"),
        ({"temperature": 0.0}, "opd.temperature must be > 0, got 0.0"),
        ({"max_length": 0}, "opd.max_length must be > 0, got 0"),
        ({"overlength": "ignore"}, "opd.overlength must be one of ('truncate', 'error'), got 'ignore'"),
        ({"reward_beta": 0.0}, "opd.reward_beta must be > 0, got 0.0"),
        ({"reward_beta": -1.0}, "opd.reward_beta must be > 0, got -1.0"),
        ({"val_num_prompts": -1}, "opd.val_num_prompts must be >= 0, got -1"),
        ({"val_max_new_tokens": 0}, "opd.val_max_new_tokens must be > 0, got 0"),
    ],
)
def test_each_bad_opd_value_is_named(tiny_model_dir, overrides, message):
    values = {"teacher_model_path": str(tiny_model_dir), **overrides}
    assert message in _refused(OPDConfig(**values).validate)


def test_an_int_where_a_float_is_expected_is_accepted(tiny_model_dir):
    assert OPDConfig(teacher_model_path=str(tiny_model_dir), temperature=2).validate().temperature == 2


def test_missing_or_absent_teacher_path(tmp_path):
    assert "opd.teacher_model_path is required (set TEACHER_MODEL_PATH)" in _refused(OPDConfig().validate)
    absent = tmp_path / "teacher"
    message = _refused(OPDConfig(teacher_model_path=str(absent)).validate)
    assert f"opd.teacher_model_path: no such folder: {absent}" in message


def test_unknown_keys_get_a_suggestion():
    message = _refused(OPDConfig.from_dict, {"lose_type": "jsd", "chunksize": 8, "qqqq": 1})
    assert "opd.lose_type (did you mean opd.loss_type?)" in message
    assert "opd.chunksize (did you mean opd.chunk_size?)" in message
    assert "opd.qqqq;" in message and "known keys: ['beta'," in message


@pytest.mark.parametrize("argument", ["opd.lose_type=jsd", "+opd.lose_type=jsd", "++opd.lose_type=jsd"])
def test_unknown_keys_on_the_command_line_get_a_suggestion(argument):
    message = _refused(check_override_keys, ["data.train_batch_size=4", argument, "opd.extra.mine=1"])
    assert "opd.lose_type (did you mean opd.loss_type?)" in message


def test_known_keys_on_the_command_line_pass():
    check_override_keys(["opd.loss_type=jsd", "~opd.topk", "--config-name=opd_trainer", "trainer.opd=1"])


def _main_opd(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "opd.main_opd", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("opd.lose_type=jsd",), "opd: configuration error: unknown key(s) opd.lose_type (did you mean"),
        (("+opd.chunksize=8",), "unknown key(s) opd.chunksize (did you mean opd.chunk_size?)"),
        (("opd.topk=abc",), "opd: configuration error: opd.topk must be a whole number, got 'abc' (str)"),
        (("opd.chunk_size=true",), "opd.chunk_size must be a whole number, got True (bool)"),
        (("opd.beta=1.5", "opd.teacher_model_path={teacher}"), "opd.beta must be strictly between 0 and 1"),
    ],
)
def test_main_opd_refuses_bad_opd_overrides(tiny_model_dir, overrides, message):
    result = _main_opd(*(o.format(teacher=tiny_model_dir) for o in overrides))
    assert result.returncode != 0
    assert message in result.stderr
    assert "ray.init" not in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------- model folders


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: (m / "config.json").unlink(), "no config.json, so not a Hugging Face model folder"),
        (lambda m: (m / "config.json").write_text("{not json"), "config.json cannot be read (OSError: "),
        (
            lambda m: (m / "config.json").write_text("{}"),
            "config.json cannot be read (ValueError: Unrecognized",
        ),
        (
            lambda m: (m / "tokenizer.json").unlink(),
            "no tokenizer files (none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt)",
        ),
        (
            lambda m: (m / "model.safetensors").unlink(),
            "no weights (none of model.safetensors, model.safetensors.index.json, pytorch_model.bin",
        ),
        (
            lambda m: _truncate(m / "model.safetensors"),
            "model.safetensors is not a complete safetensors file (Error while deserializing header: "
            "incomplete metadata, file not fully covered)",
        ),
        (
            lambda m: (m / "model.safetensors").write_bytes(os.urandom(4096)),
            "model.safetensors is not a complete safetensors file (Error while deserializing header",
        ),
        (
            lambda m: (m / "model.safetensors").write_text(
                "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"
            ),
            "it is a Git LFS pointer: fetch the real file with git lfs pull",
        ),
        (
            lambda m: (m / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
            ),
            "model.safetensors.index.json names missing shard(s) model-00002-of-00002.safetensors",
        ),
        (
            lambda m: (m / "model.safetensors.index.json").write_text('{"metadata": {}}'),
            "model.safetensors.index.json cannot be read (KeyError('weight_map'))",
        ),
    ],
)
@pytest.mark.parametrize("what", [STUDENT, TEACHER])
def test_broken_model_folder_is_named(tiny_model_dir, tmp_path, damage, message, what):
    model = _copy(tiny_model_dir, tmp_path)
    damage(model)
    refusal = _refused(check_model_folder, str(model), what)
    assert refusal.startswith(f"{what} {model}: ")
    assert message in refusal


def test_pytorch_weights_are_accepted_unchecked(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    assert check_model_folder(str(model), STUDENT).config.vocab_size == TOKENIZER_SIZE


def test_intact_model_folder_returns_its_config(tiny_model_dir):
    folder = check_model_folder(str(tiny_model_dir), STUDENT)
    assert folder.config.architectures == ["Qwen2ForCausalLM"]


# --------------------------------------------------------------------------------------------- pairing


def _student_with_tokenizer(tmp_path: Path, tokenizer) -> str:
    """A student folder holding ``tokenizer`` and the config of a tiny model with the base vocabulary."""
    build_tiny_model(tmp_path / "base", vocab_size=TOKENIZER_SIZE)
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "config.json")
    tokenizer.save_pretrained(str(tmp_path))
    return str(tmp_path)


def test_student_only_tokens_are_rejected(tmp_path, tiny_model_dir):
    tokenizer = build_tiny_tokenizer(tmp_path)
    tokenizer.add_tokens(["<tool_call>"], special_tokens=True)
    message = _refused(check_pairing, _student_with_tokenizer(tmp_path, tokenizer), str(tiny_model_dir))
    assert (
        "opd.teacher_model_path: teacher and student tokenizers disagree on 0 moved, 0 teacher-only"
        in message
    )
    assert "1 student-only tokens, e.g. '<tool_call>': student id 259, not in the teacher" in message


def test_teacher_only_tokens_are_rejected(tmp_path, tiny_model_dir):
    teacher = build_tiny_model(tmp_path / "teacher", vocab_size=TOKENIZER_SIZE + 1)
    tokenizer = build_tiny_tokenizer(teacher)
    tokenizer.add_tokens(["<think>"], special_tokens=True)
    tokenizer.save_pretrained(str(teacher))
    message = _refused(check_pairing, str(tiny_model_dir), str(teacher))
    assert "1 teacher-only" in message and "'<think>': teacher id 259, not in the student" in message


def test_moved_token_ids_are_rejected(tmp_path, tiny_model_dir):
    student = _copy(tiny_model_dir, tmp_path)
    tokenizer = json.loads((student / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[3:5]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (student / "tokenizer.json").write_text(json.dumps(tokenizer))
    message = _refused(check_pairing, str(student), str(tiny_model_dir))
    assert "disagree on 2 moved" in message and f"{first!r}: teacher id 3, student id 4" in message


@pytest.mark.parametrize(
    ("token", "attribute"), [("eos_token", "eos_token_id"), ("bos_token", "bos_token_id")]
)
def test_different_special_tokens_are_rejected(tmp_path, tiny_model_dir, token, attribute):
    student = _copy(tiny_model_dir, tmp_path)
    tokenizer_config = json.loads((student / "tokenizer_config.json").read_text())
    tokenizer_config[token] = "<|endoftext|>"
    (student / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    message = _refused(check_pairing, str(student), str(tiny_model_dir))
    assert f"opd.teacher_model_path: {attribute} differs: student 0, teacher" in message


def test_head_smaller_than_the_tokenizer_is_rejected(tmp_path, tiny_model_dir):
    student = _copy(tiny_model_dir, tmp_path)
    config = json.loads((student / "config.json").read_text())
    config["vocab_size"] = TOKENIZER_SIZE - 10
    (student / "config.json").write_text(json.dumps(config))
    message = _refused(check_pairing, str(student), str(tiny_model_dir))
    assert (
        f"token id {TOKENIZER_SIZE - 1} exists in the tokenizer but the output heads share only 249"
        in message
    )


def test_unreadable_tokenizer_is_named(tmp_path, tiny_model_dir):
    student = _copy(tiny_model_dir, tmp_path)
    (student / "tokenizer.json").write_text('{"garbage": ')
    message = _refused(check_pairing, str(student), str(tiny_model_dir))
    assert f"{STUDENT} {student}: the tokenizer cannot be read (JSONDecodeError" in message


def test_student_head_larger_than_the_teachers_is_accepted(tmp_path, tiny_model_dir):
    student = build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE + 13)
    pairing = check_pairing(str(student), str(tiny_model_dir))
    assert (pairing.student_rows, pairing.teacher_rows) == (TOKENIZER_SIZE + 13, TOKENIZER_SIZE)


# ------------------------------------------------------------------------------------- lengths and sizes


def _folder(path: Path, what: str = STUDENT) -> ModelFolder:
    return check_model_folder(str(path), what)


def _lengths(prompt: int, response: int):
    return OmegaConf.create({"max_prompt_length": prompt, "max_response_length": response})


def _opd(teacher: Path, **values) -> OPDConfig:
    return OPDConfig(teacher_model_path=str(teacher), **values).validate()


@pytest.mark.parametrize("max_length", [100, 128])
def test_max_length_must_exceed_the_prompt_length(tiny_model_dir, max_length):
    models = [_folder(tiny_model_dir)]
    message = _refused(check_lengths, _lengths(128, 64), _opd(tiny_model_dir, max_length=max_length), models)
    assert f"opd.max_length={max_length} (OPD_MAX_LENGTH) must exceed data.max_prompt_length=128" in message


def _limited(model: ModelFolder, positions: int, **extra) -> ModelFolder:
    """``model`` with its config's position limit set to ``positions`` (plus ``extra`` config keys)."""
    values = {**model.config.to_dict(), "max_position_embeddings": positions, **extra}
    return model._replace(config=type(model.config).from_dict(values))


@pytest.mark.parametrize("short", ["student", "teacher"])
def test_prompt_plus_response_beyond_the_positions_of_either_model(tiny_model_dir, tiny_llama_dir, short):
    models = {"student": _folder(tiny_model_dir, STUDENT), "teacher": _folder(tiny_llama_dir, TEACHER)}
    models[short] = _limited(models[short], 1024)
    message = _refused(check_lengths, _lengths(1000, 100), _opd(tiny_model_dir), models.values())
    assert message == (
        "data.max_prompt_length + data.max_response_length = 1000 + 100 = 1100 "
        "(MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) exceeds the 1024 positions (max_position_embeddings) "
        f"of {models[short].what} {models[short].path}"
    )


def test_lengths_within_the_positions_are_accepted(tiny_model_dir):
    check_lengths(_lengths(1024, 1024), _opd(tiny_model_dir, max_length=2048), [_folder(tiny_model_dir)])


@pytest.mark.parametrize(
    ("rope", "limit"),
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 2048),
        ({"rope_type": "linear", "factor": 4.0}, 4096),
        ({"rope_type": "dynamic", "factor": 2.0}, 2048),
        (
            # llama3 states the stretched length in max_position_embeddings already
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 128}
            | {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
            1024,
        ),
    ],
)
def test_rope_scaling_sets_the_position_limit_as_vllm_counts_it(tiny_model_dir, rope, limit):
    scaled = _limited(_folder(tiny_model_dir), 1024, rope_parameters={**rope, "rope_theta": 1e4})
    assert input_checks.position_limit(scaled.config) == limit
    check_lengths(_lengths(limit // 2, limit // 2), _opd(tiny_model_dir), [scaled])
    message = _refused(check_lengths, _lengths(limit // 2, limit // 2 + 1), _opd(tiny_model_dir), [scaled])
    assert f"exceeds the {limit} positions" in message


def test_topk_beyond_the_shared_vocabulary_is_refused(tiny_model_dir, tmp_path):
    teacher = _folder(build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE + 13), TEACHER)
    student = _folder(tiny_model_dir)
    opd = _opd(tiny_model_dir, loss_type="forward_kl_topk", topk=TOKENIZER_SIZE + 1)
    message = _refused(check_topk, opd, student, teacher)
    assert f"opd.topk={TOKENIZER_SIZE + 1} (OPD_TOPK) exceeds the {TOKENIZER_SIZE} vocabulary rows" in message
    check_topk(_opd(tiny_model_dir, loss_type="forward_kl_topk", topk=TOKENIZER_SIZE), student, teacher)
    check_topk(_opd(tiny_model_dir, topk=10**6), student, teacher)


def test_pass_rate_weighting_needs_several_samples_per_prompt(tiny_model_dir):
    opd = _opd(tiny_model_dir, pass_rate_weighting=True)
    message = _refused(opd.check_rollout_n, 1)
    assert "opd.pass_rate_weighting=true needs actor_rollout_ref.rollout.n >= 2 (ROLLOUT_N), got 1" in message
    opd.check_rollout_n(2)


# ------------------------------------------------------------------------------------------- data files


def _text(values: list[bytes]) -> pa.Array:
    # a binary array viewed as strings, so the bytes need not be UTF-8 (as in a file written elsewhere)
    return pa.array(values, type=pa.binary()).view(pa.string())


def _chat_file(path: Path, contents: list[bytes | None], truths: list[bytes] | None = None) -> Path:
    """A verl RL parquet file with one user message per row, from raw bytes (None: no content)."""
    rows = len(contents)
    messages = pa.StructArray.from_arrays(
        [_text([b"user"] * rows), _text(contents)], names=["role", "content"]
    )
    prompts = pa.ListArray.from_arrays(pa.array(range(rows + 1), pa.int32()), messages)
    truths = truths if truths is not None else [b"42"] * rows
    reward = pa.StructArray.from_arrays(
        [_text(truths), _text([b"rule"] * rows)], names=["ground_truth", "style"]
    )
    pq.write_table(
        pa.table({"data_source": ["arithmetic"] * rows, "prompt": prompts, "reward_model": reward}), path
    )
    return path


def _good(rows: int = 8) -> list[bytes]:
    return [f"What is {i} + {i}?".encode() for i in range(rows)]


def _write(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


WHAT = input_checks.DATA_FILES["train_files"]


def test_real_arithmetic_files_pass(tmp_path):
    train, val = write_arithmetic_dataset(tmp_path, train_size=8, val_size=4, seed=0)
    check_data_file(str(train), WHAT)
    check_data_file(str(val), input_checks.DATA_FILES["val_files"])


def test_missing_file(tmp_path):
    path = tmp_path / "train.parquet"
    assert _refused(check_data_file, str(path), WHAT) == f"{WHAT} {path}: no such file"


def test_empty_file(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"")
    assert _refused(check_data_file, str(path), WHAT) == f"{WHAT} {path}: the file is empty (0 bytes)"


def test_parquet_without_rows(tmp_path):
    path = _chat_file(tmp_path / "train.parquet", [])
    assert _refused(check_data_file, str(path), WHAT) == f"{WHAT} {path}: the file has no rows"


def test_csv_renamed_to_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("prompt,answer\nWhat is 1 + 1?,2\n")
    assert f"{WHAT} {path}: not a parquet file (Parquet magic bytes not found" in _refused(
        check_data_file, str(path), WHAT
    )


def test_parquet_with_corrupt_pages(tmp_path):
    path = _chat_file(tmp_path / "t.parquet", _good(2000))
    data = bytearray(path.read_bytes())
    # the pages sit between the leading magic bytes and the footer, which stays intact
    assert pq.ParquetFile(path).metadata.serialized_size < len(data) - 1100
    data[100:1100] = b"\xab" * 1000
    path.write_bytes(bytes(data))
    assert f"{WHAT} {path}: unreadable from row 0 on (" in _refused(check_data_file, str(path), WHAT)


def test_missing_prompt_column(tmp_path):
    path = _write(tmp_path / "t.parquet", question=["1 + 1?"], reward_model=[{"ground_truth": "2"}])
    message = _refused(check_data_file, str(path), WHAT)
    assert message == f"{WHAT} {path}: no 'prompt' column (data.prompt_key); columns: question, reward_model"


def test_other_prompt_key_is_followed(tmp_path):
    path = _write(tmp_path / "t.parquet", question=["1 + 1?"], reward_model=[{"ground_truth": "2"}])
    message = _refused(check_data_file, str(path), WHAT, prompt_key="question")
    assert "row 0: question is a str, not a list of chat messages" in message


@pytest.mark.parametrize(
    "reward_model",
    [None, [{"style": "rule"}], ["2"]],
    ids=["no reward_model", "reward_model without ground_truth", "reward_model a string"],
)
def test_missing_ground_truth(tmp_path, reward_model):
    columns = {"prompt": [[{"role": "user", "content": "1 + 1?"}]]}
    if reward_model is not None:
        columns["reward_model"] = reward_model
    path = _write(tmp_path / "t.parquet", **columns)
    message = _refused(check_data_file, str(path), WHAT)
    assert message == (
        f"{WHAT} {path}: no reward_model.ground_truth column, the reference answer the reward grades against"
    )


@pytest.mark.parametrize(
    ("prompts", "row", "problem"),
    [
        (
            ["What is 1 + 1?"] * 3,
            0,
            "prompt is a str, not a list of chat messages ({'role': ..., 'content': ...}",
        ),
        ([["a"], ["b"]], 0, "prompt message 0 is a str, not a {'role': ..., 'content': ...} dict"),
        (
            [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x"}, {"role": "user"}]],
            1,
            "prompt message 1 has no text 'content' (got None)",
        ),
        (
            [[{"role": "user", "content": "hi"}]] * 4 + [[{"content": "no role"}]],
            4,
            "prompt message 0 has no text 'role' (got None)",
        ),
        (
            [[{"role": "user", "content": "hi"}], [], [{"role": "user", "content": "hi"}]],
            1,
            "prompt is an empty",
        ),
        ([[{"role": "user", "content": "hi"}], None], 1, "prompt is null, not a list of chat messages"),
    ],
    ids=[
        "plain string",
        "list of strings",
        "message without content",
        "message without role",
        "empty",
        "null",
    ],
)
def test_prompt_that_is_not_chat_messages_names_the_row(tmp_path, prompts, row, problem):
    truths = [{"ground_truth": "2"}] * len(prompts)
    path = _write(tmp_path / "t.parquet", prompt=prompts, reward_model=truths)
    assert _refused(check_data_file, str(path), WHAT).startswith(f"{WHAT} {path}: row {row}: {problem}")


@pytest.mark.parametrize("column", ["prompt", "reward_model.ground_truth"])
def test_non_utf8_text_names_row_and_column(tmp_path, column):
    contents, truths = _good(), [b"42"] * 8
    if column == "prompt":
        contents[5] = b"caf\xe9 latte"
    else:
        truths[5] = b"\xff\xfe"
    path = _chat_file(tmp_path / "t.parquet", contents, truths)
    message = _refused(check_data_file, str(path), WHAT)
    assert message.startswith(f"{WHAT} {path}: row 5: {column} is not valid UTF-8 text (")


@pytest.mark.parametrize(
    ("row_1", "row_3", "problem"),
    [
        (b"\xff", None, "prompt is not valid UTF-8 text"),
        (None, b"\xff", "prompt message 0 has no text 'content'"),
    ],
    ids=["undecodable first", "malformed first"],
)
def test_first_bad_row_wins_within_a_batch(tmp_path, row_1, row_3, problem):
    contents = _good(6)
    contents[1], contents[3] = row_1, row_3
    path = _chat_file(tmp_path / "t.parquet", contents)
    assert f"row 1: {problem}" in _refused(check_data_file, str(path), WHAT)


def test_row_index_counts_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(input_checks, "BATCH_ROWS", 4)
    contents = _good(12)
    contents[9] = b"\xc3"
    path = _chat_file(tmp_path / "t.parquet", contents)
    assert f"{path}: row 9: prompt is not valid UTF-8 text" in _refused(check_data_file, str(path), WHAT)


def test_only_the_needed_columns_are_read(tmp_path, monkeypatch):
    path = _chat_file(tmp_path / "t.parquet", _good())
    read = []
    original = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        read.append((kwargs["columns"], kwargs["batch_size"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    check_data_file(str(path), WHAT)
    assert read == [(["prompt", "reward_model.ground_truth"], input_checks.BATCH_ROWS)]


# --------------------------------------------------------------------------------------------- run folder


def _checkpoint(run_dir: Path, model_dir: Path, step: int = 3) -> Path:
    """The part of verl's checkpoint layout the check reads: tracker file and the actor's HF config."""
    from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename

    folder = run_dir / f"global_step_{step}"
    (folder / "actor" / "huggingface").mkdir(parents=True)
    shutil.copy(model_dir / "config.json", folder / "actor" / "huggingface" / "config.json")
    Path(get_checkpoint_tracker_filename(str(run_dir))).write_text(str(step))
    return folder


def _trainer(run_dir: Path, **values):
    return OmegaConf.create({"default_local_dir": str(run_dir), "resume_mode": "auto", **values})


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_model_dir, tiny_llama_dir):
    folder = _checkpoint(tmp_path / "run", tiny_llama_dir)
    message = _refused(check_run_dir, _trainer(tmp_path / "run"), _folder(tiny_model_dir))
    assert message.startswith(
        f"RUN_DIR={tmp_path / 'run'} (trainer.default_local_dir): its checkpoint {folder} was trained from a "
        f"different model than {STUDENT} {tiny_model_dir} (architectures: checkpoint ['LlamaForCausalLM'], "
        "MODEL_PATH ['Qwen2ForCausalLM']"
    )


def test_checkpoint_with_other_sizes_is_refused(tmp_path, tiny_model_dir):
    _checkpoint(tmp_path / "run", build_tiny_model(tmp_path / "deeper", num_layers=3, hidden=32))
    message = _refused(check_run_dir, _trainer(tmp_path / "run"), _folder(tiny_model_dir))
    assert (
        "hidden_size: checkpoint 32, MODEL_PATH 64; num_hidden_layers: checkpoint 3, MODEL_PATH 2" in message
    )


def test_resume_from_path_of_another_model_is_refused(tmp_path, tiny_model_dir, tiny_llama_dir):
    folder = _checkpoint(tmp_path / "elsewhere", tiny_llama_dir)
    trainer = _trainer(tmp_path / "run", resume_mode="resume_path", resume_from_path=str(folder))
    message = _refused(check_run_dir, trainer, _folder(tiny_model_dir))
    assert message.startswith(f"trainer.resume_from_path={folder}: its checkpoint {folder} was trained from")


def test_own_checkpoint_fresh_folder_and_disabled_resume_are_accepted(
    tmp_path, tiny_model_dir, tiny_llama_dir
):
    student = _folder(tiny_model_dir)
    _checkpoint(tmp_path / "own", tiny_model_dir)
    check_run_dir(_trainer(tmp_path / "own"), student)
    check_run_dir(_trainer(tmp_path / "fresh"), student)
    _checkpoint(tmp_path / "other", tiny_llama_dir)
    check_run_dir(_trainer(tmp_path / "other", resume_mode="disable"), student)


# ------------------------------------------------------------------------------- wired into the launch


def test_validate_before_launch_runs_the_input_checks(tmp_path, tiny_model_dir):
    from inprocess import compose_opd_config

    from opd.main_opd import validate_before_launch

    train, val = write_arithmetic_dataset(tmp_path / "data", train_size=8, val_size=4, seed=0)
    val.write_text("data_source,prompt\n")
    config = compose_opd_config(
        str(tiny_model_dir), str(tiny_model_dir), f"data.train_files={train}", f"data.val_files={val}"
    )
    message = _refused(validate_before_launch, config)
    assert message.startswith(f"data.val_files (VAL_FILES) {val}: not a parquet file")


def test_remote_data_files_are_left_to_verl(tmp_path, tiny_model_dir):
    from inprocess import compose_opd_config

    train, _ = write_arithmetic_dataset(tmp_path / "data", train_size=8, val_size=4, seed=0)
    config = compose_opd_config(
        str(tiny_model_dir),
        str(tiny_model_dir),
        f"data.train_files={train}",
        "data.val_files='hdfs://cluster/val.parquet'",
        f"trainer.default_local_dir={tmp_path / 'run'}",
    )
    opd = OPDConfig.from_dict(OmegaConf.to_container(config.opd, resolve=True)).validate()
    input_checks.check_inputs(config, opd, str(tiny_model_dir), str(tiny_model_dir))


# -------------------------------------------------------------------------------------- shell: variables


def _script_env(tmp_path: Path, gpus: int = 0, **variables) -> dict[str, str]:
    """A clean environment for train_opd.sh; ``gpus``: how many GPUs a stand-in nvidia-smi lists."""
    env = {k: v for k, v in os.environ.items() if k not in (*SCRIPT_VARS, *OPD_SCRIPT_VARS)}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"GPU {i}: stand-in\\n" for i in range(gpus))
    smi.write_text(f"#!/bin/sh\nprintf '{lines}'\nexit {0 if gpus else 9}\n")
    smi.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.setdefault("OUTPUT_ROOT", str(tmp_path / "out"))
    env.update({k: str(v).format(tmp=tmp_path) for k, v in variables.items()})
    return env


def _train_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TRAIN_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def _assert_refused_early(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {message}" in result.stderr
    assert not any(marker in result.stdout + result.stderr for marker in STARTED_MARKERS)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"TRAIN_BATCH_SIZE": "abc"}, "TRAIN_BATCH_SIZE=abc is not a whole number"),
        ({"TRAIN_BATCH_SIZE": "0"}, "TRAIN_BATCH_SIZE=0 must be >= 1"),
        ({"PPO_MINI_BATCH_SIZE": "08"}, "PPO_MINI_BATCH_SIZE=08 is not a whole number"),
        ({"PPO_MICRO_BATCH_SIZE_PER_GPU": "1.5"}, "PPO_MICRO_BATCH_SIZE_PER_GPU=1.5 is not a whole number"),
        ({"ROLLOUT_N": "-2"}, "ROLLOUT_N=-2 must be >= 1"),
        ({"MAX_RESPONSE_LENGTH": "8k"}, "MAX_RESPONSE_LENGTH=8k is not a whole number"),
        ({"TOTAL_STEPS": "ten"}, "TOTAL_STEPS=ten is not a whole number"),
        ({"SAVE_FREQ": "often"}, "SAVE_FREQ=often is not a whole number"),
        ({"LEARNING_RATE": "fast"}, "LEARNING_RATE=fast is not a number"),
        ({"LEARNING_RATE": "0"}, "LEARNING_RATE=0 must be > 0"),
        ({"ROLLOUT_TEMPERATURE": "-1"}, "ROLLOUT_TEMPERATURE=-1 must be >= 0"),
        ({"GPU_MEMORY_UTIL": "1.5"}, "GPU_MEMORY_UTIL=1.5 must be <= 1"),
        ({"OPD_TOPK": "abc"}, "OPD_TOPK=abc is not a whole number"),
        ({"OPD_CHUNK_SIZE": "1k"}, "OPD_CHUNK_SIZE=1k is not a whole number"),
        ({"OPD_MAX_LENGTH": "long"}, "OPD_MAX_LENGTH=long is not a whole number"),
        ({"OPD_REWARD_BETA": "warm"}, "OPD_REWARD_BETA=warm is not a number"),
        ({"OPD_TIP_KEEP_FRACTION": "half"}, "OPD_TIP_KEEP_FRACTION=half is not a number"),
        ({"OPD_TASK_LOSS_COEF": "1,5"}, "OPD_TASK_LOSS_COEF=1,5 is not a number"),
    ],
)
def test_script_refuses_a_malformed_number(tmp_path, variables, message):
    _assert_refused_early(_train_script(_script_env(tmp_path, **variables)), message)


def test_script_refuses_an_output_root_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    env = _script_env(tmp_path, OUTPUT_ROOT="{tmp}/file/out")
    _assert_refused_early(
        _train_script(env), f"OUTPUT_ROOT={tmp_path}/file/out: {tmp_path}/file is not a directory"
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs procfs, a folder nobody can write to")
@pytest.mark.parametrize("variable", ["OUTPUT_ROOT", "RUN_DIR"])
def test_script_refuses_an_unwritable_folder(tmp_path, variable):
    env = _script_env(tmp_path, **{variable: "/proc/self/opd-out"})
    _assert_refused_early(_train_script(env), f"{variable}=/proc/self/opd-out: /proc/self is not writable")


@pytest.mark.parametrize(
    ("gpus", "variables", "message"),
    [
        (
            0,
            {"N_GPUS_PER_NODE": "2"},
            "N_GPUS_PER_NODE=2: nvidia-smi sees no GPU, and the CPU backend runs one",
        ),
        (0, {"NNODES": "2"}, "NNODES=2: nvidia-smi sees no GPU, and the CPU backend runs on this node only"),
        (2, {"N_GPUS_PER_NODE": "4"}, "N_GPUS_PER_NODE=4 but nvidia-smi sees 2 GPU(s) on this node"),
    ],
    ids=["cpu", "cpu nodes", "too many gpus"],
)
def test_script_refuses_more_gpus_than_present(tmp_path, gpus, variables, message):
    _assert_refused_early(_train_script(_script_env(tmp_path, gpus=gpus, **variables)), message)


def _common_sh(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``snippet`` with scripts/lib/common.sh sourced (no environment set-up, nothing else)."""
    command = f'source "{COMMON_SH}"; {snippet}'
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            {"TRAIN_BATCH_SIZE": 8, "PPO_MINI_BATCH_SIZE": 16},
            "PPO_MINI_BATCH_SIZE=16 is larger than TRAIN_BATCH_SIZE=8: an optimizer step cannot take more",
        ),
        (
            {"TRAIN_BATCH_SIZE": 3, "ROLLOUT_N": 3, "N_GPUS_PER_NODE": 2},
            "TRAIN_BATCH_SIZE x ROLLOUT_N = 3 x 3 = 9 samples per step do not split evenly over "
            "N_GPUS_PER_NODE x NNODES = 2 x 1 = 2 training processes",
        ),
        (
            {"TRAIN_BATCH_SIZE": 6, "ROLLOUT_N": 1, "N_GPUS_PER_NODE": 2, "NNODES": 2},
            "TRAIN_BATCH_SIZE x ROLLOUT_N = 6 x 1 = 6 samples per step do not split evenly over "
            "N_GPUS_PER_NODE x NNODES = 2 x 2 = 4 training processes",
        ),
    ],
)
def test_batch_sizes_verl_would_reject(tmp_path, sizes, message):
    sizes = {"ROLLOUT_N": 1, "N_GPUS_PER_NODE": 1, "NNODES": 1, "PPO_MINI_BATCH_SIZE": 1, **sizes}
    result = _common_sh("check_batch_sizes", _script_env(tmp_path, gpus=4, **sizes))
    assert result.returncode == 2 and f"error: {message}" in result.stderr


def test_batch_sizes_verl_accepts_pass(tmp_path):
    # micro-batch above the per-process mini-batch: verl sets no rule, the OPD worker cuts it
    sizes = {
        "TRAIN_BATCH_SIZE": 6,
        "PPO_MINI_BATCH_SIZE": 3,
        "ROLLOUT_N": 2,
        "N_GPUS_PER_NODE": 4,
        "NNODES": 1,
    }
    result = _common_sh("check_batch_sizes", _script_env(tmp_path, PPO_MICRO_BATCH_SIZE_PER_GPU=64, **sizes))
    assert result.returncode == 0, result.stderr


WHOLE_NUMBER_VARIABLES = (
    "TRAIN_BATCH_SIZE PPO_MINI_BATCH_SIZE PPO_MICRO_BATCH_SIZE_PER_GPU TOTAL_EPOCHS MAX_PROMPT_LENGTH "
    "MAX_RESPONSE_LENGTH ROLLOUT_N TP_SIZE NNODES N_GPUS_PER_NODE TOTAL_STEPS VAL_BATCH_SIZE SAVE_FREQ "
    "TEST_FREQ OPD_CHUNK_SIZE OPD_TOPK OPD_MAX_LENGTH"
).split()
DECIMAL_VARIABLES = (
    "LEARNING_RATE ROLLOUT_TEMPERATURE GPU_MEMORY_UTIL OPD_REWARD_BETA OPD_TIP_KEEP_FRACTION "
    "OPD_TASK_LOSS_COEF"
).split()


@pytest.mark.parametrize("variable", [*WHOLE_NUMBER_VARIABLES, *DECIMAL_VARIABLES])
def test_every_numeric_variable_is_checked(tmp_path, variable):
    kind = "a whole number" if variable in WHOLE_NUMBER_VARIABLES else "a number"
    _assert_refused_early(
        _train_script(_script_env(tmp_path, **{variable: "x1"})), f"{variable}=x1 is not {kind}"
    )


def test_numbers_in_range_and_nulls_pass_the_number_checks(tmp_path):
    variables = {
        "TRAIN_BATCH_SIZE": 8,
        "LEARNING_RATE": "1e-6",
        "ROLLOUT_TEMPERATURE": "0",
        "GPU_MEMORY_UTIL": "1",
        "TOTAL_STEPS": "null",
        "VAL_BATCH_SIZE": "null",
        "SAVE_FREQ": "-1",
        "OPD_REWARD_BETA": "null",
        "OPD_MAX_LENGTH": "null",
        "OPD_TIP_KEEP_FRACTION": ".5",
        "OPD_TASK_LOSS_COEF": "+1E-2",
        # the check after the number checks, so its refusal shows that every number above passed
        "N_GPUS_PER_NODE": "2",
    }
    _assert_refused_early(_train_script(_script_env(tmp_path, **variables)), "N_GPUS_PER_NODE=2: nvidia-smi")


def test_script_refuses_a_mini_batch_above_the_batch(tmp_path):
    for model in ("student", "teacher", "data"):
        (tmp_path / model).mkdir()
    for split in ("train", "val"):
        (tmp_path / "data" / f"{split}.parquet").write_bytes(b"")
    env = _script_env(
        tmp_path,
        MODEL_PATH="{tmp}/student",
        TEACHER_MODEL_PATH="{tmp}/teacher",
        DATA_DIR="{tmp}/data",
        TRAIN_BATCH_SIZE="4",
        PPO_MINI_BATCH_SIZE="8",
    )
    _assert_refused_early(_train_script(env), "PPO_MINI_BATCH_SIZE=8 is larger than TRAIN_BATCH_SIZE=4")


def test_script_hands_a_broken_data_file_to_the_python_checks(tmp_path, tiny_model_dir):
    train, val = write_arithmetic_dataset(tmp_path / "data", train_size=8, val_size=4, seed=0)
    train.write_text("prompt,answer\n1 + 1,2\n")
    env = _script_env(
        tmp_path,
        MODEL_PATH=tiny_model_dir,
        TEACHER_MODEL_PATH=tiny_model_dir,
        DATA_DIR="{tmp}/data",
        MAX_PROMPT_LENGTH=256,
        MAX_RESPONSE_LENGTH=16,
    )
    result = _train_script(env)
    assert result.returncode != 0
    assert (
        f"opd: configuration error: data.train_files (TRAIN_FILES) {train}: not a parquet file"
        in result.stderr
    )
    assert "ray.init" not in result.stdout + result.stderr and "Started a local Ray" not in result.stdout

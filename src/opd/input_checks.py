"""What a run reads and writes, checked before Ray or any model starts; every message names its input.

* model folders: ``config.json`` readable, tokenizer files present, weights present and every
  ``*.safetensors`` header intact (``safetensors.safe_open`` maps the file and parses only its header);
* lengths: ``opd.max_length`` above ``data.max_prompt_length``, prompt + response within the position
  limit of both models; ``opd.topk`` within the vocabulary rows the two models share;
* data files: non-empty parquet with the prompt column and ``reward_model.ground_truth``, every prompt a
  list of ``{role, content}`` messages of valid UTF-8 text (only those columns are read, batch by batch);
* the run folder: a checkpoint the run would resume from must come from the student's architecture;
* the command line: misspelt ``opd.*`` keys, before hydra rejects them with advice to append them.

Sizes and paths the shell script owns (batch sizes, GPU count, writable ``OUTPUT_ROOT``) are checked in
``scripts/lib/common.sh``, where the message can name the environment variable before Python starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from opd.config import OPDConfig, OPDConfigError
from opd.pairing import STUDENT, TEACHER, output_rows

DATA_FILES = {"train_files": "data.train_files (TRAIN_FILES)", "val_files": "data.val_files (VAL_FILES)"}

# Any one of these lets AutoTokenizer build the vocabulary (fast, SentencePiece, or BPE/WordPiece files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

GROUND_TRUTH = "reward_model.ground_truth"
# Rows decoded at a time: bounds the memory of the data check whatever the file size.
BATCH_ROWS = 1024

# RoPE types whose factor stretches max_position_embeddings, counted as vLLM counts them: llama3 and
# longrope (su) already state the stretched length there; yarn stretches its original length.
_FIXED_LENGTH_ROPE = ("llama3", "longrope", "su")


class ModelFolder(NamedTuple):
    """A checked model folder: what names it in messages, where it is, its Hugging Face config."""

    what: str
    path: str
    config: Any


def check_inputs(config, opd_config: OPDConfig, student_path: str, teacher_path: str) -> None:
    """Run every check of this module on a composed trainer config (``opd.max_length`` already filled)."""
    student = check_model_folder(student_path, STUDENT)
    teacher = check_model_folder(teacher_path, TEACHER)
    check_lengths(config.data, opd_config, (student, teacher))
    check_topk(opd_config, student, teacher)
    opd_config.check_rollout_n(int(config.actor_rollout_ref.rollout.n))
    prompt_key = str(config.data.get("prompt_key", "prompt"))
    for key, what in DATA_FILES.items():
        # verl copies an hdfs:// file to local disk itself, after Ray starts: only local files are read here
        for path in (p for p in data_paths(config.data[key]) if "://" not in p):
            check_data_file(path, what, prompt_key)
            _check_teacher_prompts(path, opd_config, prompt_key)
    check_run_dir(config.trainer, student)


def _check_teacher_prompts(path: str, opd_config: OPDConfig, prompt_key: str) -> None:
    """Every row must carry what ``opd.teacher_prompt`` builds the teacher's prompt from."""
    from opd.teacher_prompts import TeacherPromptError, check_teacher_prompts

    if opd_config.teacher_prompt == "same":
        return
    try:
        check_teacher_prompts(
            path, opd_config.teacher_prompt, opd_config.teacher_prompt_template, prompt_key=prompt_key
        )
    except TeacherPromptError as error:
        raise OPDConfigError(f"opd.teacher_prompt={opd_config.teacher_prompt}: {error}") from None


def check_override_keys(argv: Sequence[str]) -> None:
    """Name misspelt ``opd.*`` keys of a command line; hydra itself would only advise ``+opd.key=...``."""
    from common.launch import override_key

    keys = (override_key(arg) for arg in argv if "=" in arg and not arg.startswith("-"))
    OPDConfig.check_keys(key.split(".")[1] for key in keys if key.startswith("opd."))


def data_paths(files) -> list[str]:
    """``data.train_files`` / ``data.val_files`` (one path or a list) as a list of paths."""
    return [str(files)] if isinstance(files, str) else [str(f) for f in files]


def check_model_folder(path: str, what: str) -> ModelFolder:
    """Refuse a folder the Hugging Face loaders would fail on, reading config.json and weight headers only."""
    from transformers import AutoConfig

    where = f"{what} {path}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise OPDConfigError(f"{where}: no config.json, so not a Hugging Face model folder")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise OPDConfigError(
            f"{where}: config.json cannot be read ({type(error).__name__}: {error})"
        ) from None
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise OPDConfigError(f"{where}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    for weights in _safetensors_files(path, where):
        _check_safetensors_header(weights, where)
    return ModelFolder(what, path, hf_config)


def _safetensors_files(path: str, where: str) -> list[str]:
    """The safetensors files holding the weights; [] for PyTorch pickles, which cannot be checked cheaply."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise OPDConfigError(f"{where}: {SAFETENSORS_INDEX} cannot be read ({error!r})") from None
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
        if missing:
            raise OPDConfigError(f"{where}: {SAFETENSORS_INDEX} names missing shard(s) {', '.join(missing)}")
        return [os.path.join(path, shard) for shard in shards]
    if os.path.isfile(os.path.join(path, SAFETENSORS)):
        return [os.path.join(path, SAFETENSORS)]
    if any(os.path.isfile(os.path.join(path, name)) for name in TORCH_WEIGHTS):
        return []
    raise OPDConfigError(
        f"{where}: no weights (none of {SAFETENSORS}, {SAFETENSORS_INDEX}, {', '.join(TORCH_WEIGHTS)})"
    )


def _check_safetensors_header(file: str, where: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy"):
            pass
    except (SafetensorError, OSError) as error:
        with open(file, "rb") as handle:
            lfs = handle.read(64).startswith(b"version https://git-lfs")
        hint = "; it is a Git LFS pointer: fetch the real file with git lfs pull" if lfs else ""
        raise OPDConfigError(
            f"{where}: {os.path.basename(file)} is not a complete safetensors file ({error}){hint}"
        ) from None


def position_limit(hf_config) -> int | None:
    """Longest sequence the model's positions cover, None when its config states no limit."""
    text = hf_config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if limit and factor and kind not in _FIXED_LENGTH_ROPE:
        base = rope.get("original_max_position_embeddings", limit) if kind == "yarn" else limit
        limit = int(base * factor)
    return limit


def check_lengths(data, opd_config: OPDConfig, models: Iterable[ModelFolder]) -> None:
    """A sample is at most prompt + response tokens: both must fit, and the OPD cap must leave a response."""
    prompt, response = int(data.max_prompt_length), int(data.max_response_length)
    if opd_config.max_length is not None and opd_config.max_length <= prompt:
        raise OPDConfigError(
            f"opd.max_length={opd_config.max_length} (OPD_MAX_LENGTH) must exceed data.max_prompt_length="
            f"{prompt} (MAX_PROMPT_LENGTH): a prompt that long would keep no response token to learn from"
        )
    for model in models:
        limit = position_limit(model.config)
        if limit is not None and prompt + response > limit:
            raise OPDConfigError(
                f"data.max_prompt_length + data.max_response_length = {prompt} + {response} = "
                f"{prompt + response} (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) exceeds the {limit} "
                f"positions (max_position_embeddings) of {model.what} {model.path}"
            )


def check_topk(opd_config: OPDConfig, student: ModelFolder, teacher: ModelFolder) -> None:
    """The top-k signal ranks the vocabulary rows both heads share; k cannot exceed them."""
    if opd_config.teacher_signal != "topk":
        return
    shared = min(output_rows(student.config, student.path), output_rows(teacher.config, teacher.path))
    if opd_config.topk > shared:
        raise OPDConfigError(
            f"opd.topk={opd_config.topk} (OPD_TOPK) exceeds the {shared} vocabulary rows the teacher and "
            "student output heads share"
        )


def check_data_file(path: str, what: str, prompt_key: str = "prompt") -> None:
    """Refuse a file verl's RL dataset or the reward would fail on, naming the first bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"{what} {path}"
    if not os.path.isfile(path):
        raise OPDConfigError(f"{where}: no such file")
    if os.path.getsize(path) == 0:
        raise OPDConfigError(f"{where}: the file is empty (0 bytes)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise OPDConfigError(f"{where}: not a parquet file ({error})") from None
    if parquet.metadata.num_rows == 0:
        raise OPDConfigError(f"{where}: the file has no rows")
    _check_columns(parquet.schema_arrow, where, prompt_key)
    first = 0
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[prompt_key, GROUND_TRUTH]):
            _check_rows(batch, first, where, prompt_key)
            first += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        raise OPDConfigError(f"{where}: unreadable from row {first} on ({error})") from None


def _check_columns(schema, where: str, prompt_key: str) -> None:
    import pyarrow as pa

    if prompt_key not in schema.names:
        raise OPDConfigError(
            f"{where}: no {prompt_key!r} column (data.prompt_key); columns: {', '.join(schema.names)}"
        )
    reward = schema.field("reward_model").type if "reward_model" in schema.names else None
    if not (isinstance(reward, pa.StructType) and reward.get_field_index("ground_truth") >= 0):
        raise OPDConfigError(
            f"{where}: no {GROUND_TRUTH} column, the reference answer the reward grades against"
        )


def _check_rows(batch, first: int, where: str, prompt_key: str) -> None:
    """Structure of every row up to the first undecodable one, then that one: the first bad row wins."""
    decodable, column, error = _decodable_rows(batch)
    for offset, prompt in enumerate(batch.column(prompt_key).slice(0, decodable).to_pylist()):
        problem = _prompt_problem(prompt)
        if problem:
            raise OPDConfigError(f"{where}: row {first + offset}: {prompt_key} {problem}")
    if column is not None:
        raise OPDConfigError(f"{where}: row {first + decodable}: {column} is not valid UTF-8 text ({error})")


def _decodable_rows(batch) -> tuple[int, str | None, str | None]:
    """Leading rows whose text is valid UTF-8, and the column and error of the first row that is not.

    Arrow reads parquet strings without validating them: a full validation of the batch finds bad bytes,
    then decoding row by row finds the first row holding them.
    """
    import pyarrow as pa

    try:
        batch.validate(full=True)
        return batch.num_rows, None, None
    except pa.ArrowInvalid:
        pass
    for row in range(batch.num_rows):
        for name in batch.schema.names:
            try:
                batch.column(name).slice(row, 1).to_pylist()
            except UnicodeDecodeError as error:
                # the ground truth arrives as the one field of a reward_model struct
                return row, GROUND_TRUTH if name == "reward_model" else name, str(error)
    return batch.num_rows, None, None


def _prompt_problem(prompt) -> str | None:
    """Why ``prompt`` is not a list of chat messages, or None when it is one."""
    if not isinstance(prompt, list):
        return f"is {_kind(prompt)}, not a list of chat messages ({{'role': ..., 'content': ...}} dicts)"
    if not prompt:
        return "is an empty list of chat messages"
    for index, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"message {index} is {_kind(message)}, not a {{'role': ..., 'content': ...}} dict"
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                return f"message {index} has no text {field!r} (got {message.get(field)!r:.60})"
    return None


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def check_run_dir(trainer, student: ModelFolder) -> None:
    """Refuse to resume from a checkpoint of another model: it would not load, or load into the wrong net."""
    from transformers import AutoConfig

    found = _resume_checkpoint(trainer)
    if found is None:
        return
    what, folder = found
    saved = os.path.join(folder, "actor", "huggingface")
    if not os.path.isfile(os.path.join(saved, "config.json")):
        return
    was, now = _identity(AutoConfig.from_pretrained(saved)), _identity(student.config)
    differences = [
        f"{key}: checkpoint {was[key]}, MODEL_PATH {now[key]}" for key in was if was[key] != now[key]
    ]
    if differences:
        raise OPDConfigError(
            f"{what}: its checkpoint {folder} was trained from a different model than {student.what} "
            f"{student.path} ({'; '.join(differences)}); choose a new RUN_DIR, or the MODEL_PATH the run "
            "started from"
        )


def _resume_checkpoint(trainer) -> tuple[str, str] | None:
    """(what names it, folder) of the ``global_step_N`` checkpoint verl's trainer would resume from."""
    from verl.utils.checkpoint.checkpoint_manager import (
        find_latest_ckpt_path,
        get_checkpoint_tracker_filename,
    )

    mode = trainer.get("resume_mode", "auto")
    if mode == "resume_path" and trainer.get("resume_from_path"):
        path = os.path.abspath(str(trainer.resume_from_path))
        return f"trainer.resume_from_path={path}", path
    if mode != "auto":
        return None
    run_dir = os.path.abspath(str(trainer.default_local_dir))
    if not os.path.isfile(get_checkpoint_tracker_filename(run_dir)):
        return None
    folder = find_latest_ckpt_path(run_dir)
    return (f"RUN_DIR={run_dir} (trainer.default_local_dir)", folder) if folder else None


def _identity(hf_config) -> dict[str, Any]:
    """What differs between two different models but never between a model and its own checkpoint."""
    text = hf_config.get_text_config()
    return {
        "architectures": hf_config.architectures,
        **{key: getattr(text, key, None) for key in ("hidden_size", "num_hidden_layers", "vocab_size")},
    }

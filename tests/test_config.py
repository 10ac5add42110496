"""The opd block and the teacher/student pairing are validated before any model loads."""

import json

import pytest
from tiny_models import TOKENIZER_SIZE, build_tiny_model, build_tiny_tokenizer

from opd.config import OPDConfig, OPDConfigError
from opd.pairing import check_pairing


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    build_tiny_model(path, vocab_size=TOKENIZER_SIZE + 13)
    return str(path)


def _config(teacher_dir, **overrides):
    return OPDConfig(teacher_model_path=teacher_dir, **overrides)


def test_defaults_are_valid(teacher_dir):
    assert _config(teacher_dir).validate().loss_type == "reverse_kl"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"loss_type": "kl_of_doom"}, "opd.loss_type"),
        ({"beta": 0.0}, "opd.beta"),
        ({"beta": 1.0}, "opd.beta"),
        ({"beta": -0.3}, "opd.beta"),
        ({"chunk_size": 0}, "opd.chunk_size"),
        ({"chunk_size": -5}, "opd.chunk_size"),
        ({"reward_beta": 0.0}, "opd.reward_beta"),
        ({"reward_beta": -1.0}, "opd.reward_beta"),
        ({"temperature": 0.0}, "opd.temperature"),
        ({"max_length": 0}, "opd.max_length"),
        ({"overlength": "ignore"}, "opd.overlength"),
        ({"val_num_prompts": -1}, "opd.val_num_prompts"),
        ({"val_max_new_tokens": 0}, "opd.val_max_new_tokens"),
        ({"skew_alpha": 1.0}, "opd.skew_alpha"),
        ({"skew_alpha": -0.1}, "opd.skew_alpha"),
        ({"topk": 0}, "opd.topk"),
        ({"iw_opd_gamma": -0.1}, "opd.iw_opd_gamma"),
        ({"iw_opd_epsilon": 0.0}, "opd.iw_opd_epsilon"),
        ({"tip_keep_fraction": 0.0}, "opd.tip_keep_fraction"),
        ({"tip_keep_fraction": 1.5}, "opd.tip_keep_fraction"),
        ({"tip_score": "vibes"}, "opd.tip_score"),
        ({"task_loss_coef": -1.0}, "opd.task_loss_coef"),
        ({"distill_loss_coef": -1.0}, "opd.distill_loss_coef"),
        ({"distill_loss_coef": 0.0}, "opd.distill_loss_coef and opd.task_loss_coef are both 0"),
    ],
)
def test_each_bad_key_is_named(teacher_dir, overrides, key):
    with pytest.raises(OPDConfigError, match=key.replace(".", r"\.")):
        _config(teacher_dir, **overrides).validate()


def test_loss_type_selects_the_teacher_signal(teacher_dir):
    assert _config(teacher_dir, loss_type="forward_kl_topk").validate().teacher_signal == "topk"
    for loss in ("reverse_kl", "forward_kl", "jsd", "skew_kl", "skew_reverse_kl"):
        assert _config(teacher_dir, loss_type=loss).validate().teacher_signal == "full"
    for loss in ("sampled_rkl_pg", "iw_opd"):
        config = _config(teacher_dir, loss_type=loss).validate()
        assert config.teacher_signal == "sampled" and config.needs_rollout_log_probs


def test_task_loss_alone_is_valid_and_needs_rollout_log_probs(teacher_dir):
    config = _config(teacher_dir, distill_loss_coef=0.0, task_loss_coef=1.0).validate()
    assert config.needs_rollout_log_probs
    assert not _config(teacher_dir).validate().needs_rollout_log_probs


def test_unknown_loss_lists_the_valid_ones(teacher_dir):
    with pytest.raises(OPDConfigError, match="reverse_kl"):
        _config(teacher_dir, loss_type="nope").validate()


def test_missing_or_absent_teacher_path():
    with pytest.raises(OPDConfigError, match="opd.teacher_model_path is required"):
        OPDConfig().validate()
    with pytest.raises(OPDConfigError, match="no such folder"):
        OPDConfig(teacher_model_path="/nonexistent/teacher").validate()


def test_unknown_keys_are_rejected():
    with pytest.raises(OPDConfigError, match="opd.lose_type"):
        OPDConfig.from_dict({"lose_type": "jsd"})


def test_padded_output_head_is_accepted(tmp_path, teacher_dir):
    # Qwen2.5-style: same tokenizer, teacher head padded with 13 extra rows
    build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE)
    pairing = check_pairing(str(tmp_path), teacher_dir)
    assert pairing.teacher_rows == pairing.student_rows + 13
    assert pairing.shared_rows == TOKENIZER_SIZE


def test_tokenizers_that_disagree_are_rejected(tmp_path, teacher_dir):
    student = build_tiny_tokenizer(tmp_path)
    student.add_tokens(["<tool_call>"], special_tokens=True)
    student.save_pretrained(str(tmp_path))
    build_tiny_model(tmp_path / "unused", vocab_size=TOKENIZER_SIZE)
    (tmp_path / "config.json").write_text((tmp_path / "unused" / "config.json").read_text())
    with pytest.raises(OPDConfigError, match="student-only"):
        check_pairing(str(tmp_path), teacher_dir)


def test_head_smaller_than_the_tokenizer_is_rejected(tmp_path, teacher_dir):
    build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = TOKENIZER_SIZE - 10
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OPDConfigError, match="output heads share"):
        check_pairing(str(tmp_path), teacher_dir)


def test_different_eos_token_is_rejected(tmp_path, teacher_dir):
    build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(OPDConfigError, match="eos_token_id differs"):
        check_pairing(str(tmp_path), teacher_dir)


def test_different_chat_template_is_a_warning(tmp_path, teacher_dir, caplog):
    tokenizer = build_tiny_tokenizer(tmp_path)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    build_tiny_model(tmp_path / "model", vocab_size=TOKENIZER_SIZE)
    (tmp_path / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    tokenizer.save_pretrained(str(tmp_path))
    with caplog.at_level("WARNING"):
        check_pairing(str(tmp_path), teacher_dir)
    assert "chat template differs" in caplog.text

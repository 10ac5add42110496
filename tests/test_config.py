"""What the opd block and the teacher/student pairing accept; what they refuse is in test_bad_input.py."""

import pytest
from tiny_models import TOKENIZER_SIZE, build_tiny_model, build_tiny_tokenizer

from opd.config import OPDConfig
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


def test_padded_output_head_is_accepted(tmp_path, teacher_dir):
    # Qwen2.5-style: same tokenizer, teacher head padded with 13 extra rows
    build_tiny_model(tmp_path, vocab_size=TOKENIZER_SIZE)
    pairing = check_pairing(str(tmp_path), teacher_dir)
    assert pairing.teacher_rows == pairing.student_rows + 13
    assert pairing.shared_rows == TOKENIZER_SIZE


def test_different_chat_template_is_a_warning(tmp_path, teacher_dir, caplog):
    tokenizer = build_tiny_tokenizer(tmp_path)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    build_tiny_model(tmp_path / "model", vocab_size=TOKENIZER_SIZE)
    (tmp_path / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    tokenizer.save_pretrained(str(tmp_path))
    with caplog.at_level("WARNING"):
        check_pairing(str(tmp_path), teacher_dir)
    assert "chat template differs" in caplog.text


def test_the_shipped_opd_block_has_the_declared_types(teacher_dir):
    from inprocess import compose_opd_config
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(compose_opd_config(teacher_dir, teacher_dir).opd, resolve=True)
    assert OPDConfig.from_dict(values).validate().teacher_model_path == teacher_dir
    # every default comes from OPDConfig, the one place it is written
    assert values == {**OPDConfig.defaults(), "teacher_model_path": teacher_dir}

"""validate_before_launch: everything checked before Ray starts, each error naming its key."""

import pandas as pd
import pytest
from inprocess import compose_opd_config
from tiny_models import build_tiny_model

from data.arithmetic import write_arithmetic_dataset
from opd.config import OPDConfigError
from opd.main_opd import validate_before_launch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    build_tiny_model(root / "student", seed=0)
    build_tiny_model(root / "teacher", seed=1)
    train, val = write_arithmetic_dataset(root / "data", train_size=8, val_size=4, seed=0)
    return root, train, val


def _config(root, train, val, *extra):
    return compose_opd_config(
        str(root / "student"),
        str(root / "teacher"),
        f"data.train_files={train}",
        f"data.val_files={val}",
        *extra,
    )


def test_valid_setup_fills_derived_keys_and_the_reward(setup):
    root, train, val = setup
    config = _config(root, train, val, "data.max_prompt_length=100", "data.max_response_length=20")
    opd_config = validate_before_launch(config)
    assert opd_config.max_length == 120
    assert config.reward.custom_reward_function.path == "pkg://rewards.dispatch"


def test_data_source_without_a_scorer_stops_the_launch(setup, tmp_path):
    root, train, _ = setup
    rows = pd.read_parquet(train)
    rows["data_source"] = "somebody/else"
    rows.to_parquet(tmp_path / "val.parquet")
    with pytest.raises(OPDConfigError, match="data.train_files / data.val_files"):
        validate_before_launch(_config(root, train, tmp_path / "val.parquet"))


def test_missing_student_is_named(setup):
    root, train, val = setup
    config = _config(root, train, val, f"actor_rollout_ref.model.path={root / 'nope'}")
    with pytest.raises(OPDConfigError, match="actor_rollout_ref.model.path"):
        validate_before_launch(config)


@pytest.mark.parametrize(
    "override",
    ["actor_rollout_ref.actor.use_kl_loss=true", "algorithm.use_kl_in_reward=true"],
)
def test_switches_pure_opd_does_not_support_are_rejected(setup, override):
    root, train, val = setup
    with pytest.raises(OPDConfigError, match=override.split("=")[0]):
        validate_before_launch(_config(root, train, val, override))


def test_policy_gradient_objective_turns_on_rollout_log_probs(setup, capsys):
    root, train, val = setup
    config = _config(root, train, val, "opd.loss_type=sampled_rkl_pg")
    assert not config.actor_rollout_ref.rollout.calculate_log_probs
    validate_before_launch(config)
    assert config.actor_rollout_ref.rollout.calculate_log_probs
    assert "calculate_log_probs=true" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("opd.loss_type=iw_opd", "actor_rollout_ref.rollout.temperature=0.7"), "rollout.temperature"),
        (("opd.task_loss_coef=1.0", "actor_rollout_ref.rollout.n=1"), "rollout.n >= 2"),
        (
            ("opd.loss_type=iw_opd", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"),
            "policy_loss.loss_mode",
        ),
    ],
)
def test_objective_rollout_mismatches_stop_the_launch(setup, overrides, message):
    root, train, val = setup
    with pytest.raises(OPDConfigError, match=message.replace(".", r"\.")):
        validate_before_launch(_config(root, train, val, *overrides))


def test_grpo_plus_opd_needs_no_reference_model(setup):
    from verl.trainer.ppo.utils import need_reference_policy

    root, train, val = setup
    config = _config(root, train, val, "opd.task_loss_coef=1.0", "actor_rollout_ref.rollout.n=2")
    validate_before_launch(config)
    assert not need_reference_policy(config)

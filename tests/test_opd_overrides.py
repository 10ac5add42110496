"""The scripts' OPD_* variables become opd.* overrides only when set; free text reaches the config intact."""

import os
import subprocess
from pathlib import Path

from inprocess import compose_opd_config

from opd.config import OPDConfig

LIB = Path(__file__).resolve().parents[1] / "scripts" / "lib"
# parentheses, commas, braces, colons, quotes, backslashes and newlines: each would be override syntax
HOSTILE_TEMPLATE = (
    "{prompt}\n\n(For you only, a reference: {solution}. Don't copy it; "
    "end with \\boxed{{x}}, as in 'a, b'.)\\"
)


def _overrides(**variables: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
    env.update(variables)
    script = (
        f'source "{LIB}/common.sh"; source "{LIB}/opd.sh"; opd_overrides; '
        'printf "%s\\0" "${OPD_ARGS[@]}"'
    )
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [arg for arg in result.stdout.split("\0") if arg]


def test_unset_variables_pass_nothing_so_the_schema_defaults_hold():
    assert _overrides() == []


def test_set_variables_become_their_keys(tmp_path):
    args = _overrides(
        OPD_LOSS_TYPE="jsd",
        OPD_TOPK="8",
        OPD_MAX_LENGTH="null",
        OPD_TEACHER_PROMPT="template",
        OPD_TEACHER_PROMPT_TEMPLATE=HOSTILE_TEMPLATE,
    )
    config = compose_opd_config(str(tmp_path), str(tmp_path), *args).opd
    assert (config.loss_type, config.topk, config.max_length) == ("jsd", 8, None)
    assert config.teacher_prompt == "template"
    assert config.teacher_prompt_template == HOSTILE_TEMPLATE
    assert config.chunk_size == OPDConfig.defaults()["chunk_size"]

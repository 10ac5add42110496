"""train_opd.sh stops with a clear message before any work when the model paths are wrong."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "opd" / "train_opd.sh"


def _run(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TEACHER_MODEL_PATH", "DATA_DIR")}
    env.update(OUTPUT_ROOT=str(tmp_path), **env_vars)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("env_vars", "message"),
    [
        ({"MODEL_PATH": "{tmp}"}, "MODEL_PATH is set but TEACHER_MODEL_PATH is not"),
        ({"TEACHER_MODEL_PATH": "{tmp}"}, "TEACHER_MODEL_PATH is set but MODEL_PATH (the student) is not"),
        ({"MODEL_PATH": "{tmp}", "TEACHER_MODEL_PATH": "{tmp}/missing"}, "TEACHER_MODEL_PATH={tmp}/missing"),
        (
            {"MODEL_PATH": "{tmp}", "TEACHER_MODEL_PATH": "{tmp}", "DATA_DIR": "{tmp}/nodata"},
            "DATA_DIR={tmp}/nodata",
        ),
    ],
)
def test_bad_model_or_data_paths_stop_the_script(tmp_path, env_vars, message):
    result = _run(tmp_path, **{k: v.format(tmp=tmp_path) for k, v in env_vars.items()})
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr
    assert "opd.main_opd" not in result.stdout

"""Shared test setup: offline Hugging Face, the CPU backend on GPU-less hosts, tiny model folders.

The environment is set at import time, before any test module imports verl, because verl resolves
its platform once per process during ``import verl``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    # until the project is pip-installed, import ``common`` / ``opd`` from the source tree
    sys.path.insert(0, str(_SRC))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common.cpu_backend import cpu_run_env, use_cpu_backend  # noqa: E402

if use_cpu_backend():
    os.environ.update(cpu_run_env())

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + ChatML byte tokenizer (vocab 259), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model with the same tokenizer, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=1)


@pytest.fixture
def isolated_run_env(tmp_path):
    """Environment for a child process that starts Ray: private HOME / TMPDIR / RAY_TMPDIR.

    Unix socket paths must stay short (about 100 characters): Ray's and those of the process pools
    that verl's dataset filtering starts under TMPDIR. Both temp folders are therefore fresh folders
    directly under the system temp dir rather than inside pytest's deep ``tmp_path``.
    """
    ray_tmp, tmp = tempfile.mkdtemp(prefix="ray"), tempfile.mkdtemp(prefix="tmp")
    home = tmp_path / "home"
    home.mkdir()
    env = cpu_run_env() if use_cpu_backend() else dict(os.environ)
    env.update(
        HOME=str(home),
        TMPDIR=str(tmp),
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
    )
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)

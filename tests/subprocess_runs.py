"""Run a training entry point in its own process group, killing the whole tree (Ray included) at the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest


def run_in_own_group(cmd, env, cwd, log_path: Path, timeout: float) -> int:
    """Run ``cmd`` in a new session with output to ``log_path``; fail the test on timeout."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exceeded {timeout}s; log: {log_path}")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def step_metrics(log: str) -> dict[int, dict[str, str]]:
    """``{step: {metric: value}}`` from verl's console logger lines ``step:N - key:value - ...``."""
    steps = {}
    for match in re.finditer(r"step:(\d+) - (.*)", log):
        pairs = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
        steps.setdefault(int(match.group(1)), {}).update(dict(pairs))
    return steps

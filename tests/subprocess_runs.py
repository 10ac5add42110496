"""Run a training entry point in its own session, killing every process of it (Ray included) at the end.

Ray's worker processes get process groups of their own, so killing the entry point's process group
would leave them running; they stay in its session, which is what :func:`kill_session` kills.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest


def start_in_own_session(cmd, env, cwd, log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new session, stdout and stderr to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # the fields after the command name (which may hold spaces) are: state ppid pgrp session
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session, then reap ``proc``."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_or_fail(proc: subprocess.Popen, timeout: float, what: str) -> int:
    """``proc``'s exit code; the test fails if it runs longer than ``timeout`` (a hang)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} exceeded {timeout}s")


def run_in_own_group(cmd, env, cwd, log_path: Path, timeout: float) -> int:
    """Run ``cmd`` in a new session with output to ``log_path``; fail the test on timeout."""
    proc = start_in_own_session(cmd, env, cwd, log_path)
    try:
        return wait_or_fail(proc, timeout, f"{cmd[2] if len(cmd) > 2 else cmd[0]} (log: {log_path})")
    finally:
        kill_session(proc)


def step_metrics(log: str) -> dict[int, dict[str, str]]:
    """``{step: {metric: value}}`` from verl's console logger lines ``step:N - key:value - ...``."""
    steps = {}
    for match in re.finditer(r"step:(\d+) - (.*)", log):
        pairs = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
        steps.setdefault(int(match.group(1)), {}).update(dict(pairs))
    return steps

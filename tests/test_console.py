"""The training console: what a person sees, what the run's log keeps, and each phase's own memory peak."""

import signal
import subprocess
import sys
import time

from opd.console import console_lines
from opd.devices import phase_meter

NOISE = [
    "2026-12-03 06:00:00,000 INFO worker.py:1821 -- Started a local Ray instance.",
    "(TaskRunner pid=812) {'actor_rollout_ref': {'actor': {'checkpoint': {'async_save': False,",
    "(WorkerDict pid=901) WARNING: target_num_threads 8 should not exceed total_cpus 2",
    "(AgentLoopWorker pid=933) No model-specific Continuous Token builder for llama, using the default",
    "[repeated 191x across cluster] (Ray deduplicates logs by default.)",
    "Loading weights: 100%|##########| 272/272 [00:00<00:00, 423.16it/s]",
    "[transformers] The attention mask is not set and cannot be inferred from input",
    "[validate_config] All configuration checks passed successfully!",
    "(TaskRunner pid=812) step:1 - actor/pg_loss:0.1 - timing_s/step:40.1",
]
OWN = [
    "[train_opd.sh] student /models/s",
    "(TaskRunner pid=812) [opd] step 0/8 | val_rkl 0.1270",
    "\x1b[36m(TaskRunner pid=812, ip=10.0.0.2)\x1b[0m [opd] step 1/8 | loss 0.0123 | eta 4m40s",
    "[opd] held-out summary (first -> last evaluation):",
]


def test_the_console_keeps_the_projects_lines_without_rays_prefix():
    lines = [NOISE[0], OWN[0], NOISE[1], NOISE[2], OWN[1], *NOISE[3:], OWN[2], OWN[3]]
    assert list(console_lines(lines)) == [
        "[train_opd.sh] student /models/s",
        "[opd] step 0/8 | val_rkl 0.1270",
        "[opd] step 1/8 | loss 0.0123 | eta 4m40s",
        "[opd] held-out summary (first -> last evaluation):",
    ]


def test_the_projects_warnings_appear_once_each():
    warning = "[opd] warning: 2 sample(s) have a NaN or infinite reward"
    lines = [f"(WorkerDict pid={pid}) {warning}" for pid in (1, 2, 3)] + ["[opd] warning: another"]
    assert list(console_lines(lines)) == [warning, "[opd] warning: another"]


def test_everything_from_the_first_error_on_is_shown():
    tail = [
        "(TaskRunner pid=812) Traceback (most recent call last):",
        '(TaskRunner pid=812)   File "worker.py", line 3, in update',
        NOISE[2],
        "(TaskRunner pid=812) RuntimeError: CUDA out of memory",
    ]
    assert list(console_lines([*NOISE, OWN[1], *tail])) == ["[opd] step 0/8 | val_rkl 0.1270", *tail]
    for first in ("opd: configuration error: opd.topk", "ray.exceptions.ActorDiedError: The actor died"):
        assert list(console_lines([NOISE[0], first, NOISE[1]])) == [first, NOISE[1]]


def test_verbose_shows_every_line():
    assert list(console_lines([*NOISE, *OWN], show_all=True)) == [*NOISE, *OWN]


def _filter(tmp_path, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "opd.console", "--log", str(tmp_path / "run" / "train.log"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_the_log_file_keeps_every_line_and_the_filter_outlives_ctrl_c(tmp_path):
    proc = _filter(tmp_path)
    proc.stdin.write("\n".join([NOISE[0], OWN[1]]) + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "[opd] step 0/8 | val_rkl 0.1270\n"
    # Ctrl-C reaches the trainer and the filter alike; the trainer's last words must still get through
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.stdin.write("[opd] SIGINT: stopping after the current step\nstill logged\n")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out == "[opd] SIGINT: stopping after the current step\n"
    logged = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert logged == [NOISE[0], OWN[1], "[opd] SIGINT: stopping after the current step", "still logged"]


def test_undecodable_bytes_do_not_stop_the_filter(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "opd.console", "--log", str(tmp_path / "train.log"), "--all"],
        input=b"caf\xe9\n[opd] step 1/2\n",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == ["caf\ufffd", "[opd] step 1/2"]


def test_each_phase_reports_its_own_peak_not_the_processs_lifetime_peak():
    with phase_meter() as big:
        block = bytearray(400 * 2**20)
        block[:: 4096] = b"\x01" * len(block[:: 4096])  # touch every page: resident
        del block
    with phase_meter() as small:
        sum(range(1000))
    assert big["peak_gb"] - small["peak_gb"] > 0.3, (big, small)


def test_a_recurring_warning_is_logged_once_per_process(caplog):
    import logging

    from opd.console import warn

    logger = logging.getLogger("opd.test_console")
    with caplog.at_level(logging.WARNING, logger="opd.test_console"):
        for count in (4, 6, 7):
            warn(logger, "truncated %d sample(s) of a test", count)
        warn(logger, "another test condition")
    assert caplog.messages == [
        "[opd] warning: truncated 4 sample(s) of a test",
        "[opd] warning: another test condition",
    ]

"""Faults lose nothing and nothing hangs: crash-safe checkpoints, metrics and stop requests of OPD runs.

The fast tests check ``opd.checkpoints`` on plain folders. The slow one drives one run folder through a
SIGKILL in the middle of a checkpoint save, a SIGKILL of the training worker at a random point of a
step, a SIGTERM to the driver, and a final resume, and checks what each start resumed from, that the
restored weights and optimizer state are the saved ones, and that ``metrics.jsonl`` has each step once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from subprocess_runs import kill_session, session_pids, start_in_own_session, wait_or_fail
from test_checkpoint import check_step_continues
from tiny_models import build_tiny_model

from data.arithmetic import write_arithmetic_dataset
from opd import checkpoints
from opd.checkpoints import MARKER, UnmarkedCheckpointError

E2E_TIMEOUT_S = 420


def _fake_step(run_dir, step: int, complete: bool = True):
    """A step folder shaped like verl's: actor shard, HF config, data-loader state."""
    folder = checkpoints.step_folder(str(run_dir), step)
    os.makedirs(os.path.join(folder, "actor", "huggingface"), exist_ok=True)
    with open(os.path.join(folder, "actor", "model_world_size_1_rank_0.pt"), "wb") as handle:
        handle.write(os.urandom(64))
    with open(os.path.join(folder, "actor", "huggingface", "config.json"), "w") as handle:
        handle.write("{}")
    with open(os.path.join(folder, "data.pt"), "wb") as handle:
        handle.write(b"state")
    if complete:
        checkpoints.mark_complete(folder, step)
    return folder


def test_tracker_write_is_atomic_and_a_broken_tracker_reads_as_none(tmp_path, monkeypatch):
    checkpoints.write_tracker(str(tmp_path), 3)
    assert checkpoints.read_tracker(str(tmp_path)) == 3

    def crash(*args):
        raise OSError("killed before the rename")

    # a write that dies before its rename leaves the old tracker whole and no temporary file behind
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        checkpoints.write_tracker(str(tmp_path), 4)
    monkeypatch.undo()
    assert checkpoints.read_tracker(str(tmp_path)) == 3
    assert os.listdir(tmp_path) == [checkpoints.TRACKER]
    # what verl's in-place rewrite leaves after a kill between truncate and write
    for broken in ("", "1", "x"):
        (tmp_path / checkpoints.TRACKER).write_text(broken)
        assert checkpoints.read_tracker(str(tmp_path)) == (1 if broken == "1" else None)


def test_a_step_is_complete_only_with_its_marker_and_every_listed_file(tmp_path):
    folder = _fake_step(tmp_path, 1, complete=False)
    assert not checkpoints.is_complete(folder)
    checkpoints.mark_complete(folder, 1)
    assert checkpoints.is_complete(folder)
    listed = json.loads(open(os.path.join(folder, MARKER)).read())["files"]
    assert set(listed) == {"actor/model_world_size_1_rank_0.pt", "actor/huggingface/config.json", "data.pt"}

    shard = os.path.join(folder, "actor", "model_world_size_1_rank_0.pt")
    with open(shard, "r+b") as handle:
        handle.truncate(10)  # a shard cut short
    assert not checkpoints.is_complete(folder)
    os.remove(shard)
    assert not checkpoints.is_complete(folder)
    (tmp_path / "global_step_1" / MARKER).write_text("{not json")
    assert not checkpoints.is_complete(folder)

    os.remove(os.path.join(_fake_step(tmp_path, 2, complete=False), "data.pt"))
    with pytest.raises(RuntimeError, match="data.pt"):
        checkpoints.mark_complete(checkpoints.step_folder(str(tmp_path), 2), 2)


def test_resume_takes_the_tracked_complete_step_else_the_newest_complete_one(tmp_path, capsys):
    run = str(tmp_path)
    assert checkpoints.resume_step(run) is None
    _fake_step(tmp_path, 1)
    _fake_step(tmp_path, 2)
    _fake_step(tmp_path, 3, complete=False)  # killed during its save
    checkpoints.write_tracker(run, 2)
    assert checkpoints.resume_step(run) == 2
    checkpoints.write_tracker(run, 3)  # a tracker ahead of the files (verl's order with async saves)
    assert checkpoints.resume_step(run) == 2
    assert "tracker names step 3, which is not a complete checkpoint" in capsys.readouterr().out
    (tmp_path / checkpoints.TRACKER).write_text("")  # emptied by a kill
    assert checkpoints.resume_step(run) == 2


def test_a_checkpoint_without_marker_is_not_resumed_silently(tmp_path):
    _fake_step(tmp_path, 5, complete=False)
    checkpoints.write_tracker(str(tmp_path), 5)
    with pytest.raises(UnmarkedCheckpointError, match="resume_from_path"):
        checkpoints.resume_step(str(tmp_path))


def test_retention_keeps_the_newest_complete_steps_and_never_touches_partial_ones(tmp_path):
    for step in (1, 2, 3):
        _fake_step(tmp_path, step)
    _fake_step(tmp_path, 4, complete=False)
    assert checkpoints.remove_old_checkpoints(str(tmp_path), None) == []
    assert checkpoints.remove_old_checkpoints(str(tmp_path), 2) == [1]
    assert checkpoints.step_folders(str(tmp_path)) == [2, 3, 4]
    assert checkpoints.complete_steps(str(tmp_path)) == [2, 3]


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": step, "x": step}) for step in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "x"')  # last line cut by a kill
    kept = checkpoints.truncate_metrics(path, 2)
    assert [r["step"] for r in kept] == [0, 1, 2]
    assert checkpoints.read_metrics(path) == kept
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert checkpoints.truncate_metrics(str(tmp_path / "absent.jsonl"), 2) == []


def test_the_kill_switch_fires_only_at_its_step(tmp_path):
    code = "import sys; from opd.checkpoints import kill_if_requested; kill_if_requested(int(sys.argv[1]))"
    env = {**os.environ, checkpoints.KILL_AT_SAVE_VAR: "2"}
    assert subprocess.run([sys.executable, "-c", code, "1"], env=env).returncode == 0
    assert subprocess.run([sys.executable, "-c", code, "2"], env=env).returncode == -signal.SIGKILL


# the driver waits on the trainer (a Ray actor), which stops with an error once it sees the request
STOPPING_DRIVER = """
import signal, sys, time
from opd import checkpoints
class Runner:
    def remote(self):
        print("ready", flush=True)
with checkpoints.stop_on_signals(sys.argv[1]) as stoppable:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does: replaced before the runner starts
    stoppable(Runner()).remote()
    while not checkpoints.stop_requested(sys.argv[1]):
        time.sleep(0.05)
    raise RuntimeError("trainer stopped on request")
"""


def test_a_signal_to_the_driver_requests_a_stop_and_exits_non_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPING_DRIVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: stopping after the current step" in out and "stopped on SIGTERM" in out
    assert not os.path.exists(checkpoints.stop_request_path(str(tmp_path)))


# ------------------------------------------------------------------------------------ end to end

# The OPD entry point with the driver's signal handling around verl's run_ppo.
DRIVER = """
import verl.trainer.main_ppo as main_ppo
from opd import checkpoints, main_opd
run_ppo = main_ppo.run_ppo
def stoppable_run_ppo(config, task_runner_class):
    with checkpoints.stop_on_signals(config.trainer.default_local_dir) as stoppable:
        run_ppo(config, task_runner_class=stoppable(task_runner_class))
main_ppo.run_ppo = stoppable_run_ppo
main_opd.main()
"""


def _command(root, run_dir, total_steps: int, save_freq: int) -> list[str]:
    arf = "actor_rollout_ref"
    return [
        sys.executable,
        "-c",
        DRIVER,
        f"data.train_files={root / 'data' / 'train.parquet'}",
        f"data.val_files={root / 'data' / 'val.parquet'}",
        "data.train_batch_size=4",
        "data.val_batch_size=8",
        "data.max_prompt_length=160",
        "data.max_response_length=16",
        f"{arf}.model.path={root / 'student'}",
        f"opd.teacher_model_path={root / 'teacher'}",
        f"{arf}.actor.ppo_mini_batch_size=4",
        f"{arf}.actor.ppo_micro_batch_size_per_gpu=2",
        f"{arf}.rollout.log_prob_micro_batch_size_per_gpu=2",
        f"{arf}.rollout.n=2",
        f"{arf}.actor.optim.lr=1e-3",
        f"trainer.total_training_steps={total_steps}",
        f"trainer.save_freq={save_freq}",
        "trainer.test_freq=-1",
        f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[console]",
        "opd.val_num_prompts=2",
        "opd.val_max_new_tokens=4",
        "opd.plot=false",
    ]


def _recorded_steps(run_dir) -> list[int]:
    return [record["step"] for record in checkpoints.read_metrics(str(run_dir / checkpoints.METRICS))]


def _wait_for_step(proc, run_dir, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while step not in _recorded_steps(run_dir):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.2)


def _training_worker(sid: int) -> int:
    """PID of the Ray actor process holding the student (verl's fused worker class)."""
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and ("WorkerDict" in title or "ActorRolloutWorker" in title):
            return pid
    raise AssertionError("no training worker process found")


def _resumed_from(log: str) -> int:
    marker = "resuming from "
    line = next(line for line in log.splitlines() if marker in line)
    return int(line.split(marker)[1].split(checkpoints.STEP_PREFIX)[1].split()[0])


@pytest.fixture(scope="module")
def opd_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_faults")
    build_tiny_model(root / "student", num_layers=2, seed=0)
    build_tiny_model(root / "teacher", num_layers=3, seed=1)
    write_arithmetic_dataset(root / "data", train_size=16, val_size=8, seed=0)
    return root


class _Phase:
    """One start of the run: its process, log and timing."""

    def __init__(self, name, root, run_dir, env, tmp_path, total_steps=4, save_freq=1):
        self.log_path = tmp_path / f"{name}.log"
        self.name = name
        self.start = time.monotonic()
        self.proc = start_in_own_session(
            _command(root, run_dir, total_steps, save_freq), env, tmp_path, self.log_path
        )

    def finish(self) -> tuple[int, str]:
        try:
            rc = wait_or_fail(self.proc, E2E_TIMEOUT_S, f"{self.name} (log: {self.log_path})")
            print(f"{self.name}: rc {rc}, {time.monotonic() - self.start:.1f}s wall")
            # Ray's processes follow the driver out: nothing is left running once it has exited
            deadline = time.monotonic() + 30
            while session_pids(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert session_pids(self.proc.pid) == [], "processes left behind by the run"
        finally:
            kill_session(self.proc)
        return rc, self.log_path.read_text(errors="replace")


@pytest.mark.slow
def test_kills_and_signals_lose_no_step(opd_inputs, isolated_run_env, tmp_path):
    root, run_dir = opd_inputs, tmp_path / "run"
    run = str(run_dir)

    # 1. SIGKILL of the trainer in the middle of saving step 2: weights written, no marker, no tracker
    kill_env = {**isolated_run_env, checkpoints.KILL_AT_SAVE_VAR: "2"}
    phase = _Phase("killed-in-save", root, run_dir, kill_env, tmp_path)
    rc, log = phase.finish()
    assert rc != 0 and "ActorDiedError" in log, log[-4000:]
    assert checkpoints.read_tracker(run) == 1 and checkpoints.complete_steps(run) == [1]
    assert (run_dir / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").exists()

    # 2. resumed from step 1; the training worker is SIGKILLed at a random point of the step after 2
    phase = _Phase("worker-killed", root, run_dir, isolated_run_env, tmp_path)
    _wait_for_step(phase.proc, run_dir, 2, E2E_TIMEOUT_S)
    delay = random.Random(os.getpid()).uniform(0.0, 3.0)
    print(f"killing the training worker {delay:.2f}s after step 2 was recorded")
    time.sleep(delay)
    os.kill(_training_worker(phase.proc.pid), signal.SIGKILL)
    rc, log = phase.finish()
    assert _resumed_from(log) == 1
    assert rc != 0 and "ActorDiedError" in log, log[-4000:]
    restored = checkpoints.read_tracker(run)
    assert restored in (2, 3) and restored in checkpoints.complete_steps(run)

    # 3. SIGTERM to the driver once a step is recorded: that step is checkpointed (no periodic saves
    # here), the driver exits with 128 + SIGTERM
    phase = _Phase("sigterm", root, run_dir, isolated_run_env, tmp_path, save_freq=100)
    _wait_for_step(phase.proc, run_dir, restored + 1, E2E_TIMEOUT_S)
    phase.proc.send_signal(signal.SIGTERM)
    rc, log = phase.finish()
    assert _resumed_from(log) == restored
    assert rc == 128 + signal.SIGTERM, log[-4000:]
    last = max(_recorded_steps(run_dir))
    assert checkpoints.read_tracker(run) == last and last in checkpoints.complete_steps(run)

    # 4. the last start finishes the run: one step past the tracked one at least
    phase = _Phase("final", root, run_dir, isolated_run_env, tmp_path, total_steps=5)
    rc, log = phase.finish()
    assert rc == 0, log[-4000:]
    assert _resumed_from(log) == last
    assert _recorded_steps(run_dir) == [0, 1, 2, 3, 4, 5]
    assert "val-opd/reverse_kl" in checkpoints.read_metrics(str(run_dir / checkpoints.METRICS))[0]
    actor = run_dir / "global_step_{}" / "actor"
    check_step_continues(str(actor).format(last), str(actor).format(last + 1), root / "student")
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]

    # verl's model merger still reads the checkpoint
    merged = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
         "--local_dir", str(run_dir / "global_step_5" / "actor"), "--target_dir", str(merged)],
        env=isolated_run_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(name.endswith(".safetensors") for name in os.listdir(merged))

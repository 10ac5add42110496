"""Crash-safe checkpoints, metrics log and stop requests of the OPD trainer.

verl 0.9.1's V1 trainer saves the actor, then ``data.pt`` (plain ``torch.save``), then rewrites
``latest_checkpointed_iteration.txt`` in place; its checkpoint manager may delete the previous step's
actor before the new step is whole. A ``kill -9`` at the wrong moment leaves an empty tracker, a tracker
naming a half-written step, or no loadable step at all. The OPD trainer keeps verl's layout
(``global_step_N/actor`` for verl's model merger, ``global_step_N/data.pt``, the tracker) and adds:

* a completion marker, ``global_step_N/checkpoint_complete.json``, written last, listing every file of
  the step and its size; a step folder without a valid marker is never resumed from;
* atomic writes (temporary file, fsync, ``os.replace``) for ``data.pt``, the marker, the tracker and
  ``metrics.jsonl``;
* retention done here, after the new step is committed, marker first, so a kill while deleting leaves
  an unmarked folder rather than a marked broken one.

Resume takes the tracked step when it is complete, else the newest complete one, and says which.

Fault injection for tests only: with ``OPD_TEST_KILL_AT_SAVE=N`` the process saving step N kills itself
with SIGKILL after the weights and ``data.pt`` are written and before the marker and the tracker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "checkpoint_complete.json"
STEP_PREFIX = "global_step_"
METRICS = "metrics.jsonl"
STOP_REQUEST = "stop_requested"
KILL_AT_SAVE_VAR = "OPD_TEST_KILL_AT_SAVE"
# what a step must hold besides the marker: the data-loader state and the actor's files
REQUIRED = ("data.pt", "actor/")


class StopRequested(RuntimeError):
    """The run stopped between steps because the driver received SIGINT or SIGTERM."""


class UnmarkedCheckpointError(RuntimeError):
    """The tracker names a step without a completion marker and no marked step exists."""


def log(message: str) -> None:
    """One ``[opd]`` line, flushed at once so it survives a kill right after."""
    print(f"[opd] {message}", flush=True)


def step_folder(run_dir: str, step: int) -> str:
    """``<run_dir>/global_step_<step>``."""
    return os.path.join(run_dir, f"{STEP_PREFIX}{step}")


def _fsync_dir(path: str) -> None:
    # a rename is durable only once the directory holding it is synced
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: str):
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # named by the process, not by mkstemp, so the file gets the usual permissions
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old content or the new, never a part."""
    with _atomic_target(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that never leaves a truncated file at ``path``."""
    import torch

    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def _files_of(folder: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` except the marker."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != MARKER:
                files[relative] = os.path.getsize(path)
    return files


def _fsync_files(folder: str, files) -> None:
    for relative in files:
        with open(os.path.join(folder, relative), "rb") as handle:
            os.fsync(handle.fileno())
    for root, _, _ in os.walk(folder):
        _fsync_dir(root)


def mark_complete(folder: str, step: int) -> None:
    """Sync every file of ``folder`` to disk, then write the marker listing them with their sizes."""
    files = _files_of(folder)
    missing = [r for r in REQUIRED if not any(f == r or f.startswith(r) for f in files)]
    if missing:
        raise RuntimeError(f"checkpoint {folder} lacks {missing}: not marking it complete")
    _fsync_files(folder, files)
    atomic_write_text(os.path.join(folder, MARKER), json.dumps({"step": step, "files": files}, indent=1))


def is_complete(folder: str) -> bool:
    """Whether ``folder`` has a readable marker and every file it lists, at the listed size."""
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            files = json.load(handle)["files"]
        return bool(files) and all(
            os.path.getsize(os.path.join(folder, relative)) == size for relative, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_tracker(run_dir: str) -> int | None:
    """The step named by the tracker; None when it is missing, empty or not a number."""
    try:
        with open(os.path.join(run_dir, TRACKER)) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def write_tracker(run_dir: str, step: int) -> None:
    """Point the tracker at ``step`` atomically."""
    atomic_write_text(os.path.join(run_dir, TRACKER), str(step))


def step_folders(run_dir: str) -> list[int]:
    """Steps that have a ``global_step_N`` folder, ascending."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    steps = (name[len(STEP_PREFIX) :] for name in names if name.startswith(STEP_PREFIX))
    return sorted(int(step) for step in steps if step.isdigit())


def complete_steps(run_dir: str) -> list[int]:
    """Steps whose folder is complete, ascending."""
    return [step for step in step_folders(run_dir) if is_complete(step_folder(run_dir, step))]


def resume_step(run_dir: str) -> int | None:
    """The step to resume from: the tracked one if complete, else the newest complete one; None: none.

    Raises :class:`UnmarkedCheckpointError` when the tracker names an existing step folder without a
    marker and no step has one: a checkpoint this code did not write, which it cannot vouch for.
    """
    tracked, complete = read_tracker(run_dir), complete_steps(run_dir)
    if tracked in complete:
        log(f"resuming from {step_folder(run_dir, tracked)} (tracked, complete)")
        return tracked
    if complete:
        log(
            f"tracker names step {tracked}, which is not a complete checkpoint; resuming from the "
            f"newest complete one, {step_folder(run_dir, complete[-1])}"
        )
        return complete[-1]
    if tracked is not None and os.path.isdir(step_folder(run_dir, tracked)):
        raise UnmarkedCheckpointError(
            f"{step_folder(run_dir, tracked)} has no completion marker ({MARKER}): it was written by an "
            "earlier version or another trainer. Resume it explicitly with trainer.resume_mode=resume_path "
            "trainer.resume_from_path=<that folder>, or use a new run folder."
        )
    partial = f" (partial steps: {step_folders(run_dir)})" if step_folders(run_dir) else ""
    log(f"no complete checkpoint in {run_dir}{partial}: training from scratch")
    return None


def discard(folder: str) -> None:
    """Remove a step folder, marker first: a kill while deleting leaves a folder resume ignores."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, MARKER))
    shutil.rmtree(folder, ignore_errors=True)


def remove_old_checkpoints(run_dir: str, keep: int | None) -> list[int]:
    """Delete complete steps beyond the newest ``keep`` (None or < 1: keep all); return those deleted."""
    complete = complete_steps(run_dir)
    doomed = complete[:-keep] if keep and keep > 0 else []
    for step in doomed:
        discard(step_folder(run_dir, step))
    return doomed


def kill_if_requested(step: int) -> None:
    """Tests only: SIGKILL this process while saving the step named by ``OPD_TEST_KILL_AT_SAVE``."""
    if os.environ.get(KILL_AT_SAVE_VAR) == str(step):
        log(f"{KILL_AT_SAVE_VAR}={step}: killing this process in the middle of the save")
        os.kill(os.getpid(), signal.SIGKILL)


def _parsed_lines(path: str) -> tuple[list[dict], int]:
    """The records of ``metrics.jsonl`` and its number of lines; a line cut by a kill is skipped."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return [], 0
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, len(lines)


def read_metrics(path: str) -> list[dict]:
    """Records of ``metrics.jsonl``; a last line cut by a kill is dropped."""
    return _parsed_lines(path)[0]


def write_metrics(path: str, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` atomically."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def truncate_metrics(path: str, last_step: int) -> list[dict]:
    """Keep the records of steps up to ``last_step`` (the restored one) and return them.

    Steps after it are trained again by the resumed run and would otherwise appear twice.
    """
    records, lines = _parsed_lines(path)
    kept = [record for record in records if record.get("step", 0) <= last_step]
    if len(kept) != lines:
        # also rewrites a cut last line, which the next append would otherwise extend
        log(f"{path}: dropped {lines - len(kept)} line(s) after the restored step {last_step}")
        write_metrics(path, kept)
    return kept


def stop_request_path(run_dir: str) -> str:
    """The file whose presence asks the trainer to stop after the current step."""
    return os.path.join(run_dir, STOP_REQUEST)


def stop_requested(run_dir: str) -> bool:
    """Whether the driver asked the trainer to stop."""
    return os.path.exists(stop_request_path(run_dir))


class _SignalStop:
    """Handlers that turn the first SIGINT/SIGTERM into a stop request and a second into an interrupt."""

    def __init__(self, run_dir: str, signals):
        self.request = stop_request_path(run_dir)
        self.signals = signals
        self.received: list[int] = []
        self.previous: dict = {}

    def install(self) -> None:
        for sig in self.signals:
            self.previous.setdefault(sig, signal.signal(sig, self._handle))

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            raise KeyboardInterrupt(f"second signal {name}: stopping now")
        self.received.append(signum)
        atomic_write_text(self.request, name)
        log(f"{name}: stopping after the current step and its checkpoint (send it again to stop at once)")

    def runner(self, actor_class):
        return _InstallingActorClass(actor_class, self.install)


class _InstallingActorClass:
    """A Ray actor class whose ``remote`` installs the stop handlers first.

    ``ray.init`` replaces the process's SIGTERM handler, and verl's ``run_ppo`` calls it just before it
    creates the task runner from this class: the handlers installed here are the ones in force.
    """

    def __init__(self, actor_class, install):
        self.actor_class, self.install = actor_class, install

    def options(self, **kwargs):
        return _InstallingActorClass(self.actor_class.options(**kwargs), self.install)

    def remote(self, *args, **kwargs):
        self.install()
        return self.actor_class.remote(*args, **kwargs)


@contextlib.contextmanager
def stop_on_signals(run_dir: str, signals=(signal.SIGINT, signal.SIGTERM)):
    """Driver side: the first SIGINT/SIGTERM asks the trainer to checkpoint and stop; a second stops now.

    Yields a function that wraps the task runner's Ray actor class for ``run_ppo``. The trainer runs in
    that actor, so the request travels as a file in the run folder, which every process of the run can
    see. On leaving after a signal the process exits with 128 + its number; Ray's exit handler shuts
    Ray down.
    """
    stop = _SignalStop(os.path.abspath(os.path.expanduser(run_dir)), signals)
    with contextlib.suppress(FileNotFoundError):
        os.remove(stop.request)
    stop.install()
    try:
        yield stop.runner
    except BaseException:
        if not stop.received:
            raise
    finally:
        stop.restore()
        with contextlib.suppress(FileNotFoundError):
            os.remove(stop.request)
    if stop.received:
        log(f"stopped on {signal.Signals(stop.received[0]).name}")
        raise SystemExit(128 + stop.received[0])

"""Soak: many OPD steps on tiny models through Ray; host RSS of every process of the run, after warm-up.

A leak in the driver, the trainer (verl's task runner) or a worker shows as RSS that keeps rising
after the first steps. The run saves a checkpoint every ``--save-freq`` steps, so the checkpoint path
is soaked too. RSS is sampled when each new step appears in ``metrics.jsonl``; the report compares
each process's RSS at the end of warm-up with its RSS at the end (and its maximum after warm-up)::

    python benchmarks/soak.py --steps 200 --warmup 20 --work-dir /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from subprocess_runs import kill_session, session_pids, start_in_own_session  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

from common.cpu_backend import cpu_run_env, use_cpu_backend  # noqa: E402
from data.arithmetic import write_arithmetic_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps before the baseline sample")
    parser.add_argument("--save-freq", type=int, default=50)
    parser.add_argument("--limit", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    parser.add_argument("--work-dir", type=Path, default=None)
    return parser.parse_args(argv)


def command(root: Path, steps: int, save_freq: int) -> list[str]:
    arf = "actor_rollout_ref"
    return [
        sys.executable, "-m", "opd.main_opd",
        f"data.train_files={root / 'data' / 'train.parquet'}",
        f"data.val_files={root / 'data' / 'val.parquet'}",
        "data.train_batch_size=4", "data.val_batch_size=8",
        "data.max_prompt_length=160", "data.max_response_length=16",
        f"{arf}.model.path={root / 'student'}", f"opd.teacher_model_path={root / 'teacher'}",
        f"{arf}.actor.ppo_mini_batch_size=4", f"{arf}.actor.ppo_micro_batch_size_per_gpu=2",
        f"{arf}.rollout.log_prob_micro_batch_size_per_gpu=2", f"{arf}.rollout.n=2",
        f"{arf}.actor.optim.lr=1e-4",
        "trainer.total_epochs=100000", f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={save_freq}", "trainer.max_actor_ckpt_to_keep=2", "trainer.test_freq=-1",
        "trainer.val_before_train=false", f"trainer.default_local_dir={root / 'run'}",
        "trainer.logger=[console]", "opd.val_num_prompts=0", "opd.plot=false",
    ]  # fmt: skip


# Ray's own helpers and idle pool processes: not part of the training code
RAY_SERVICES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_rss(sid: int) -> dict[str, int]:
    """``{process title: RSS bytes}`` of the session's Python processes: driver and Ray actors."""
    rss = {}
    for pid in session_pids(sid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if pid == sid:
            name = "driver"
        elif not title.startswith("ray::") or title in RAY_SERVICES:
            continue
        else:
            # a busy actor's title names its method: one name per actor class
            name = f"{title.split('.')[0]} [{pid}]"
        rss[name] = pages * os.sysconf("SC_PAGE_SIZE")
    return rss


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def soak(args, root: Path, env: dict[str, str]) -> tuple[dict[int, dict[str, int]], float, int]:
    """Run the soak; RSS samples by step, the wall time and the exit code."""
    metrics = root / "run" / "metrics.jsonl"
    start = time.monotonic()
    proc = start_in_own_session(command(root, args.steps, args.save_freq), env, root, root / "soak.log")
    samples: dict[int, dict[str, int]] = {}
    try:
        while proc.poll() is None:
            step = last_step(metrics)
            if step and step not in samples:
                samples[step] = process_rss(proc.pid)
                print(f"step {step}: {sum(samples[step].values()) / 2**20:.0f} MiB in {len(samples[step])} "
                      f"processes, {time.monotonic() - start:.0f}s", flush=True)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        kill_session(proc)
    return samples, time.monotonic() - start, proc.returncode


def report(samples: dict[int, dict[str, int]], warmup: int, limit: float) -> bool:
    """Print RSS per process at warm-up, at the end and its peak after warm-up; True if within ``limit``."""
    steps = sorted(samples)
    base_step = min((s for s in steps if s >= warmup), default=steps[0])
    base, end = samples[base_step], samples[steps[-1]]
    print(f"\n| process | RSS at step {base_step} | RSS at step {steps[-1]} | max after warm-up | growth |")
    print("|---|---:|---:|---:|---:|")
    ok = True
    for name in sorted(base):
        if name not in end:
            continue
        peak = max(samples[s].get(name, 0) for s in steps if s >= base_step)
        growth = 100.0 * (end[name] - base[name]) / base[name]
        ok &= growth <= limit
        print(f"| {name} | {base[name] / 2**20:.0f} MiB | {end[name] / 2**20:.0f} MiB | "
              f"{peak / 2**20:.0f} MiB | {growth:+.1f} % |")
    total_base, total_end = sum(base.values()), sum(end[n] for n in base if n in end)
    total_growth = 100.0 * (total_end - total_base) / total_base
    print(f"| all | {total_base / 2**20:.0f} MiB | {total_end / 2**20:.0f} MiB | | {total_growth:+.1f} % |")
    print(f"\nwithin {limit:.0f} % for every process: {ok}")
    return ok


def main(argv=None) -> None:
    args = parse_args(argv)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="soak"))
    build_tiny_model(root / "student", num_layers=2, seed=0)
    build_tiny_model(root / "teacher", num_layers=3, seed=1)
    write_arithmetic_dataset(root / "data", train_size=64, val_size=8, seed=0)
    env = cpu_run_env() if use_cpu_backend() else dict(os.environ)
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="ray"), HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled")
    samples, wall, rc = soak(args, root, env)
    print(f"exit code {rc}; {max(samples, default=0)} steps in {wall:.0f}s wall (log: {root / 'soak.log'})")
    if samples:
        report(samples, args.warmup, args.limit)


if __name__ == "__main__":
    main()

"""Time and peak memory of the worker's two phases on a real model pair, one process, no Ray.

    python benchmarks/bench_worker_phases.py --student S --teacher T --samples 8 --response-len 256

Without --student/--teacher it uses the embedded SmolLM2 pair. Prints a markdown row per step
(teacher / student phase seconds and peak memory: device memory on GPU, process RSS on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

# the in-process worker harness lives with the tests, outside the product package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inprocess import compose_opd_config, make_worker, synthetic_rollout  # noqa: E402


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--student")
    parser.add_argument("--teacher")
    parser.add_argument("--samples", type=int, default=8, help="samples in the update (this rank)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    student, teacher = args.student, args.teacher
    if not (student and teacher):
        from common.embedded_models import ensure_embedded_models

        student, teacher = map(str, ensure_embedded_models())
    config = compose_opd_config(
        student,
        teacher,
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.samples}",
        "actor_rollout_ref.actor.fsdp_config.param_offload=true",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
        f"opd.chunk_size={args.chunk}",
    )
    worker = make_worker(config)
    vocab = worker.student.model_config.hf_config.vocab_size
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{datetime.date.today()} | {platform.machine()} | {device} | torch {torch.__version__}")
    print(f"student {student}\nteacher {teacher}")
    shape = f"prompt {args.prompt_len} + response {args.response_len}"
    print(f"{args.samples} samples x ({shape}), vocab {vocab}\n")
    print("| step | teacher s | student s | teacher peak GB | student peak GB | cache B/token | loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for step in range(args.steps):
        data = synthetic_rollout(
            args.samples,
            vocab=vocab,
            prompt_len=(args.prompt_len, args.prompt_len + 1),
            response_len=(args.response_len, args.response_len + 1),
            seed=step,
        )
        m = worker.update_actor(data)["metrics"]
        print(
            f"| {step} | {m['opd/timing/teacher_s']:.2f} | {m['opd/timing/student_s']:.2f} | "
            f"{m['opd/memory/teacher_peak_gb']:.2f} | {m['opd/memory/student_peak_gb']:.2f} | "
            f"{m['opd/cache_bytes_per_token']:.0f} | {m['opd/loss']:.4f} |"
        )


if __name__ == "__main__":
    main()

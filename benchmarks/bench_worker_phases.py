"""Time and peak memory of the worker's two phases on a real model pair, one process, no Ray.

    python benchmarks/bench_worker_phases.py --student S --teacher T --samples 8 --response-len 256

Without --student/--teacher it uses the embedded SmolLM2 pair; with --random-vocab it builds a random pair
of that vocabulary size instead (e.g. Qwen2.5's 151,936, no download). --override passes any hydra
override to the worker's config, so one command compares settings:

    python benchmarks/bench_worker_phases.py --random-vocab 151936 --response-len 4096 --samples 2 \
        --micro-batch 1 --override opd.fused_output_head=false --override opd.teacher_signal=full

Prints a markdown row per step (teacher / student phase seconds and each phase's own peak memory: device
memory on GPU, process resident memory on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

# the in-process worker harness lives with the tests, outside the product package
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
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
    parser.add_argument("--random-vocab", type=int, help="a random student/teacher pair of this vocabulary")
    parser.add_argument("--random-hidden", type=int, default=256, help="hidden size of the random pair")
    parser.add_argument("--random-layers", type=int, default=2, help="decoder layers of the random pair")
    parser.add_argument(
        "--random-shapes",
        nargs=2,
        metavar=("STUDENT_JSON", "TEACHER_JSON"),
        help="Hugging Face config.json files of real models (e.g. Qwen2.5-1.5B / 7B): random weights of "
        "exactly those shapes, saved in bf16 (overrides --random-vocab)",
    )
    parser.add_argument("--override", action="append", default=[], help="hydra override (repeatable)")
    return parser.parse_args()


def random_pair(args, root: Path) -> tuple[str, str]:
    """A random-initialised student and teacher (untied heads, Qwen2 layout) of the requested sizes."""
    from tiny_models import build_tiny_model

    sizes = dict(vocab_size=args.random_vocab, hidden=args.random_hidden, num_layers=args.random_layers)
    student = build_tiny_model(root / "student", seed=0, **sizes)
    teacher = build_tiny_model(root / "teacher", seed=1, **sizes)
    return str(student), str(teacher)


def real_shape_pair(config_files: list[str], root: Path) -> tuple[str, str]:
    """Random bf16 weights in the shapes of two real configs, with the tiny tokenizer (ids stay < 259)."""
    from tiny_models import build_tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folders = []
    for name, config_file in zip(("student", "teacher"), config_files, strict=True):
        folder = root / name
        config = AutoConfig.from_pretrained(config_file)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        build_tiny_tokenizer(folder)
        del model
        folders.append(str(folder))
    return folders[0], folders[1]


def main() -> None:
    args = parse_args()
    student, teacher = args.student, args.teacher
    if args.random_shapes:
        student, teacher = real_shape_pair(args.random_shapes, Path(tempfile.mkdtemp(prefix="opd-bench-")))
    elif args.random_vocab:
        student, teacher = random_pair(args, Path(tempfile.mkdtemp(prefix="opd-bench-")))
    elif not (student and teacher):
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
        *args.override,
    )
    worker = make_worker(config)
    vocab = worker.student.model_config.hf_config.vocab_size
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{datetime.date.today()} | {platform.machine()} | {device} | torch {torch.__version__}")
    print(f"student {student}\nteacher {teacher}\noverrides {' '.join(args.override) or '(none)'}")
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

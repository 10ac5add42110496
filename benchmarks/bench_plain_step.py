"""One OPD step of a real run, phase by phase, against a minimal plain-PyTorch OPD step on the same models.

    python benchmarks/bench_plain_step.py --run-dir RUN_DIR --data TRAIN_PARQUET

``RUN_DIR`` is the folder of a finished run of ``bash scripts/opd/train_opd.sh`` (its ``metrics.jsonl``
holds verl's and our timers per step). The plain step does the same work in one process with no Ray, no
FSDP and no verl: sample the batch from a bf16 copy of the student with ``generate``, copy the trained
weights into that copy, score the responses with the teacher, then the student's forward, full-vocabulary
reverse KL on response tokens, backward, clipping and AdamW, in the run's micro-batches. Defaults match
the embedded default run (8 prompts, 48 response tokens, micro-batches of 4, lr 5e-5, bf16 autocast).
Without ``--student/--teacher`` it uses the embedded SmolLM2 pair.

Prints one markdown table: each phase's median seconds per step in the run and in the plain step, and
their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PHASES = ("rollout", "weight sync", "teacher phase", "student phase", "other", "step")


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="folder with the run's metrics.jsonl")
    parser.add_argument("--data", type=Path, required=True, help="the run's train.parquet")
    parser.add_argument("--student")
    parser.add_argument("--teacher")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=4, help="plain steps; the first is warm-up")
    return parser.parse_args()


def run_phases(metrics_file: Path) -> dict[str, float]:
    """Median seconds per phase over the run's steps, the first (warm-up) and validation steps left out."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "timing_s/gen" in r and not any(k.startswith("val-") for k in r)][1:]
    if not steps:
        raise SystemExit(f"{metrics_file}: no training step after the first without validation")
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for row in steps:
        parts = {
            "rollout": row["timing_s/gen"],
            "weight sync": row.get("timing_s/update_weights", 0.0),
            "teacher phase": row["opd/timing/teacher_s"],
            "student phase": row["opd/timing/student_s"],
        }
        parts["other"] = row["timing_s/step"] - sum(parts.values())
        parts["step"] = row["timing_s/step"]
        for name, seconds in parts.items():
            phases[name].append(seconds)
    return {name: statistics.median(values) for name, values in phases.items()}


class PlainOPD:
    """The whole OPD step in plain PyTorch: the floor that the trainer's overhead is measured against."""

    def __init__(self, student: str, teacher: str, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
        load = dict(attn_implementation="sdpa")
        self.student = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, **load)
        self.sampler = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16, **load).eval()
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16, **load).eval()
        self.student.config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=args.lr, weight_decay=0.01)

    @torch.no_grad()
    def rollout(self, prompts: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sampled sequences, their attention mask and the (left-padded) prompt width."""
        encoded = self.tokenizer.apply_chat_template(
            prompts, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = self.sampler.generate(
            **encoded,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=self.args.response_len,
            pad_token_id=pad,
        )
        width = encoded["input_ids"].shape[1]
        response = out[:, width:]
        # everything after the first eos is padding, as in the trainer's response mask
        eos = torch.cumsum(response == self.tokenizer.eos_token_id, dim=1)
        after_eos = (eos - (response == self.tokenizer.eos_token_id).long()) > 0
        mask = torch.cat([encoded["attention_mask"], (~after_eos).long()], dim=1)
        return out, mask, width

    @staticmethod
    def _forward(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # left padding: positions count real tokens only, as in generate and in the trainer
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits

    @torch.no_grad()
    def sync_weights(self) -> None:
        for target, source in zip(self.sampler.parameters(), self.student.parameters(), strict=True):
            target.copy_(source)

    @torch.no_grad()
    def teacher_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, width: int) -> list[torch.Tensor]:
        chunks = []
        for rows in torch.split(torch.arange(ids.shape[0]), self.args.micro_batch):
            logits = self._forward(self.teacher, ids[rows], mask[rows])
            chunks.append(torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1))
        return chunks

    def student_update(self, ids, mask, width, teacher: list[torch.Tensor]) -> float:
        """Reverse KL on response tokens, token mean over the whole batch, one clipped AdamW step."""
        response_mask = mask[:, width:].float()
        denominator = response_mask.sum()
        total = 0.0
        micro_batches = torch.split(torch.arange(ids.shape[0]), self.args.micro_batch)
        for rows, teacher_lp in zip(micro_batches, teacher, strict=True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self._forward(self.student, ids[rows], mask[rows])
            student_lp = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1)
            per_token = (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
            loss = (per_token * response_mask[rows]).sum() / denominator
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def step(self, prompts: list[list[dict]]) -> tuple[dict[str, float], float]:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        ids, mask, width = self.rollout(prompts)
        seconds["rollout"] = time.perf_counter() - start
        teacher = self.teacher_logprobs(ids, mask, width)
        seconds["teacher phase"] = time.perf_counter() - start - seconds["rollout"]
        mark = time.perf_counter()
        loss = self.student_update(ids, mask, width, teacher)
        seconds["student phase"] = time.perf_counter() - mark
        mark = time.perf_counter()
        self.sync_weights()
        seconds["weight sync"] = time.perf_counter() - mark
        seconds["step"] = time.perf_counter() - start
        seconds["other"] = seconds["step"] - sum(seconds[p] for p in PHASES[:4])
        return seconds, loss


def plain_phases(args: argparse.Namespace) -> dict[str, float]:
    import pandas as pd

    student, teacher = args.student, args.teacher
    if not (student and teacher):
        from common.embedded_models import ensure_embedded_models

        student, teacher = map(str, ensure_embedded_models())
    rows = pd.read_parquet(args.data)["prompt"].tolist()
    plain = PlainOPD(student, teacher, args)
    measured: dict[str, list[float]] = {name: [] for name in PHASES}
    for step in range(args.steps):
        batch = rows[step * args.prompts : (step + 1) * args.prompts]
        seconds, loss = plain.step([list(messages) for messages in batch])
        print(f"plain step {step}: {seconds['step']:.2f} s, loss {loss:.4f}", file=sys.stderr)
        if step:
            for name in PHASES:
                measured[name].append(seconds[name])
    return {name: statistics.median(values) for name, values in measured.items()}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    run = run_phases(args.run_dir / "metrics.jsonl")
    plain = plain_phases(args)
    machine = f"{platform.machine()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    print(f"{datetime.date.today()} | {machine}")
    print(f"run {args.run_dir}\n")
    print("| phase | OPD run, s/step | plain PyTorch, s/step | ratio |")
    print("|---|---:|---:|---:|")
    for name in PHASES:
        ratio = run[name] / plain[name] if plain[name] > 1e-3 else float("inf")
        print(f"| {name} | {run[name]:.2f} | {plain[name]:.2f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()

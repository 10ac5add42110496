"""Host bytes per token of every teacher signal, and the loss's time with the 'hidden' vs the 'full' signal.

Bytes: each signal is built by the teacher phase's own host conversion from a few synthetic response tokens
at the given sizes (default: Qwen2.5-7B-Instruct as teacher, H = 3584, V_t = 152,064, and a Qwen2.5-1.5B
student head, V_s = 151,936) and measured with ``CachedSignal.num_bytes``;
bytes per token do not depend on the token count. The 'hidden' signal also keeps the teacher's output head
on the device for the student phase: ``V_t * H * 2`` bytes, once.

Time: forward + backward of the real objective call (``opd.objectives.distillation_objective``) on bf16
student logits ``[N, V]``, as the student forward returns them under bf16 autocast, against cached bf16
logits ('full') or cached bf16 hidden states and a bf16 head ('hidden'), median of ``--repeats``.

    python benchmarks/bench_teacher_signal.py
    python benchmarks/bench_teacher_signal.py --tokens 2048 --vocab 49152 --hidden 576 --chunk 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from opd.config import OPDConfig  # noqa: E402
from opd.objectives import MicroBatchTokens, ObjectiveContext, distillation_objective  # noqa: E402
from opd.objectives.teacher_signal import CachedSignal, SignalSpec  # noqa: E402
from opd.objectives.teacher_signal import signal_from_logits as _to_host_signal  # noqa: E402
from opd.objectives.teacher_signal import to_host as _to_host  # noqa: E402

SAMPLE_TOKENS = 4
RESPONSES, RESPONSE_TOKENS = 8, 8192  # one update of one rank, as in README's sizing example


def signal_bytes_per_token(hidden: int, vocab: int, student_vocab: int, topk: int) -> dict[str, float]:
    """Host bytes per token of each signal, from ``SAMPLE_TOKENS`` random teacher outputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(SAMPLE_TOKENS, vocab, generator=g)
    ids = torch.randint(0, student_vocab, (SAMPLE_TOKENS,), generator=g)
    signals = {"hidden": CachedSignal(hidden=_to_host(torch.randn(SAMPLE_TOKENS, hidden, generator=g)))}
    for kind in ("full", "topk", "sampled"):
        spec = SignalSpec(kind=kind, topk=topk, vocab_limit=student_vocab)
        signals[kind] = _to_host_signal(logits, ids, spec)
    return {kind: signal.num_bytes() / signal.num_tokens() for kind, signal in signals.items()}


def loss_seconds(
    signal: CachedSignal, student: torch.Tensor, chunk: int, repeats: int
) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of one reverse-KL forward + backward over ``student`` [N, V] bf16.

    CPU time is reported too because on a shared machine wall time also counts other processes' load.
    """
    n = student.shape[0]
    ids = torch.zeros(n, dtype=torch.long)
    ctx = ObjectiveContext(
        OPDConfig(teacher_model_path="unused", chunk_size=chunk), step=1, rollout_temperature=1.0
    )
    wall, cpu = [], []
    for _ in range(repeats):
        x = student.detach().requires_grad_(True)
        tokens = MicroBatchTokens(x, ids, torch.ones(n), [n], None, chunk, 1.0)
        started, started_cpu = time.perf_counter(), time.process_time()
        distillation_objective(tokens, signal, torch.full((n,), 1 / n), ctx).loss.backward()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-hidden", type=int, default=3584)
    parser.add_argument("--teacher-vocab", type=int, default=152064)
    parser.add_argument("--student-vocab", type=int, default=151936)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    per_token = signal_bytes_per_token(args.teacher_hidden, args.teacher_vocab, args.student_vocab, args.topk)
    head_gb = args.teacher_vocab * args.teacher_hidden * 2 / 1e9
    print(
        f"H = {args.teacher_hidden}, V_t = {args.teacher_vocab}, V_s = {args.student_vocab}, k = {args.topk}"
    )
    print(f"| signal | bytes / token | {RESPONSES} x {RESPONSE_TOKENS // 1024}k tokens | device |")
    print("|---|---:|---:|---|")
    for kind, value in per_token.items():
        device = f"head {head_gb:.2f} GB" if kind == "hidden" else "-"
        total = value * RESPONSES * RESPONSE_TOKENS
        print(f"| {kind} | {value:,.0f} | {total / 1e6:,.1f} MB | {device} |")

    g = torch.Generator().manual_seed(1)
    student = (torch.randn(args.tokens, args.vocab, generator=g) * 3).bfloat16()
    hidden = torch.randn(args.tokens, args.hidden, generator=g).bfloat16()
    head = (torch.randn(args.vocab, args.hidden, generator=g) * 3 / args.hidden**0.5).bfloat16()
    signals = {
        "full": CachedSignal(logits=torch.nn.functional.linear(hidden, head)),
        "hidden": CachedSignal(hidden=hidden, head=head),
    }
    print(
        f"\nN = {args.tokens}, V = {args.vocab}, H = {args.hidden}, chunk = {args.chunk}, threads = "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print("| signal | reverse_kl fwd + bwd, wall (s) | CPU time (s) |")
    print("|---|---:|---:|")
    for kind, signal in signals.items():
        wall, cpu = loss_seconds(signal, student, args.chunk, args.repeats)
        print(f"| {kind} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()

"""Peak memory and time of the student's output head fused into the chunked loss vs the model's own head.

Unfused: ``logits = hidden @ W^T`` under bf16 autocast (the model's head), then the chunked loss on those
``[N, V]`` logits. Fused: the chunked loss computes each chunk's logits itself (``OutputHead``), so neither
the logits nor their gradient ever exist. Both run reverse KL (or ``--loss``) against bf16 teacher logits
on the device, forward + backward, gradients to the hidden states and the fp32 head.

"Peak extra" is the peak allocated during forward + backward beyond the inputs and the gradients of the
hidden states and ``W``; ``[chunk, V]`` is one fp32 chunk buffer, for scale.

    python benchmarks/bench_fused_head.py --device cuda --vocab 151936 --hidden 1536 --tokens 2048,8192
    python benchmarks/bench_fused_head.py --device cpu --vocab 32000 --hidden 256 --tokens 256,1024

On cuda the numbers come from ``torch.cuda.max_memory_allocated``; on cpu from ``memtrack.StorageTracker``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import median_seconds, peak_bytes  # noqa: E402

from opd.objectives.divergences import chunked_distill_loss  # noqa: E402
from opd.objectives.engine import OutputHead  # noqa: E402

MIB = 2**20


def make_step(fused: bool, hidden, weight, teacher, ids, weights, args):
    """A closure: one forward + backward through the fused or the model's own head; returns the loss."""

    def step() -> torch.Tensor:
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        if fused:
            student = OutputHead(h, w, torch.bfloat16)
        else:
            with torch.autocast(args.device, dtype=torch.bfloat16):
                student = torch.nn.functional.linear(h, w)
        loss, _ = chunked_distill_loss(
            student, teacher, ids, weights, loss_type=args.loss, chunk_size=args.chunk
        )
        loss.backward()
        return loss.detach()

    return step


def bench_row(n: int, args) -> list[str]:
    """Table rows (model's head, fused) at ``n`` tokens."""
    device = args.device
    hidden = torch.randn(n, args.hidden, device=device).bfloat16()
    weight = torch.randn(args.vocab, args.hidden, device=device) * 3 / args.hidden**0.5
    teacher = (torch.randn(n, args.vocab, device=device) * 3).bfloat16()
    ids = torch.randint(0, args.vocab, (n,), device=device)
    weights = torch.full((n,), 1.0 / n, device=device)
    gradients = hidden.numel() * hidden.element_size() + weight.numel() * 4
    rows = []
    for fused in (False, True):
        step = make_step(fused, hidden, weight, teacher, ids, weights, args)
        extra = peak_bytes(step, device) - gradients  # also the warm-up run
        seconds = median_seconds(step, device, args.repeats)
        name = "fused" if fused else "model head"
        rows.append(f"| {n} | {name} | {extra / MIB:.1f} | {seconds * 1e3:.1f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--tokens", default="2048,8192", help="comma-separated token counts N")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--loss", default="reverse_kl")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    block = args.chunk * args.vocab * 4 / MIB
    print(
        f"device={args.device} V={args.vocab} H={args.hidden} chunk={args.chunk}: [chunk, V] {block:.0f} MiB"
    )
    print("| tokens N | head | peak extra (MiB) | fwd+bwd (ms) |")
    print("|---:|---|---:|---:|")
    for n in (int(t) for t in args.tokens.split(",")):
        for row in bench_row(n, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()

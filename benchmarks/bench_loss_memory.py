"""Peak extra memory and time of the chunked distillation loss vs a naive unchunked loss.

``--loss sampled_rkl_pg`` measures the sampled-token policy-gradient path instead (student log-prob and
entropy of the sampled token, a differentiable log-prob at the rollout temperature, ratio-times-advantage
loss); its naive baseline takes a whole-batch fp32 log-softmax.

"Peak extra" is the peak memory allocated during forward + backward minus the gradient of the student logits
(``N * V_s * elem_size``), which any implementation must materialise. Inputs exist before measurement starts.
The chunked divergence computes that gradient in forward, next to its chunk buffers; the naive loss and the
policy-gradient path create it in backward, after the forward's peak, so where the gradient is larger than
their forward's buffers their figure shows the backward's extra (tests/test_loss_memory.py bounds each pass).

    python benchmarks/bench_loss_memory.py --device cuda --vocab 151936 --tokens 1024,4096,8192 --chunk 1024
    python benchmarks/bench_loss_memory.py --device cpu --vocab 32000 --tokens 256,1024,2048 --chunk 256

On cuda the numbers come from ``torch.cuda.max_memory_allocated``; on cpu from ``memtrack.StorageTracker``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import median_seconds, peak_bytes  # noqa: E402

from opd.objectives.divergences import chunked_distill_loss, get_loss  # noqa: E402
from opd.objectives.policy_gradient import PG_OBJECTIVES, chunked_token_logp, sampled_token_stats  # noqa: E402

MIB = 2**20
# Full-size fp32 [N, V] buffers a naive loss keeps alive at its peak (measured ~5-6 for reverse_kl, more for
# jsd), with headroom; used only to skip runs that would clearly not fit.
NAIVE_FP32_BUFFERS = 10


def naive_distill_loss(
    student_logits, teacher_logits, token_weights, *, loss_type="reverse_kl", temperature=1.0, beta=0.5
) -> torch.Tensor:
    """Unchunked baseline: whole-batch fp32 log-softmax and plain autograd; [N, V] x2, [N] -> scalar.

    Uses the same registered divergence as the chunked loss, so only the memory strategy differs.
    """
    vocab = min(student_logits.shape[1], teacher_logits.shape[1])
    s_logp = torch.log_softmax(student_logits[:, :vocab].float() / temperature, dim=-1)
    t_logp = torch.log_softmax(teacher_logits[:, :vocab].float() / temperature, dim=-1)
    fn = get_loss(loss_type)
    params = {"beta": beta} if "beta" in inspect.signature(fn).parameters else {}
    div = fn(s_logp, t_logp, **params)
    return (token_weights.float() * div).sum()


@dataclass
class Inputs:
    """One benchmark problem: student [N, V] (requires grad), teacher [N, V], ids [N], weights [N]."""

    student: torch.Tensor
    teacher: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def grad_bytes(self) -> int:
        return self.student.numel() * self.student.element_size()


def make_inputs(n: int, vocab: int, dtype: torch.dtype, device: str) -> Inputs:
    """Random logits with a realistic spread and uniform token-mean weights."""
    # Generated directly in the target dtype: an fp32 staging copy would double the footprint.
    student = torch.randn(n, vocab, device=device, dtype=dtype).mul_(3).requires_grad_(True)
    teacher = torch.randn(n, vocab, device=device, dtype=dtype).mul_(3)
    ids = torch.randint(0, vocab, (n,), device=device)
    weights = torch.full((n,), 1.0 / n, device=device)
    return Inputs(student, teacher, ids, weights)


def policy_gradient_loss(x: Inputs, chunk: int | None, temperature: float) -> torch.Tensor:
    """Sampled-token policy gradient at ratio 1 against a teacher log-prob; chunked, or naive for None."""
    vocab = x.student.shape[1]
    with torch.no_grad():
        teacher_logp = torch.log_softmax(x.teacher.float(), -1).gather(-1, x.ids[:, None]).squeeze(-1)
    if chunk is None:
        logp_all = torch.log_softmax(x.student.float() / temperature, -1)
        logp = logp_all.gather(-1, x.ids[:, None]).squeeze(-1)
        student_logp = logp.detach()
    else:
        student_logp, _ = sampled_token_stats(
            x.student, x.ids, temperature=1.0, chunk_size=chunk, vocab=vocab
        )
        logp = chunked_token_logp(x.student, x.ids, temperature=temperature, chunk_size=chunk, vocab=vocab)
    advantages = teacher_logp - student_logp
    return -(x.weights * advantages * torch.exp(logp - logp.detach())).sum()


def _step_fn(impl: str, x: Inputs, args) -> Callable[[], torch.Tensor]:
    """A closure running one forward + backward of ``impl`` ("chunked" or "naive") and returning the loss."""

    def step() -> torch.Tensor:
        x.student.grad = None
        if args.loss in PG_OBJECTIVES:
            loss = policy_gradient_loss(x, args.chunk if impl == "chunked" else None, args.temperature)
        elif impl == "chunked":
            loss, _ = chunked_distill_loss(
                x.student,
                x.teacher,
                x.ids,
                x.weights,
                loss_type=args.loss,
                chunk_size=args.chunk,
                temperature=args.temperature,
            )
        else:
            loss = naive_distill_loss(
                x.student, x.teacher, x.weights, loss_type=args.loss, temperature=args.temperature
            )
        loss.backward()
        return loss.detach()

    return step


def peak_extra_bytes(step: Callable[[], torch.Tensor], x: Inputs, device: str) -> int:
    """Peak bytes allocated by one ``step()`` beyond the student-logits gradient."""
    x.student.grad = None
    peak = peak_bytes(step, device)
    x.student.grad = None
    return peak - x.grad_bytes


def free_bytes(device: str) -> int:
    """Memory that new allocations can still use on ``device``."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bench_row(n: int, impl: str, args) -> str:
    """One markdown table row for ``impl`` at ``n`` tokens (or a skip note)."""
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    inputs_bytes = 3 * n * args.vocab * elem  # student, teacher, student grad
    need = inputs_bytes + (NAIVE_FP32_BUFFERS * n * args.vocab * 4 if impl == "naive" else 0)
    prefix = f"| {n} | {args.vocab} | {args.chunk if impl == 'chunked' else '-'} | {impl} "
    if need > 0.9 * free_bytes(args.device):
        return prefix + f"| skipped (needs ~{need / MIB:.0f} MiB) | - | - |"
    x = make_inputs(n, args.vocab, dtype, args.device)
    step = _step_fn(impl, x, args)
    extra = peak_extra_bytes(step, x, args.device)  # also the warm-up run
    seconds = median_seconds(step, args.device, args.repeats)
    return prefix + f"| {extra / MIB:.1f} | {x.grad_bytes / MIB:.1f} | {seconds * 1e3:.1f} |"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", default="1024,4096,8192", help="comma-separated token counts N")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--loss", default="reverse_kl")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    impls = ["chunked"] if args.skip_naive else ["chunked", "naive"]
    print(f"device={args.device} loss={args.loss} dtype={args.dtype} temperature={args.temperature}\n")
    print("| tokens N | vocab V | chunk | impl | peak extra (MiB) | student grad (MiB) | fwd+bwd (ms) |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for n in (int(t) for t in args.tokens.split(",")):
        for impl in impls:
            print(bench_row(n, impl, args), flush=True)


if __name__ == "__main__":
    main()

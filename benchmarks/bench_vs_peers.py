"""Peak memory and time of our fused distillation loss vs a naive loss, Liger Kernel and TRL, same inputs.

Every method gets the same random problem (same seed): student hidden states ``[N, H]`` and output head
``W_s [V, H]``, teacher hidden states ``[N, H_t]`` and head ``W_t [V, H_t]``, all in ``--dtype``; the loss is
the token mean of one divergence per token, forward + backward, gradients to the student's hidden states and
head only. Methods:

- ``ours``: ``chunked_distill_loss`` with the student as ``OutputHead(hidden, W_s, dtype)`` and the teacher as
  ``HiddenTimesHead(teacher_hidden, W_t)``: both sides' logits are rebuilt ``--chunk-size`` rows at a time.
- ``naive``: ``logits = hidden @ W^T`` for both models in ``--dtype``, then ``bench_loss_memory``'s
  ``naive_distill_loss`` (whole-batch fp32 ``log_softmax``, the divergence in plain torch, autograd).
- ``liger``: Liger Kernel 0.8.5, ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (the
  ``LigerFusedLinearDistillationBase`` chunked fused-linear loss, ``--chunk-size`` rows per chunk), with
  ``weight_hard_loss=0, weight_soft_loss=1`` (no cross-entropy term) and no ignored tokens. Liger's forward
  computes the gradients too (``torch.func.grad_and_value`` per chunk). Its ``compiled`` flag (a
  ``torch.compile`` of the chunk step) follows ``--liger-compiled``: by default on for cuda (the library's
  default) and off for cpu, where the compiled kernels' buffers would bypass the dispatch-mode memory tracker.
- ``trl``: TRL 1.16.0, ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction.apply(student_hidden,
  student_weight, None, teacher_hidden, teacher_weight, None, beta, temperature)``, which returns the
  per-token divergence and entropy (the function ``DistillationTrainer._chunked_divergence_loss`` calls);
  the loss is the token mean of the divergence. Its tiles are the module's own
  ``TOKEN_CHUNK_SIZE x VOCAB_CHUNK_SIZE`` (4096 x 32768), not ``--chunk-size``; Triton kernels on cuda, its
  torch fallback on cpu.

Divergence mapping, read from the peers' sources (p student, q teacher, both at temperature 1):

- Liger (``LigerFusedLinearJSDFunction.distillation_loss_fn``): ``beta == 0`` computes
  ``F.kl_div(log p, log q, log_target=True)`` = KL(q || p), our ``forward_kl``; ``beta == 1`` computes
  ``F.kl_div(log q, log p, log_target=True)`` = KL(p || q), our ``reverse_kl``; ``0 < beta < 1`` is
  ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = (1 - beta) p + beta q``, our ``jsd`` with the same
  ``beta``.
- TRL (``ChunkedDivergenceFunction``): the same convention, ``beta = 0`` forward KL, ``beta = 1`` reverse KL,
  in between the same generalized JSD.

So ``forward_kl`` runs the peers at beta 0, ``reverse_kl`` at beta 1 and ``jsd`` at ``--beta`` (ours too).

Value check: before anything is measured, each method runs once on the configuration (its warm-up) and its
loss and gradients (hidden states and head) are compared with ours: the relative loss difference within
``--rtol`` and the larger relative L2 gradient difference within ``--grad-rtol``. In float32 the defaults
are tight (1e-4, 1e-3; every method agrees with a float64 evaluation to ~1e-7 and ~5e-6). In bfloat16 the
methods round differently (ours and the naive loss round the logits to bf16 as the model's head would, TRL
projects into fp32, Liger also takes its log-softmax and divergence in bf16, which puts its JSD gradient
~9e-2 from ours), so the bf16 check is loose (2e-2, 0.2) and the math is checked separately: every method
also runs in float32 on the first ``--check-rows`` tokens (inputs cast up, heads whole) with the tight
tolerances. A disagreement is printed, kept in the records (``agrees: false``) and makes the script exit
with status 1.

Peak extra memory: the peak allocated during one forward + backward beyond the inputs, minus the gradients
of the student's hidden states and head (``(N + V) * H`` elements of ``--dtype``, which every method
returns). On cuda from ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; on
cpu from ``memtrack.StorageTracker``, as the other benchmarks here. Time: the median wall time of
``--repeats`` forward + backward passes after the warm-up. On cpu the naive loss is reported as OOM without
running when it would need more than 90% of the free memory (``bench_loss_memory``'s estimate); on cuda it
runs and an out-of-memory error is reported as OOM.

The peers are optional and not project dependencies; install them into a folder of their own and pass it:

    pip install --no-deps --target PEERS liger-kernel==0.8.5 trl==1.16.0
    OMP_NUM_THREADS=1 python benchmarks/bench_vs_peers.py --peers-path PEERS --device cpu --dtype bfloat16 \\
        --n 256,512 --vocab 4096 --hidden 128 --repeats 1 --out vs_peers.jsonl --plot vs_peers.png
    python benchmarks/bench_vs_peers.py --peers-path PEERS --device cuda --dtype bfloat16 \\
        --n 1024,4096,16384 --vocab 49152,151936 --hidden 576,2048 --zip \\
        --out vs_peers.jsonl --plot vs_peers.png

A peer that cannot be imported is reported once, with the reason, and its rows read ``unavailable``.
``--from-jsonl FILE`` prints the table and draws the plot of an earlier run without measuring anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import sys
import textwrap
import types
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loss_memory import NAIVE_FP32_BUFFERS, free_bytes, naive_distill_loss  # noqa: E402
from measure import median_seconds, peak_bytes  # noqa: E402

from opd.objectives.divergences import chunked_distill_loss  # noqa: E402
from opd.objectives.engine import OutputHead  # noqa: E402
from opd.objectives.teacher_signal import HiddenTimesHead  # noqa: E402

MIB = 2**20
METHODS = ("ours", "naive", "liger", "trl")
LOSSES = ("jsd", "forward_kl", "reverse_kl")
PEER_VERSIONS = {"liger": ("liger-kernel", "0.8.5"), "trl": ("trl", "1.16.0")}
# Peers' beta for the two KLs (see the module docstring); jsd uses --beta.
PEER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}
# Default tolerances of the value check: (loss rtol, gradient rtol) per dtype.
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 0.2)}
# Logits spread: the heads are scaled so that logits have about this standard deviation.
LOGIT_STD = 3.0

LossFn = Callable[..., torch.Tensor]
"""(inputs, student hidden, student head, loss name, args) -> scalar loss, differentiable in both."""


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One problem, shared by every method."""

    hidden: torch.Tensor
    """[N, H] student final hidden states."""
    weight: torch.Tensor
    """[V, H] student output head."""
    teacher_hidden: torch.Tensor
    """[N, H_t] teacher final hidden states."""
    teacher_weight: torch.Tensor
    """[V, H_t] teacher output head."""
    ids: torch.Tensor
    """[N] sampled token ids (our loss's stats only)."""
    weights: torch.Tensor
    """[N] float32 token weights, 1 / N each: every method's loss is the token mean."""

    def float32_rows(self, rows: int) -> Inputs:
        """The first ``rows`` tokens in float32 (the heads whole), weighted 1 / rows: the math check."""
        rows = min(rows, self.hidden.shape[0])
        return Inputs(
            hidden=self.hidden[:rows].float(),
            weight=self.weight.float(),
            teacher_hidden=self.teacher_hidden[:rows].float(),
            teacher_weight=self.teacher_weight.float(),
            ids=self.ids[:rows],
            weights=torch.full((rows,), 1.0 / rows, device=self.weights.device),
        )

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients every method returns: hidden states and head, in their dtype."""
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def make_inputs(
    n: int, vocab: int, hidden: int, teacher_hidden: int, dtype, device: str, seed: int
) -> Inputs:
    """Random inputs from ``seed``: hidden states ~ N(0, 1), heads scaled to logits of std ``LOGIT_STD``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    return Inputs(
        hidden=randn(n, hidden),
        weight=randn(vocab, hidden, scale=LOGIT_STD / hidden**0.5),
        teacher_hidden=randn(n, teacher_hidden),
        teacher_weight=randn(vocab, teacher_hidden, scale=LOGIT_STD / teacher_hidden**0.5),
        ids=torch.randint(0, vocab, (n,), generator=gen, device=device),
        weights=torch.full((n,), 1.0 / n, device=device),
    )


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------


def peer_beta(loss: str, beta: float) -> float:
    return PEER_BETA.get(loss, beta)


def ours_loss(x: Inputs, h, w, loss: str, args) -> torch.Tensor:
    student = OutputHead(h, w, x.hidden.dtype)
    teacher = HiddenTimesHead(x.teacher_hidden, x.teacher_weight)
    value, _ = chunked_distill_loss(
        student, teacher, x.ids, x.weights, chunk_size=args.chunk_size, loss_type=loss, beta=args.beta
    )
    return value


def naive_loss(x: Inputs, h, w, loss: str, args) -> torch.Tensor:
    student_logits = F.linear(h, w)
    with torch.no_grad():
        teacher_logits = F.linear(x.teacher_hidden, x.teacher_weight)
    return naive_distill_loss(student_logits, teacher_logits, x.weights, loss_type=loss, beta=args.beta)


def liger_method(loss_class) -> LossFn:
    def liger_loss(x: Inputs, h, w, loss: str, args) -> torch.Tensor:
        module = loss_class(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=peer_beta(loss, args.beta),
            temperature=1.0,
            compiled=args.liger_compiled,
            chunk_size=args.chunk_size,
        )
        return module(h, w, x.teacher_hidden, x.teacher_weight, x.ids)

    return liger_loss


def trl_method(function) -> LossFn:
    def trl_loss(x: Inputs, h, w, loss: str, args) -> torch.Tensor:
        beta = peer_beta(loss, args.beta)
        divergence, _entropy = function.apply(h, w, None, x.teacher_hidden, x.teacher_weight, None, beta, 1.0)
        return (divergence * x.weights).sum()

    return trl_loss


def make_step(fn: LossFn, x: Inputs, loss: str, args):
    """One forward + backward of ``fn``; returns the loss and the gradients of the hidden states and head."""

    def step():
        h = x.hidden.detach().requires_grad_(True)
        w = x.weight.detach().requires_grad_(True)
        value = fn(x, h, w, loss, args)
        value.backward()
        return value.detach(), h.grad, w.grad

    return step


# ----------------------------------------------------------------------------------------------------
# Loading the peers
# ----------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """One line on why ``exc`` happened; file paths shortened to their last part."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"missing module {exc.name!r}"
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return re.sub(r"(?:/[^/\s()'\"]+)+/([^/\s()'\"]+)", r"\1", text)[:200]


def _load_from_files(package: str, modules: list[str], stubs: dict[str, dict]) -> list[types.ModuleType]:
    """Import ``package.<module>`` for each of ``modules`` without running the package's ``__init__`` files.

    Empty packages stand in for the real ones (their submodule search path is the real folder); ``stubs``
    are modules given as ``{name: attributes}``, for imports the measured code does not need.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)
    root = Path(next(iter(spec.submodule_search_locations)))
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    for dotted in {package} | {f"{package}.{p}" for m in modules for p in _parents(m)}:
        stub = types.ModuleType(dotted)
        stub.__path__ = [str(root.joinpath(*dotted.split(".")[1:]))]
        sys.modules[dotted] = stub
    for name, attributes in stubs.items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    return [importlib.import_module(f"{package}.{m}") for m in modules]


def _parents(module: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _version_note(method: str) -> str:
    dist, wanted = PEER_VERSIONS[method]
    try:
        found = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (version unknown)"
    return f"{dist} {found}" + ("" if found == wanted else f" (benchmark written for {wanted})")


def load_liger() -> tuple[LossFn | None, str]:
    """Liger's JSD loss, or None and why not. Falls back to its two chunked-loss files when the package
    import fails (its ``__init__`` files import the rest of Liger, e.g. Triton kernels): those two files
    need torch alone."""
    try:
        module = importlib.import_module("liger_kernel.chunked_loss.jsd_loss")
        how = "imported"
    except Exception as exc:
        if importlib.util.find_spec("liger_kernel") is None:
            return None, f"not importable ({_reason(exc)})"
        try:
            _, module = _load_from_files(
                "liger_kernel", ["chunked_loss.fused_linear_distillation", "chunked_loss.jsd_loss"], {}
            )
        except Exception as inner:
            return None, f"not importable ({_reason(exc)}; from its files: {_reason(inner)})"
        how = f"loaded from its files (package import failed: {_reason(exc)})"
    return liger_method(module.LigerFusedLinearJSDLoss), f"{_version_note('liger')}, {how}"


def load_trl() -> tuple[LossFn | None, str]:
    """TRL's ``ChunkedDivergenceFunction``, or None and why not. Falls back to its two kernel files when the
    package import fails, e.g. for a missing dependency of ``trl.trainer.utils`` (datasets, accelerate, ...):
    the only name the kernel takes from there, ``maybe_gather_lm_head_ctx``, gathers DeepSpeed ZeRO-3 weights
    and is a null context otherwise, which the stand-in returns."""
    try:
        module = importlib.import_module("trl.kernels.chunked_divergence")
        how = "imported"
    except Exception as exc:
        if importlib.util.find_spec("trl") is None:
            return None, f"not importable ({_reason(exc)})"
        stubs = {"trl.trainer.utils": {"maybe_gather_lm_head_ctx": lambda *params: nullcontext()}}
        try:
            _, module = _load_from_files(
                "trl", ["kernels.chunked_logprob", "kernels.chunked_divergence"], stubs
            )
        except Exception as inner:
            return None, f"not importable ({_reason(exc)}; from its files: {_reason(inner)})"
        how = f"loaded from its kernel files (package import failed: {_reason(exc)})"
    return trl_method(module.ChunkedDivergenceFunction), f"{_version_note('trl')}, {how}"


def load_methods(names: list[str]) -> dict[str, tuple[LossFn | None, str]]:
    """name -> (loss function or None, note); the note says how a peer was loaded or why it was not."""
    loaders = {
        "ours": lambda: (ours_loss, "chunked_distill_loss, fused OutputHead + HiddenTimesHead"),
        "naive": lambda: (naive_loss, "full [N, V] logits, fp32 log_softmax, autograd"),
        "liger": load_liger,
        "trl": load_trl,
    }
    methods = {}
    for name in names:
        fn, note = loaders[name]()
        if fn is None and name in PEER_VERSIONS:
            dist, version = PEER_VERSIONS[name]
            note += f"; pip install --no-deps --target DIR {dist}=={version}, then pass --peers-path DIR"
        methods[name] = (fn, note)
    return methods


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory")
    )


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def rel_l2(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||a - ref|| / ||ref||, in fp32; inf when one of them is missing."""
    if a is None or ref is None:
        return float("inf")
    ref32 = ref.float()
    return ((a.float() - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()


def naive_would_oom(n: int, vocab: int, dtype, device: str) -> str | None:
    """On cpu, why the naive loss is not run (it would need most of the free memory), else None."""
    if device == "cuda":
        return None
    elem = torch.empty((), dtype=dtype).element_size()
    need = 2 * n * vocab * elem + NAIVE_FP32_BUFFERS * n * vocab * 4
    free = free_bytes(device)
    if need > 0.9 * free:
        return f"not run: needs ~{need / MIB:.0f} MiB, {free / MIB:.0f} MiB free"
    return None


def environment(device: str) -> dict[str, str]:
    """Machine, date and versions for the header line and the records."""
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                machine = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        machine += f", {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    return {
        "machine": machine,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }


def configurations(args) -> list[tuple[int, int]]:
    """(V, H) pairs: every combination, or paired in order with ``--zip``."""
    vocabs, hiddens = _ints(args.vocab), _ints(args.hidden)
    if args.zip:
        if len(vocabs) != len(hiddens):
            raise SystemExit(f"--zip needs as many --vocab as --hidden values, got {vocabs} and {hiddens}")
        return list(zip(vocabs, hiddens, strict=True))
    return list(itertools.product(vocabs, hiddens))


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def run_checks(x: Inputs, loss: str, methods, args, skip: dict[str, str]) -> dict[str, dict]:
    """Run every available method once on ``x`` and compare it with ours (the first method).

    -> name -> ``{"loss_value", "rel_diff", "grad_rel_diff"}`` (relative loss difference and the larger
    relative L2 difference of the two gradients), or ``{"status": "OOM", "note"}``; ``skip``: name -> why
    that method is reported as OOM without running.
    """
    results: dict[str, dict] = {}
    reference = None
    for name, (fn, _) in methods.items():
        if fn is None:
            continue
        if name in skip:
            results[name] = {"status": "OOM", "note": skip[name]}
            continue
        try:
            value, grad_h, grad_w = make_step(fn, x, loss, args)()
        except Exception as exc:
            if not is_oom(exc):
                raise
            results[name] = {"status": "OOM", "note": _reason(exc)}
            free_memory(args.device)
            continue
        value = value.item()
        if name == "ours":
            reference = (value, grad_h, grad_w)
        result = {"loss_value": value, "rel_diff": None, "grad_rel_diff": None}
        if reference is not None:
            ref_value, ref_h, ref_w = reference
            result["rel_diff"] = abs(value - ref_value) / max(abs(ref_value), 1e-30)
            result["grad_rel_diff"] = max(rel_l2(grad_h, ref_h), rel_l2(grad_w, ref_w))
        results[name] = result
        del grad_h, grad_w
    del reference
    free_memory(args.device)
    return results


def _passes(result: dict | None, rtol: float, grad_rtol: float) -> bool | None:
    if result is None or result.get("rel_diff") is None:
        return None
    return bool(result["rel_diff"] <= rtol and result["grad_rel_diff"] <= grad_rtol)


def bench_problem(x: Inputs, loss: str, methods, base: dict, args, out) -> list[dict]:
    """Check and measure every method on one problem and loss; -> records (also appended to ``out``)."""
    device = args.device
    records = {name: dict(base, method=name, loss=loss) for name in methods}
    # 1. the math check in fp32 on the first rows (only for a narrower dtype: in fp32 step 2 is that check)
    math = {}
    if x.hidden.dtype != torch.float32:
        math = run_checks(x.float32_rows(args.check_rows), loss, methods, args, skip={})
    # 2. the check in the measured dtype on the whole problem, which is also every method's warm-up
    skip = {}
    if "naive" in methods:
        reason = naive_would_oom(base["N"], base["V"], x.hidden.dtype, device)
        skip = {"naive": reason} if reason else {}
    checks = run_checks(x, loss, methods, args, skip)
    math_tolerance = TOLERANCES["float32"]
    for name, (fn, note) in methods.items():
        result = checks.get(name, {})
        record = records[name]
        record.update(status=result.get("status", "ok" if fn is not None else "unavailable"))
        record.update(note=result.get("note", note), peak_extra_bytes=None, seconds=None)
        record.update(
            loss_value=result.get("loss_value"),
            rel_diff=result.get("rel_diff"),
            grad_rel_diff=result.get("grad_rel_diff"),
            math_check_rows=min(args.check_rows, base["N"]) if math else None,
            math_rel_diff=math.get(name, {}).get("rel_diff"),
            math_grad_rel_diff=math.get(name, {}).get("grad_rel_diff"),
        )
        verdicts = [_passes(result, args.rtol, args.grad_rtol)]
        if math:
            verdicts.append(_passes(math.get(name), *math_tolerance))
        record["agrees"] = None if None in verdicts else all(verdicts)
    print(check_line(base, loss, records.values(), args, bool(math)), flush=True)
    # 3. memory and time
    for name, (fn, _) in methods.items():
        record = records[name]
        if record["status"] == "ok":
            step = make_step(fn, x, loss, args)
            try:
                record["peak_extra_bytes"] = peak_bytes(step, device) - x.grad_bytes
                record["seconds"] = median_seconds(step, device, args.repeats)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                record.update(status="OOM", note=_reason(exc), peak_extra_bytes=None, seconds=None)
            del step
            free_memory(device)
        print("  " + progress_line(record), flush=True)
        if out is not None:
            out.write(json.dumps(record) + "\n")
            out.flush()
    return list(records.values())


def check_line(base: dict, loss: str, records, args, math: bool) -> str:
    checked = [r for r in records if r["loss_value"] is not None]
    parts = []
    for r in checked:
        diff = ""
        if r["method"] != "ours" and r["rel_diff"] is not None:
            diff = f" (rel {r['rel_diff']:.1e}, grad {r['grad_rel_diff']:.1e}"
            if r["math_rel_diff"] is not None:
                diff += f"; fp32 rel {r['math_rel_diff']:.1e}, grad {r['math_grad_rel_diff']:.1e}"
            diff += ")"
        parts.append(f"{r['method']} {r['loss_value']:.6g}{diff}")
    tolerance = f"{args.dtype} loss rtol {args.rtol:g}, grad rtol {args.grad_rtol:g}"
    if math:
        rtol, grad_rtol = TOLERANCES["float32"]
        rows = min(args.check_rows, base["N"])
        tolerance += f"; fp32 on the first {rows} rows: loss rtol {rtol:g}, grad rtol {grad_rtol:g}"
    bad = [r["method"] for r in checked if r["agrees"] is False]
    unchecked = [r["method"] for r in records if r["status"] == "ok" and r["agrees"] is None]
    if bad:
        verdict = f"MISMATCH: {', '.join(bad)} differ from ours ({tolerance})"
    else:
        agreeing = sum(r["agrees"] is True for r in checked)
        verdict = f"{agreeing} methods agree ({tolerance})"
    if unchecked:
        verdict += f"; not checked: {', '.join(unchecked)}"
    where = f"[{loss} N={base['N']} V={base['V']} H={base['H']}]"
    return f"{where} value check: {'; '.join(parts)} -> {verdict}"


def progress_line(r: dict) -> str:
    if r["status"] == "unavailable":
        return f"{r['method']}: unavailable"
    if r["status"] != "ok":
        return f"{r['method']}: {r['status']} ({r['note']})"
    return f"{r['method']}: {r['peak_extra_bytes'] / MIB:.1f} MiB peak extra, {r['seconds'] * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------------------------
# Output: table and plot
# ----------------------------------------------------------------------------------------------------


def _order(r: dict):
    method = METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS)
    loss = LOSSES.index(r["loss"]) if r["loss"] in LOSSES else len(LOSSES)
    return (r["V"], r["H"], loss, r["loss"], r["N"], method)


def markdown_table(records: list[dict]) -> str:
    rows = [
        "| loss | V | H | N | method | status | peak extra (MiB) | fwd+bwd (ms) | loss value "
        "| rel. diff vs ours | grad rel. diff | check |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(records, key=_order):
        ok = r["status"] == "ok"
        mib = f"{r['peak_extra_bytes'] / MIB:.1f}" if ok else "-"
        ms = f"{r['seconds'] * 1e3:.1f}" if ok else "-"
        value = f"{r['loss_value']:.6g}" if r.get("loss_value") is not None else "-"
        rel = f"{r['rel_diff']:.1e}" if r.get("rel_diff") is not None else "-"
        grad = f"{r['grad_rel_diff']:.1e}" if r.get("grad_rel_diff") is not None else "-"
        check = {True: "agrees", False: "MISMATCH", None: "-"}[r.get("agrees")]
        rows.append(
            f"| {r['loss']} | {r['V']} | {r['H']} | {r['N']} | {r['method']} | {r['status']} | {mib} | {ms} "
            f"| {value} | {rel} | {grad} | {check} |"
        )
    return "\n".join(rows)


def header_line(records: list[dict]) -> str:
    r = records[0]
    return (
        f"machine: {r['machine']} | date: {r['date']} | torch {r['torch']} | device {r['device']} | "
        f"dtype {r['dtype']} | chunk {r['chunk_size']} | beta (jsd) {r['beta']}"
    )


def summary_line(records: list[dict]) -> str:
    checked = [r for r in records if r.get("agrees") is not None]
    bad = sorted(
        {f"{r['method']} ({r['loss']} N={r['N']} V={r['V']} H={r['H']})" for r in checked if not r["agrees"]}
    )
    if bad:
        return f"value check: MISMATCH for {len(bad)} of {len(checked)}: " + "; ".join(bad)
    fp32 = (
        " and in float32 on their first rows"
        if any(r.get("math_rel_diff") is not None for r in checked)
        else ""
    )
    return (
        f"value check: all {len(checked)} runs agree with ours before timing (loss and gradients, in "
        f"{records[0]['dtype']} within its tolerance{fp32})"
    )


def plot(records: list[dict], path: str) -> None:
    """Peak extra memory vs N, one line per method, log-log; a panel per loss (rows) and (V, H) (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in records)]
    losses += sorted({r["loss"] for r in records} - set(losses))
    shapes = sorted({(r["V"], r["H"]) for r in records})
    fig, axes = plt.subplots(
        len(losses),
        len(shapes),
        figsize=(5 * len(shapes), 3.8 * len(losses) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for (i, loss), (j, (vocab, hidden)) in itertools.product(enumerate(losses), enumerate(shapes)):
        ax = axes[i][j]
        panel = [r for r in records if r["loss"] == loss and (r["V"], r["H"]) == (vocab, hidden)]
        if not panel:  # a loss measured at fewer shapes than another
            ax.set_visible(False)
            continue
        missing = []
        for method in sorted({r["method"] for r in panel}, key=lambda m: (METHODS + (m,)).index(m)):
            rows = sorted((r for r in panel if r["method"] == method), key=lambda r: r["N"])
            points = [(r["N"], r["peak_extra_bytes"] / MIB) for r in rows if r["status"] == "ok"]
            points = [(n, mib) for n, mib in points if mib > 0]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
            for status in sorted({r["status"] for r in rows} - {"ok"}):
                sizes = ", ".join(str(r["N"]) for r in rows if r["status"] == status)
                missing.append(f"{method}: {status}" + ("" if status == "unavailable" else f" at N={sizes}"))
        ax.set_xscale("log", base=2)
        sizes = sorted({r["N"] for r in panel})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title(f"{loss}, V={vocab}, H={hidden}")
        ax.grid(True, which="both", alpha=0.3)
        for text in missing:  # no points: listed in the legend, where they cannot cover a line
            ax.plot([], [], " ", label=text)
        ax.legend(fontsize="small")
    r = records[0]
    title = (
        f"peak extra memory, forward + backward; {r['device']} ({r['machine']}), {r['dtype']}, "
        f"chunk {r['chunk_size']}, torch {r['torch']}, {r['date']}"
    )
    fig.suptitle(textwrap.fill(title, width=70 * len(shapes)), fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: list[dict], plot_path: str | None) -> None:
    if not records:
        print("no records")
        return
    print()
    print(header_line(records))
    print()
    print(markdown_table(records))
    print()
    print(summary_line(records))
    if plot_path:
        plot(records, plot_path)
        print(f"plot written to {plot_path}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument(
        "--losses", default=",".join(LOSSES), help="comma-separated: jsd,forward_kl,reverse_kl"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; ours always runs")
    parser.add_argument("--n", default="1024,4096,16384", help="comma-separated token counts N")
    parser.add_argument("--vocab", default="49152,151936", help="comma-separated vocabulary sizes V")
    parser.add_argument("--hidden", default="576,2048", help="comma-separated student hidden sizes H")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="teacher H_t (default: H)")
    parser.add_argument("--zip", action="store_true", help="pair --vocab and --hidden in order")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk (ours and Liger)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=None, help="loss check tolerance (default per dtype)")
    parser.add_argument("--grad-rtol", type=float, default=None, help="gradient check tolerance")
    parser.add_argument(
        "--check-rows", type=int, default=256, help="tokens of the fp32 math check (non-fp32 dtypes)"
    )
    parser.add_argument(
        "--liger-compiled",
        choices=["auto", "on", "off"],
        default="auto",
        help="Liger's torch.compile of its chunk step; auto: on for cuda, off for cpu",
    )
    parser.add_argument("--peers-path", default=None, help="folder with liger_kernel and trl (sys.path[0])")
    parser.add_argument("--out", default=None, help="JSONL file, one line per measurement")
    parser.add_argument("--plot", default=None, help="PNG: peak memory vs N per loss and (V, H)")
    parser.add_argument("--from-jsonl", default=None, help="report an earlier run's JSONL, measure nothing")
    args = parser.parse_args(argv)
    default_rtol, default_grad_rtol = TOLERANCES[args.dtype]
    args.rtol = default_rtol if args.rtol is None else args.rtol
    args.grad_rtol = default_grad_rtol if args.grad_rtol is None else args.grad_rtol
    args.liger_compiled = {"on": True, "off": False, "auto": args.device == "cuda"}[args.liger_compiled]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_jsonl:
        with open(args.from_jsonl) as f:
            records = [json.loads(line) for line in f if line.strip()]
        report(records, args.plot)
        return 0 if all(r.get("agrees") is not False for r in records) else 1
    if args.peers_path:
        sys.path.insert(0, str(Path(args.peers_path).resolve()))
    losses = [loss.strip() for loss in args.losses.split(",") if loss.strip()]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise SystemExit(f"unknown losses {unknown}; choose from {', '.join(LOSSES)}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(names) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(set(names) - set(METHODS))}; choose from {METHODS}")
    names = ["ours"] + [m for m in METHODS[1:] if m in names]  # ours is the reference of the check
    methods = load_methods(names)
    dtype = getattr(torch, args.dtype)
    env = environment(args.device)
    print(
        f"machine: {env['machine']} | date: {env['date']} | torch {env['torch']} | device {args.device} | "
        f"dtype {args.dtype} | chunk {args.chunk_size} | repeats {args.repeats} | seed {args.seed}"
    )
    for name, (fn, note) in methods.items():
        print(f"{name}: {'ok' if fn is not None else 'unavailable'}: {note}")
    if "liger" in methods and methods["liger"][0] is not None:
        print(f"liger: compiled={args.liger_compiled}")
    records = []
    with open(args.out, "w") if args.out else nullcontext() as out:
        for vocab, hidden in configurations(args):
            teacher_hidden = args.teacher_hidden or hidden
            for n in _ints(args.n):
                x = make_inputs(n, vocab, hidden, teacher_hidden, dtype, args.device, args.seed)
                base = dict(N=n, V=vocab, H=hidden, H_teacher=teacher_hidden, dtype=args.dtype)
                base.update(device=args.device, chunk_size=args.chunk_size, beta=args.beta, **env)
                base["repeats"] = args.repeats
                for loss in losses:
                    records += bench_problem(x, loss, methods, base, args, out)
                del x
                free_memory(args.device)
    report(records, args.plot)
    if args.out:
        print(f"records written to {args.out}")
    return 0 if all(r["agrees"] is not False for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Warm start for agent runs: teach a model the tool-call format on transcripts the project generates.

Small instruct models rarely emit a well-formed tool call from a prompt alone (SmolLM2-135M wrote none
in 16 tries with a one-shot example), so multi-turn OPD on them would never see a real tool turn. A few
optimizer steps on rendered transcripts (question, tool calls, tool results, answer) with the loss on
the assistant's own tokens only fix that; the transcripts are rendered with the same chat template the
rollout uses, so the model learns exactly the token layout it will later produce.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FitConfig:
    """Settings of one warm-start fit."""

    steps: int = 30
    """Optimizer steps."""

    batch_size: int = 8
    """Conversations per step."""

    learning_rate: float = 1e-4
    """AdamW learning rate (constant after a short warm-up)."""

    seed: int = 0
    """Order of the conversations and dropout."""

    replay: int = 32
    """The model's own greedy answers to plain questions (no tools) mixed into the fit, so learning
    the call format does not cost it its ordinary answers (0: transcripts only)."""


def assistant_token_mask(
    tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask that is 1 on the assistant's own tokens.

    Each assistant turn's tokens are the difference between the rendering that ends with it and the
    rendering of everything before it plus the generation prompt, up to and including the end-of-turn
    token: exactly what the model generates in a rollout. Requires a template whose renderings of
    successive prefixes extend each other (the agent loop relies on the same property).
    """
    ids = _render(tokenizer, messages, tools, generation_prompt=False)
    mask = [0] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:turn], tools, generation_prompt=True))
        upto = _render(tokenizer, messages[: turn + 1], tools, generation_prompt=False)
        if ids[: len(upto)] != upto:
            raise ValueError("the chat template's rendering of a prefix is not a prefix of the whole")
        eos = _last_index(ids, tokenizer.eos_token_id, start, len(upto))
        mask[start : eos + 1] = [1] * (eos + 1 - start)
    return ids, mask


def _render(tokenizer, messages, tools, *, generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            list(messages),
            tools=tools,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=False,
        )
    )


def _last_index(ids: list[int], token: int, start: int, end: int) -> int:
    for index in range(end - 1, start - 1, -1):
        if ids[index] == token:
            return index
    raise ValueError(f"an assistant turn has no end-of-turn token (id {token})")


def fit_assistant_turns(model, examples: Sequence[tuple[list, list]], config: FitConfig) -> list[float]:
    """Fit ``model`` in place on (ids, mask) examples, loss on mask = 1 tokens; returns the step losses."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, config.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    losses, order = [], []
    for step in range(config.steps):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[: config.batch_size]], order[config.batch_size :]
        loss = _batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == config.steps - 1:
            _progress(f"step {step + 1}/{config.steps} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def _progress(message: str) -> None:
    # stderr: scripts capture the output folder from stdout
    print(f"[warm_start] {message}", file=sys.stderr, flush=True)


def _batch_loss(model, batch: Sequence[tuple[list, list]]) -> torch.Tensor:
    """Token-mean cross-entropy over the masked tokens of a right-padded batch."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, mask) in enumerate(batch):
        tokens = torch.tensor(ids)
        input_ids[row, : len(ids)] = tokens
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), tokens, -100)
    # bf16 matmuls with fp32 master weights: several times faster on CPUs with bf16 instructions
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def mean_nll(model, examples: Sequence[tuple[list, list]], batch_size: int = 8) -> float:
    """Per-token negative log-likelihood of the masked tokens (the before/after check of a fit)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        tokens = sum(sum(mask[1:]) for _, mask in batch)
        total += float(_batch_loss(model, batch)) * tokens
        count += tokens
    return total / max(count, 1) if count else math.nan


def save_fitted(model, tokenizer, out_dir: Path) -> None:
    """Save in the dtype the source model had (the embedded models are bf16 on disk)."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------------
# The embedded tool-using pair: SmolLM2 fitted on tool transcripts, and its pruned student
# --------------------------------------------------------------------------------------------------

TOOL_TEACHER_DIRNAME = "smollm2-135m-instruct-tools"
# Bump when the warm-start recipe changes so cached folders are rebuilt.
WARM_START_VERSION = 4
# the pruned student needs fewer steps to recover the call format it mostly kept
STUDENT_STEPS = 20
REPORT_NAME = "warm_start.json"
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def count_tool_calls(text: str, names: Sequence[str]) -> int:
    """Well-formed calls in ``text``: JSON with a known ``name`` and an ``arguments`` object."""
    calls = 0
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict):
            calls += 1
    return calls


@torch.no_grad()
def call_rate(model, tokenizer, conversations: Sequence[list[dict]], tools: list[dict], seed=0) -> float:
    """Fraction of sampled first answers (T = 1) that hold a well-formed tool call."""
    names = [tool["function"]["name"] for tool in tools]
    torch.manual_seed(seed)
    hits = 0
    for messages in conversations:
        ids = _render(tokenizer, messages[:2], tools, generation_prompt=True)
        output = model.generate(
            torch.tensor([ids]),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=96,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        hits += count_tool_calls(tokenizer.decode(output[0, len(ids) :]), names) > 0
    return hits / max(len(conversations), 1)


def _transcript_examples(tokenizer, count: int, seed: int, scratch: Path) -> tuple[list, list]:
    """(conversations, (ids, mask) examples) for ``count`` new tool tasks, tools really called."""
    from agent.tools import tool_schemas
    from agent.transcripts import tool_transcript
    from data.build_tool_database import build_database
    from data.tool_tasks import generate_problems, make_catalogue

    rng = random.Random(seed)
    catalogue = make_catalogue(rng, 40)
    database = build_database([item.document(i) for i, item in enumerate(catalogue)], scratch)
    conversations = [tool_transcript(p, database, rng) for p in generate_problems(count, catalogue, rng)]
    tools = tool_schemas()
    return conversations, [assistant_token_mask(tokenizer, c, tools) for c in conversations]


def fit_tool_use(source_dir: Path, out_dir: Path, config: FitConfig, num_train: int = 96) -> dict:
    """Fit the model in ``source_dir`` on tool transcripts and save it to ``out_dir`` (may be the same
    folder) with the tools-aware template; returns the report (also written to ``out_dir``)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent.chat_template import install_tool_template
    from agent.tools import tool_schemas

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    install_tool_template(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        train_conv, train = _transcript_examples(tokenizer, num_train, config.seed + 1, Path(scratch) / "a")
        held_conv, held = _transcript_examples(tokenizer, 8, config.seed + 2, Path(scratch) / "b")
    tools = tool_schemas()
    general = _own_answers(model, tokenizer, config.seed + 3)
    replay = _own_answers(model, tokenizer, config.seed + 4, config.replay) if config.replay else []
    report = _measure(model, tokenizer, held_conv, held, tools, "before")
    report["general_nll_before"] = mean_nll(model, general)
    report["losses"] = fit_assistant_turns(model, train + replay, config)
    report.update(_measure(model, tokenizer, held_conv, held, tools, "after"))
    report["general_nll_after"] = mean_nll(model, general)
    _progress(
        f"general answers (the model's own, no tools): NLL {report['general_nll_before']:.3f} -> "
        f"{report['general_nll_after']:.3f} nats/token"
    )
    model.to(torch.bfloat16).save_pretrained(out_dir)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def _own_answers(model, tokenizer, seed: int, count: int = 8) -> list[tuple[list, list]]:
    """The model's own greedy answers to plain arithmetic questions, as (ids, mask) examples.

    Their NLL before and after the fit shows whether learning the tool format cost the model its
    ordinary answers (a fit on uniform transcripts can over-fit into calling tools for everything);
    mixed into the fit, they hold those answers in place.
    """
    from data.arithmetic import INSTRUCTION, generate_problems

    examples = []
    for problem in generate_problems(count, random.Random(seed)):
        messages = [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]
        prompt = _render(tokenizer, messages, None, generation_prompt=True)
        output = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=48, pad_token_id=tokenizer.pad_token_id
        )
        answer = tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
        conversation = [*messages, {"role": "assistant", "content": answer}]
        examples.append(assistant_token_mask(tokenizer, conversation, None))
    return examples


def _measure(model, tokenizer, conversations, examples, tools, when: str) -> dict[str, float]:
    """Held-out transcript NLL and tool-call rate of ``model``, logged and returned with a suffix."""
    nll, rate = mean_nll(model, examples), call_rate(model, tokenizer, conversations, tools)
    _progress(f"{when}: held-out transcript NLL {nll:.3f} nats/token, tool-call rate {rate:.2f}")
    return {f"held_out_nll_{when}": nll, f"call_rate_{when}": rate}


def ensure_tool_models(cache_dir: Path | None = None, drop_layers: int | None = None) -> tuple[Path, Path]:
    """Build once and return ``(student_dir, teacher_dir)`` of the embedded tool-using pair.

    The teacher is the embedded SmolLM2 teacher after the warm start. The student is pruned from it
    exactly as the default student is pruned from the plain teacher; pruning costs it the call format,
    so it gets a shorter warm start of its own. OPD then starts from a student that calls tools and
    distils the full teacher's use of them into it.
    """
    from common import embedded_models as em

    root = cache_dir or em.default_cache_dir()
    drop = em.DEFAULT_DROP_LAYERS if drop_layers is None else drop_layers
    base = em.ensure_teacher(root)
    teacher_fit, student_fit = FitConfig(), FitConfig(steps=STUDENT_STEPS)
    recipe = {
        "warm_start_version": WARM_START_VERSION,
        "teacher": json.loads((base / em.MARKER_NAME).read_text()),
        "fit": teacher_fit.__dict__,
    }
    teacher_dir = root / TOOL_TEACHER_DIRNAME

    def build_teacher(tmp: Path) -> None:
        _progress(f"warm start: fitting the teacher on tool transcripts into {teacher_dir} (once, minutes)")
        fit_tool_use(base, tmp, teacher_fit)

    def build_student(tmp: Path) -> None:
        _progress(f"warm start: pruning {drop} layers of the tool-using teacher, then fitting the student")
        em.prune_layers(teacher_dir, tmp, drop)
        fit_tool_use(tmp, tmp, student_fit)

    em.build_atomically(teacher_dir, recipe, build_teacher)
    student_recipe = {**recipe, "drop_layers": drop, "student_fit": student_fit.__dict__}
    student = em.build_atomically(root / f"{TOOL_TEACHER_DIRNAME}-drop{drop}", student_recipe, build_student)
    return student, teacher_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Print the student folder, then the teacher folder, of the embedded tool-using pair."""
    parser = argparse.ArgumentParser(prog="python -m agent.warm_start", description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $OPD_CACHE_DIR)")
    args = parser.parse_args(argv)
    student, teacher = ensure_tool_models(args.cache_dir)
    print(student)
    print(teacher)


if __name__ == "__main__":
    main()

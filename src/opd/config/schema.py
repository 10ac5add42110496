"""The ``opd:`` block of the trainer config: typed, documented, validated before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OVERLENGTH_POLICIES = ("truncate", "error")
TIP_SCORES = ("entropy", "entropy_plus_divergence")
DEFAULT_CHUNK_SIZE = 1024
"""Default of ``opd.chunk_size``; the one place the number is written."""


class OPDConfigError(ValueError):
    """A bad ``opd.*`` value; the message names the key."""


@dataclass
class OPDConfig:
    """On-policy distillation settings (hydra key ``opd``)."""

    teacher_model_path: str | None = None
    """Folder of the frozen teacher (HF format). Its own tokenizer is read from the same folder."""

    loss_type: str = "reverse_kl"
    """A divergence in ``opd.objectives.divergences.LOSS_REGISTRY`` (reverse_kl, forward_kl, jsd, skew_kl,
    skew_reverse_kl, forward_then_reverse_kl; full-vocabulary teacher signal), ``forward_kl_topk`` (teacher
    top-k signal), or a sampled-token policy-gradient objective, ``sampled_rkl_pg`` or ``iw_opd`` (teacher
    log-prob of the sampled token only; they need ``rollout.calculate_log_probs``)."""

    beta: float = 0.5
    """Mixing weight of the generalised JSD, strictly between 0 and 1 (m = beta*q + (1-beta)*p)."""

    skew_alpha: float = 0.1
    """Skew of skew_kl / skew_reverse_kl, 0 <= alpha < 1: KL(q || alpha*q + (1-alpha)*p)."""

    topk: int = 64
    """Teacher entries per token kept for ``forward_kl_topk`` (plus one tail bucket for the rest)."""

    teacher_signal: str | None = None
    """What the teacher phase caches per response token; null = the objective's own. The full-vocabulary
    divergences read 'hidden' (the teacher's final hidden states, 2*H bytes per token; the loss rebuilds its
    exact logits with its output head, kept on the device) or 'full' (its bf16 logits, 2*V bytes per token);
    null gives 'hidden' where the teacher's output head is a plain linear map and 'full', with the reason
    logged, where it is not (``opd.teacher.choose_signal``). forward_kl_topk reads 'topk', the policy-gradient
    objectives 'sampled'. Once built, the field holds the objective's signal ('full' for an unset
    full-vocabulary divergence, until the teacher is known), ``teacher_signal_given`` whether it was set."""

    paced_switch_step: int = 1
    """``forward_then_reverse_kl``: first training step that puts weight on reverse KL."""

    paced_blend_steps: int = 0
    """``forward_then_reverse_kl``: steps over which the weight rises from 0 to 1 (0 = hard switch)."""

    iw_opd_gamma: float = 0.5
    """``iw_opd``: amplification of the prefix weights w_t = 1 + gamma * (1 - S_{<t} / max(S, epsilon)), with
    S_{<t} the sum of |A_k| = |q_k - r_k| (teacher minus rollout log-prob of the sampled token) over the
    strict prefix k < t of the response and S its total; weights lie in [1, 1 + gamma], 0 gives uniform
    weights."""

    iw_opd_epsilon: float = 1e-8
    """``iw_opd``: floor of the response's discrepancy total S in the prefix weights (the max(S, epsilon)
    above), so a response the teacher fully agrees with does not divide by zero."""

    tip_keep_fraction: float = 1.0
    """TIP token selection: fraction of each response's loss tokens kept, ranked by ``tip_score``
    (1.0 keeps all, i.e. off)."""

    tip_score: str = "entropy"
    """TIP ranking: 'entropy' (student entropy) or 'entropy_plus_divergence' (plus the per-token
    teacher-student divergence of the objective)."""

    distill_loss_coef: float = 1.0
    """Weight of the distillation objective in the student loss."""

    task_loss_coef: float = 0.0
    """GRPO + OPD: weight of verl's policy loss on the task-reward (GRPO) advantages; 0 = pure OPD."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Tokens per chunk of every objective: its float32 intermediates never exceed two [chunk, V] buffers."""

    fused_output_head: bool = True
    """Compute the student's output head inside the chunked objective: the student forward stops at the
    final hidden states of the response rows, and each chunk computes its logits (hidden @ W_out^T, in the
    autocast dtype), log-softmax, divergence and, in backward, the gradients to the hidden states and to
    W_out itself, so no [N, V] student logits or logit gradient ever exist. Where the head is not a plain
    linear map (a bias, or logits transformed after it such as soft-capping) or the student runs under
    FSDP1, the model's own head runs instead and the reason is logged once; false always does that."""

    max_length: int | None = None
    """Cap on prompt + response tokens per sample; null means max_prompt_length + max_response_length."""

    overlength: str = "truncate"
    """What to do with a longer sample: 'truncate' (response tail cut, counted and logged) or 'error'."""

    reward_beta: float | None = None
    """Temperature of reward weighting exp(r / reward_beta), normalised over the whole batch; null = off."""

    pass_rate_weighting: bool = False
    """PACED: weight each sample by p(1-p), p its prompt group's pass rate (needs rollout.n > 1)."""

    temperature: float = 1.0
    """Temperature applied to BOTH teacher and student logits in the distillation loss."""

    val_num_prompts: int = 16
    """Held-out prompts (first of the validation set) for the val-opd/* metrics; 0 disables them."""

    val_max_new_tokens: int = 64
    """Tokens the student samples (and the teacher answers greedily) per held-out prompt."""

    val_seed: int = 1234
    """Sampling seed of the held-out evaluation, fixed so before/after numbers are comparable."""

    teacher_prompt: str = "same"
    """What the teacher reads before the student's response (module ``opd.teacher_prompts``): 'same' (the
    student's prompt), 'column' (each row's ``teacher_prompt`` column of chat messages, written by data
    preparation with ``--teacher-context``) or 'template' (the student's last user message rewritten by
    ``teacher_prompt_template``). Privileged context: with the teacher = the student's initial weights, it
    sees the reference answer or solution; both score the same response."""

    teacher_prompt_template: str | None = None
    """'template' mode: text of the teacher's last user message with ``{prompt}`` (the student's message,
    required), ``{answer}`` (reward_model.ground_truth) and ``{solution}`` (extra_info.solution); literal
    braces doubled. Or the name of a built-in one: 'answer' (= null, ``opd.teacher_prompts.DEFAULT_TEMPLATE``:
    the answer, to be reasoned to) or 'solution' (``SOLUTION_TEMPLATE``: the worked solution, not to be
    copied)."""

    plot: bool = True
    """Write a PNG of the training curves into the run's output folder at the end."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings for losses registered outside this project."""

    def __post_init__(self) -> None:
        # readers see the signal family the objective reads; only an unset one may still become 'hidden'
        self.teacher_signal_given = self.teacher_signal is not None
        if self.teacher_signal is None:
            self.teacher_signal = self.objective_signal

    def validate(self) -> OPDConfig:
        """Raise :class:`OPDConfigError` naming the first bad key; return self for chaining."""
        from opd.objectives.divergences import LOSS_REGISTRY
        from opd.objectives.policy_gradient import PG_OBJECTIVES
        from opd.objectives.topk import TOPK_LOSS

        self._validate_types()
        if not self.teacher_model_path:
            raise OPDConfigError("opd.teacher_model_path is required (set TEACHER_MODEL_PATH)")
        if not os.path.isdir(os.path.expanduser(self.teacher_model_path)):
            raise OPDConfigError(f"opd.teacher_model_path: no such folder: {self.teacher_model_path}")
        known_losses = sorted({*LOSS_REGISTRY, TOPK_LOSS, *PG_OBJECTIVES})
        if self.loss_type not in known_losses:
            raise OPDConfigError(
                f"opd.loss_type: unknown loss {self.loss_type!r}; choose one of {known_losses}"
            )
        self._validate_teacher_signal()
        if not 0.0 < self.beta < 1.0:
            raise OPDConfigError(f"opd.beta must be strictly between 0 and 1, got {self.beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise OPDConfigError(f"opd.skew_alpha must satisfy 0 <= alpha < 1, got {self.skew_alpha}")
        _require_positive("opd.topk", self.topk)
        self._validate_objective_mix()
        _require_positive("opd.paced_switch_step", self.paced_switch_step)
        if self.paced_blend_steps < 0:
            raise OPDConfigError(f"opd.paced_blend_steps must be >= 0, got {self.paced_blend_steps}")
        _require_positive("opd.chunk_size", self.chunk_size)
        _require_positive("opd.temperature", self.temperature)
        if self.max_length is not None:
            _require_positive("opd.max_length", self.max_length)
        if self.overlength not in OVERLENGTH_POLICIES:
            raise OPDConfigError(
                f"opd.overlength must be one of {OVERLENGTH_POLICIES}, got {self.overlength!r}"
            )
        if self.reward_beta is not None:
            _require_positive("opd.reward_beta", self.reward_beta)
        if self.val_num_prompts < 0:
            raise OPDConfigError(f"opd.val_num_prompts must be >= 0, got {self.val_num_prompts}")
        _require_positive("opd.val_max_new_tokens", self.val_max_new_tokens)
        self._validate_teacher_prompt()
        return self

    def _validate_types(self) -> None:
        # hydra hands over whatever the override spelt (opd.topk=abc is the string 'abc'): refuse it here,
        # not as a TypeError in a comparison or, worse, a silently wrong value in a worker
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            expected = _type_problem(value, hints[item.name])
            if expected:
                raise OPDConfigError(
                    f"opd.{item.name} must be {expected}, got {value!r} ({type(value).__name__})"
                )

    def _validate_teacher_signal(self) -> None:
        signals = ("hidden", "full") if self.objective_signal == "full" else (self.objective_signal,)
        if self.teacher_signal not in signals:
            raise OPDConfigError(
                f"opd.teacher_signal={self.teacher_signal!r} does not fit opd.loss_type={self.loss_type}, "
                f"which reads {' or '.join(map(repr, signals))}; leave it unset for the objective's own"
            )

    def _validate_objective_mix(self) -> None:
        if self.iw_opd_gamma < 0:
            raise OPDConfigError(f"opd.iw_opd_gamma must be >= 0, got {self.iw_opd_gamma}")
        _require_positive("opd.iw_opd_epsilon", self.iw_opd_epsilon)
        if not 0.0 < self.tip_keep_fraction <= 1.0:
            raise OPDConfigError(f"opd.tip_keep_fraction must be in (0, 1], got {self.tip_keep_fraction}")
        if self.tip_score not in TIP_SCORES:
            raise OPDConfigError(f"opd.tip_score must be one of {TIP_SCORES}, got {self.tip_score!r}")
        for key in ("distill_loss_coef", "task_loss_coef"):
            if getattr(self, key) < 0:
                raise OPDConfigError(f"opd.{key} must be >= 0, got {getattr(self, key)}")
        if self.distill_loss_coef == 0 and self.task_loss_coef == 0:
            raise OPDConfigError(
                "opd.distill_loss_coef and opd.task_loss_coef are both 0: nothing would be trained "
                "(turn the task loss off only with a distillation loss on)"
            )

    def _validate_teacher_prompt(self) -> None:
        from opd.teacher_prompts import (
            TEACHER_PROMPT_MODES,
            TeacherPromptError,
            template_placeholders,
            template_text,
        )

        if self.teacher_prompt not in TEACHER_PROMPT_MODES:
            raise OPDConfigError(
                f"opd.teacher_prompt must be one of {TEACHER_PROMPT_MODES}, got {self.teacher_prompt!r}"
            )
        if self.teacher_prompt_template is None:
            return
        if self.teacher_prompt != "template":
            raise OPDConfigError(
                "opd.teacher_prompt_template is set but unused: it needs opd.teacher_prompt=template "
                f"(got {self.teacher_prompt!r})"
            )
        try:
            template_placeholders(template_text(self.teacher_prompt_template))
        except TeacherPromptError as error:
            raise OPDConfigError(f"opd.teacher_prompt_template: {error}") from None

    @property
    def objective_signal(self) -> str:
        """The teacher signal family the objective reads: 'topk' (top-k loss), 'sampled' (policy-gradient
        objectives) or 'full' (full-vocabulary divergences, whose logits may also come as 'hidden')."""
        from opd.objectives.policy_gradient import PG_OBJECTIVES
        from opd.objectives.topk import TOPK_LOSS

        if self.loss_type == TOPK_LOSS:
            return "topk"
        return "sampled" if self.loss_type in PG_OBJECTIVES else "full"

    def check_rollout_temperature(self, rollout_temperature: float) -> None:
        """``iw_opd`` compares teacher and rollout log-probs, so both must be at the rollout temperature."""
        from opd.objectives.policy_gradient import IW_OPD

        if self.loss_type == IW_OPD and self.temperature != rollout_temperature:
            raise OPDConfigError(
                "opd.loss_type=iw_opd compares the teacher with the rollout log-probs, taken at "
                f"actor_rollout_ref.rollout.temperature={rollout_temperature}; set opd.temperature to the "
                f"same value (got {self.temperature})"
            )

    def check_rollout_n(self, rollout_n: int) -> None:
        """PACED pass rates need several samples per prompt: with one, every weight p(1-p) is 0."""
        if self.pass_rate_weighting and rollout_n < 2:
            raise OPDConfigError(
                "opd.pass_rate_weighting=true needs actor_rollout_ref.rollout.n >= 2 (ROLLOUT_N), got "
                f"{rollout_n}: with one sample per prompt every pass rate is 0 or 1 and every weight is 0"
            )

    @property
    def needs_rollout_log_probs(self) -> bool:
        """True when the rollout must return the log-probs of its sampled tokens (importance ratios)."""
        from opd.objectives.policy_gradient import PG_OBJECTIVES

        return self.loss_type in PG_OBJECTIVES or self.task_loss_coef > 0

    def loss_params(self, step: int) -> dict[str, Any]:
        """Keyword parameters for the loss at training ``step`` (each loss takes the ones it declares)."""
        from opd.objectives.schedule import reverse_kl_weight

        weight = reverse_kl_weight(step, self.paced_switch_step, self.paced_blend_steps)
        return {"alpha": self.skew_alpha, "reverse_weight": weight, **self.extra}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key with its default, as the trainer config's ``opd:`` block starts out."""
        return {f.name: _default_of(f) for f in dataclasses.fields(cls)}

    @classmethod
    def from_node(cls, node) -> OPDConfig:
        """Build and validate from the composed config's ``opd`` node (an omegaconf DictConfig); the one
        parser the launcher, the trainer and every worker use, so they cannot read the block differently."""
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.to_container(node, resolve=True)).validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OPDConfig:
        """Build from a plain mapping, rejecting keys this dataclass does not know."""
        cls.check_keys(values)
        return cls(**values)

    @classmethod
    def check_keys(cls, keys: Iterable[str]) -> None:
        """Raise :class:`OPDConfigError` naming each unknown key (given without ``opd.``) and its nearest."""
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(keys) - set(known))
        if unknown:
            named = [f"opd.{key}{_suggestion(key, known)}" for key in unknown]
            raise OPDConfigError(f"unknown key(s) {', '.join(named)}; known keys: {known}")


def _default_of(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean opd.{close[0]}?)" if close else ""


# How the error message names each annotated type.
_TYPE_WORDS = {
    bool: "true or false",
    int: "a whole number",
    float: "a finite number",
    str: "a string",
    dict: "a mapping",
    type(None): "null",
}


def _type_problem(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits the annotation ``hint``; otherwise what was expected, in words."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if any(_fits(value, kind) for kind in kinds):
        return None
    return " or ".join(_TYPE_WORDS.get(kind, str(kind)) for kind in map(_origin, kinds))


def _origin(kind: Any) -> Any:
    return typing.get_origin(kind) or kind


def _fits(value: Any, kind: Any) -> bool:
    kind = _origin(kind)
    if not isinstance(kind, type):
        return True
    if isinstance(value, bool):
        # a bool is an int to Python, but true is never a count or a weight
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def _require_positive(key: str, value: float) -> None:
    if value is None or value <= 0:
        raise OPDConfigError(f"{key} must be > 0, got {value}")

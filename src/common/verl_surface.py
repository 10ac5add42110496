"""The verl surface beyond verl's public API that this project relies on, and its launch-time check.

verl is pinned exactly (``pyproject.toml``). The symbols below are not part of verl's public contract
and can move in any release, and most of them are first touched inside a Ray worker minutes after
launch. :func:`check_verl_surface` resolves them all in the launching process, so a different verl
stops the run in seconds with one message naming every missing symbol and the installed version.

:data:`VERL_SURFACE` lists every verl name the project uses that starts with an underscore, every
verl method starting with an underscore that it overrides, every verl attribute it replaces
(monkey-patches), every attribute it reads or writes that verl only sets inside a constructor, every
verl name it looks up by a computed name (which no import statement checks), and every name it
imports from an experimental verl module. ``tests/test_verl_surface.py`` scans the sources so that
a new such use without an entry fails.

Importing this module imports neither torch nor verl.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

PINNED_VERL_VERSION = "0.9.1"

USED = "used"
OVERRIDDEN = "overridden method"
PATCHED = "patched attribute"
INSTANCE = "instance attribute set in a verl constructor"
KINDS = (USED, OVERRIDDEN, PATCHED, INSTANCE)


@dataclass(frozen=True)
class VerlSymbol:
    """One verl symbol: ``attr`` is a dotted path inside ``module``; ``why`` says what needs it."""

    module: str
    attr: str
    kind: str
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}:{self.attr}"


_TRAINER = "verl.trainer.ppo.v1.trainer_sync"
_FSDP_ENGINE = "verl.workers.engine.fsdp.transformer_impl"
_REPLICA = "verl.workers.rollout.replica"

VERL_SURFACE = (
    VerlSymbol(_TRAINER, "PPOTrainerSync._init_resource_pool_mgr", OVERRIDDEN,
               "opd.trainer: swaps every role's worker class for the OPD worker"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._step_once", OVERRIDDEN,
               "opd.trainer: the OPD step (no old/ref log-prob passes, reward weights)"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._update_actor", OVERRIDDEN,
               "opd.trainer: passes the mini-batch size and step to the OPD worker"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._validate", OVERRIDDEN,
               "opd.trainer: adds the held-out val-opd/* metrics to verl's validation"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._compute_metrics", OVERRIDDEN,
               "opd.trainer: writes metrics.jsonl and the progress line per step"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._save_checkpoint", OVERRIDDEN,
               "opd.trainer: crash-safe save (completion marker, atomic tracker, retention after commit)"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._load_checkpoint", OVERRIDDEN,
               "opd.trainer: resumes from the newest complete checkpoint through verl's resume_path mode"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._compute_reward_colocate", USED,
               "opd.trainer: verl's rule-based reward inside the OPD step"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._balance_batch", USED,
               "opd.trainer: verl's balancing of samples across data-parallel ranks"),
    VerlSymbol(_TRAINER, "PPOTrainerSync._compute_advantage", USED,
               "opd.trainer: verl's GRPO advantages for opd.task_loss_coef > 0"),
    VerlSymbol(_FSDP_ENGINE, "FSDPEngineWithLMHead._autocast_dtype", INSTANCE,
               "opd.model_forward: the engine's mixed-precision dtype for the custom forward"),
    VerlSymbol(_FSDP_ENGINE, "FSDPEngineWithLMHead", USED,
               "cpu_backend.patches: registered for device cpu, looked up by name"),
    VerlSymbol(_FSDP_ENGINE, "FSDPEngineWithValueHead", USED,
               "cpu_backend.patches: registered for device cpu, looked up by name"),
    VerlSymbol(_FSDP_ENGINE, "CPUOffloadPolicy", PATCHED,
               "cpu_backend.patches: replaced by a policy that never pins host memory"),
    VerlSymbol("verl.workers.engine.base", "EngineRegistry._engines", USED,
               "cpu_backend.patches: register the cpu engines only where missing (register asserts)"),
    VerlSymbol("verl.utils.distributed", "initialize_global_process_group_ray", PATCHED,
               "cpu_backend.patches: wrapped so the cpu platform gets a plain gloo process group"),
    VerlSymbol("verl.workers.engine_workers", "initialize_global_process_group_ray", PATCHED,
               "cpu_backend.patches: rebound to the wrapper (the module imported the name itself)"),
    VerlSymbol("verl.workers.rollout.base", "_ROLLOUT_REGISTRY", PATCHED,
               "cpu_backend: the HF rollout adapter is added (verl has no function to register one)"),
    VerlSymbol(_REPLICA, "RolloutReplica._server_handle", INSTANCE,
               "cpu_backend.hf_rollout: the HF server actor, which verl reads back"),
    VerlSymbol(_REPLICA, "RolloutReplica._server_address", INSTANCE,
               "cpu_backend.hf_rollout: the HF server's address, which verl reads back"),
    VerlSymbol("verl.experimental.agent_loop.tool_agent_loop", "ToolAgentLoop", USED,
               "agent.tool_agent_loop: subclassed to use the ChatML token builder (experimental module)"),
)


class VerlSurfaceError(ImportError):
    """The installed verl lacks symbols of :data:`VERL_SURFACE`."""


def installed_verl_version() -> str | None:
    """Version of the installed verl distribution, None when verl is not installed."""
    try:
        return metadata.version("verl")
    except metadata.PackageNotFoundError:
        return None


def assigned_in_constructor(cls: type, attr: str) -> bool:
    """Whether the ``__init__`` of ``cls`` or of one of its bases assigns ``self.<attr>``."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if not inspect.isfunction(init):
            continue
        try:
            function = ast.parse(textwrap.dedent(inspect.getsource(init))).body[0]
        except (OSError, TypeError):
            continue
        if function.args.args and _assigns(function, function.args.args[0].arg, attr):
            return True
    return False


def _assigns(function: ast.AST, self_name: str, attr: str) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == self_name
        for node in ast.walk(function)
    )


def _problem(symbol: VerlSymbol) -> str | None:
    """Why ``symbol`` does not resolve in the installed verl, or None when it does."""
    try:
        obj = importlib.import_module(symbol.module)
    except Exception as error:  # a mismatched verl can fail at import with any exception
        return f"cannot import {symbol.module} ({type(error).__name__}: {error})"
    *owners, last = symbol.attr.split(".")
    for part in owners:
        if not hasattr(obj, part):
            return f"no attribute {part!r}"
        obj = getattr(obj, part)
    if symbol.kind == INSTANCE:
        # An instance attribute exists only on built objects, and building an engine or a rollout
        # replica needs a model, devices and Ray. The constructor's source is the cheap evidence
        # that verl still sets it; it proves the assignment is there, not that every path runs it.
        if not (inspect.isclass(obj) and assigned_in_constructor(obj, last)):
            return f"no constructor of {'.'.join(owners)} assigns self.{last}"
        return None
    if not hasattr(obj, last):
        return f"no attribute {last!r}"
    if symbol.kind == OVERRIDDEN and not callable(getattr(obj, last)):
        return f"{last!r} is no longer a method"
    return None


def _version_line(installed: str | None) -> str:
    if installed is None:
        return f"verl is not installed; the project pins verl=={PINNED_VERL_VERSION}."
    if installed != PINNED_VERL_VERSION:
        return f"verl {installed} is installed, but the project pins verl=={PINNED_VERL_VERSION}."
    return f"verl {installed} is installed, the pinned version."


def check_verl_surface(surface: Iterable[VerlSymbol] = VERL_SURFACE) -> None:
    """Resolve every symbol of ``surface``; raise :class:`VerlSurfaceError` listing all that are missing."""
    missing = [
        f"  {symbol.name} ({symbol.kind}; {symbol.why}): {problem}"
        for symbol in surface
        if (problem := _problem(symbol)) is not None
    ]
    if missing:
        raise VerlSurfaceError(
            "\n".join(
                [
                    _version_line(installed_verl_version()),
                    "These verl symbols the project relies on are missing:",
                    *missing,
                    f"Install verl=={PINNED_VERL_VERSION}, or port the code using them and "
                    "update common/verl_surface.py.",
                ]
            )
        )

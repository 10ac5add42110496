"""The verl surface: the launch check against the installed verl, its error, and a scan of ``src/``.

The scan finds, without running the project, every private verl use of these forms:

* ``from verl... import _x`` and any import from a ``verl.experimental`` (or underscore) module;
* ``V._x`` and deeper chains where ``V`` was imported from verl, and any assignment ``V.x = ...``;
* a string ``"_x"`` passed to ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr``, and ``obj._x`` for
  any ``obj`` but ``self`` / ``cls`` (such as an engine verl built): the project's own code keeps to
  the public names of objects other than ``self``, so such an access is taken as a verl one;
* in a callback ``f(module)`` given to ``when_imported("verl...", f)``: ``module._x`` and ``module.x = ...``;
* in a class whose base was imported from verl: a method ``_x`` the base also has (an override), and
  ``self._x`` where the base has ``_x`` or a verl constructor assigns ``self._x``.

Limits, kept on purpose: a class reaching verl through a project base class, and attribute names
computed at run time, are not followed.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common import launch, verl_surface
from common.verl_surface import (
    INSTANCE,
    KINDS,
    OVERRIDDEN,
    PATCHED,
    PINNED_VERL_VERSION,
    USED,
    VERL_SURFACE,
    VerlSurfaceError,
    VerlSymbol,
    assigned_in_constructor,
    check_verl_surface,
)
from opd import main_opd

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ATTR_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


# ---------------------------------------------------------------------------- the check


def test_installed_verl_has_the_whole_surface():
    check_verl_surface()


def test_pin_is_the_one_in_pyproject():
    pins = re.findall(r'"verl(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins and set(pins) == {PINNED_VERL_VERSION}


def test_installed_version_is_read_from_the_distribution():
    import verl

    assert verl_surface.installed_verl_version() == verl.__version__


def test_missing_attribute_is_named_with_the_version(monkeypatch):
    import verl.workers.rollout.base as rollout_base

    monkeypatch.delattr(rollout_base, "_ROLLOUT_REGISTRY")
    with pytest.raises(VerlSurfaceError) as error:
        check_verl_surface()
    message = str(error.value)
    assert "verl.workers.rollout.base:_ROLLOUT_REGISTRY (patched attribute;" in message
    assert f"verl {PINNED_VERL_VERSION} is installed, the pinned version" in message
    assert message.count("\n  verl.") == 1


def test_missing_module_and_attribute_are_listed_in_one_error():
    table = (
        VerlSymbol("verl.no_such_module", "thing", USED, "test"),
        VerlSymbol("verl.workers.engine.base", "EngineRegistry._no_such_table", USED, "test"),
        VERL_SURFACE[0],
    )
    with pytest.raises(VerlSurfaceError) as error:
        check_verl_surface(table)
    message = str(error.value)
    assert "verl.no_such_module:thing (used; test): cannot import verl.no_such_module" in message
    assert "verl.workers.engine.base:EngineRegistry._no_such_table (used; test): no attribute" in message
    assert VERL_SURFACE[0].name not in message


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ("0.9.2", f"verl 0.9.2 is installed, but the project pins verl=={PINNED_VERL_VERSION}"),
        (None, f"verl is not installed; the project pins verl=={PINNED_VERL_VERSION}"),
    ],
)
def test_error_says_when_the_installed_verl_is_not_the_pinned_one(monkeypatch, installed, expected):
    monkeypatch.setattr(verl_surface, "installed_verl_version", lambda: installed)
    with pytest.raises(VerlSurfaceError, match=re.escape(expected)):
        check_verl_surface((VerlSymbol("verl.no_such_module", "thing", USED, "test"),))


def test_instance_attribute_must_be_assigned_by_a_constructor():
    table = (
        VerlSymbol(
            "verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead._no_such", INSTANCE, "test"
        ),
    )
    expected = r"no constructor of FSDPEngineWithLMHead assigns self\._no_such"
    with pytest.raises(VerlSurfaceError, match=expected):
        check_verl_surface(table)


def test_overridden_method_must_still_be_callable():
    table = (VerlSymbol("verl.workers.rollout.base", "_ROLLOUT_REGISTRY", OVERRIDDEN, "test"),)
    with pytest.raises(VerlSurfaceError, match="'_ROLLOUT_REGISTRY' is no longer a method"):
        check_verl_surface(table)


class _Base:
    def __init__(self, handle):
        self._plain = handle
        self._annotated: int = 0

    def later(self):
        self._late = 1


class _Child(_Base):
    pass


def test_constructor_assignment_is_found_through_the_bases():
    assert assigned_in_constructor(_Child, "_plain")
    assert assigned_in_constructor(_Child, "_annotated")
    assert not assigned_in_constructor(_Child, "_late")


def test_table_entries_are_well_formed():
    names = [symbol.name for symbol in VERL_SURFACE]
    assert len(names) == len(set(names))
    for symbol in VERL_SURFACE:
        assert symbol.module.startswith("verl.") and symbol.attr and symbol.why
        assert symbol.kind in KINDS


def test_every_entry_is_still_used_somewhere_in_src():
    sources = "\n".join(
        path.read_text() for path in SRC.rglob("*.py") if path.name != "verl_surface.py"
    )
    stale = [s.name for s in VERL_SURFACE if not re.search(rf"\b{s.attr.split('.')[-1]}\b", sources)]
    assert stale == []


# ---------------------------------------------------------------------------- the launchers


def test_opd_entry_point_checks_verl_first(monkeypatch):
    calls = []

    def missing():
        calls.append("check")
        raise VerlSurfaceError("verl.x:_y is missing")

    monkeypatch.setattr(main_opd, "check_verl_surface", missing)
    monkeypatch.setattr(main_opd, "prepare", lambda config: calls.append("prepare"))
    with pytest.raises(SystemExit, match="verl.x:_y is missing"):
        main_opd.main(OmegaConf.create({}))
    assert calls == ["check"]


def test_launcher_checks_verl_before_exec(monkeypatch, capsys):
    execs = []

    def missing():
        raise VerlSurfaceError("verl.x:_y is missing")

    monkeypatch.setattr(launch, "check_verl_surface", missing)
    monkeypatch.setattr(launch.os, "execvp", lambda *args: execs.append(args))
    with pytest.raises(SystemExit, match="verl.x:_y is missing"):
        launch.main(["--", "true"])
    assert execs == []
    launch.main(["--dry-run", "--", "true"])
    assert "true" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the source scan


@dataclass(frozen=True)
class Use:
    """A private verl use found in the sources; ``module`` None: any module; ``kind`` None: any kind."""

    module: str | None
    attr: str | None
    kind: str | None
    where: str

    def listed_in(self, table) -> bool:
        return any(self._matches(symbol) for symbol in table)

    def _matches(self, symbol: VerlSymbol) -> bool:
        if self.module is not None and symbol.module != self.module:
            return False
        if self.kind is not None and symbol.kind != self.kind:
            return False
        if self.attr is None:
            return True
        return symbol.attr == self.attr or (self.module is None and symbol.attr.endswith(f".{self.attr}"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _unstable(module: str) -> bool:
    return any(part == "experimental" or _private(part) for part in module.split("."))


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """``a.b.c`` as ``("a", ["b", "c"])``; None for anything not rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return (node.id, parts) if isinstance(node, ast.Name) else None


class _Scan:
    """The private verl uses in one source file (see the module docstring)."""

    def __init__(self, source: str, path: str):
        self.tree = ast.parse(source)
        self.path = path
        self.uses: set[Use] = set()
        self.names: dict[str, tuple[str, str]] = {}
        self.modules: dict[str, str] = {}
        self.constants = {
            target.id: node.value.value
            for node in self.tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }

    def run(self) -> set[Use]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                self._import(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute):
                self._attribute(node)
            elif isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, ast.ClassDef):
                self._class(node)
        return self.uses

    def _add(self, node, module, attr, kind=None):
        self.uses.add(Use(module, attr, kind, f"{self.path}:{node.lineno}"))

    def _import(self, node):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "verl":
                    continue
                # "import verl.a.b" binds "verl"; "import verl.a.b as m" binds m to verl.a.b
                self.modules[alias.asname or "verl"] = alias.name if alias.asname else "verl"
                if _unstable(alias.name):
                    self._add(node, alias.name, None)
            return
        if node.level or not node.module or node.module.split(".")[0] != "verl":
            return
        for alias in node.names:
            self.names[alias.asname or alias.name] = (node.module, alias.name)
            if _private(alias.name) or _unstable(node.module):
                self._add(node, node.module, alias.name)

    def _resolve(self, root: str, parts: list[str]) -> tuple[str, list[str]] | None:
        """(verl module, attribute path) of a chain rooted at a name imported from verl."""
        if root in self.names:
            module, name = self.names[root]
            return module, [name, *parts]
        if root in self.modules:
            return self.modules[root], parts
        return None

    def _attribute(self, node: ast.Attribute):
        chain = _chain(node)
        resolved = chain and self._resolve(*chain)
        if not resolved:
            if _private(node.attr) and _chain(node.value) not in (("self", []), ("cls", [])):
                self._add(node, None, node.attr)
            return
        module, path = resolved
        if isinstance(node.ctx, ast.Store):
            self._add(node, module, ".".join(path), PATCHED)
        private_at = next((i for i, part in enumerate(path) if _private(part)), None)
        if private_at is not None:
            self._add(node, module, ".".join(path[: private_at + 1]))

    def _call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name) or len(node.args) < 2:
            return
        name, first, second = node.func.id, node.args[0], node.args[1]
        if name in ATTR_FUNCTIONS and isinstance(second, ast.Constant) and isinstance(second.value, str):
            if _private(second.value):
                self._add(node, None, second.value)
        elif name == "when_imported" and isinstance(second, ast.Name):
            module = first.value if isinstance(first, ast.Constant) else None
            if isinstance(first, ast.Name):
                module = self.constants.get(first.id)
            if isinstance(module, str) and module.split(".")[0] == "verl":
                self._callback(second.id, module)

    def _callback(self, function_name: str, module: str):
        for function in ast.walk(self.tree):
            if isinstance(function, ast.FunctionDef) and function.name == function_name:
                self._module_parameter(function, module)

    def _module_parameter(self, function: ast.FunctionDef, module: str):
        """``m._x`` and ``m.x = ...`` where ``m``, the first parameter, is the verl ``module``."""
        if not function.args.args:
            return
        param = function.args.args[0].arg
        for node in ast.walk(function):
            if not (isinstance(node, ast.Attribute) and _chain(node.value) == (param, [])):
                continue
            if isinstance(node.ctx, ast.Store):
                self._add(node, module, node.attr, PATCHED)
            elif _private(node.attr):
                self._add(node, module, node.attr)

    def _verl_base(self, node: ast.ClassDef):
        for base in node.bases:
            chain = _chain(base)
            resolved = chain and self._resolve(*chain)
            if resolved:
                module, path = resolved
                cls = importlib.import_module(module)
                for part in path:
                    cls = getattr(cls, part)
                return module, ".".join(path), cls
        return None

    def _class(self, node: ast.ClassDef):
        base = self._verl_base(node)
        if base is None:
            return
        module, base_path, base_cls = base
        methods = [f for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
        defined = {method.name for method in methods}
        for method in methods:
            if _private(method.name) and hasattr(base_cls, method.name):
                self._add(method, module, f"{base_path}.{method.name}", OVERRIDDEN)
        for attr in ast.walk(node):
            if not (isinstance(attr, ast.Attribute) and isinstance(attr.value, ast.Name)):
                continue
            if attr.value.id != "self" or not _private(attr.attr) or attr.attr in defined:
                continue
            if hasattr(base_cls, attr.attr):
                self._add(attr, module, f"{base_path}.{attr.attr}")
            elif assigned_in_constructor(base_cls, attr.attr):
                self._add(attr, module, f"{base_path}.{attr.attr}", INSTANCE)


def scan(source: str, path: str = "<source>") -> set[Use]:
    return _Scan(source, path).run()


_SYNTHETIC = '''
import verl.experimental.agent_loop
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.engine.base import EngineRegistry
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.rollout.replica import RolloutReplica

ENGINE = "verl.workers.engine.fsdp.transformer_impl"

def use(engine):
    EngineRegistry._engines.clear()
    EngineRegistry.public = None
    return getattr(engine, "_autocast_dtype"), engine.model._scaler

def _patch(module):
    module.CPUOffloadPolicy = None
    return module._hidden, module.public

when_imported(ENGINE, _patch)

class Trainer(PPOTrainerSync):
    def _step_once(self):
        self._own = self._balance_batch()

    def _own_helper(self):
        return self._own_helper

class Replica(RolloutReplica):
    def launch(self):
        self._server_handle = None
'''


def test_scan_finds_every_form_of_private_use():
    found = {(use.module, use.attr, use.kind) for use in scan(_SYNTHETIC)}
    trainer = "verl.trainer.ppo.v1.trainer_sync"
    engine = "verl.workers.engine.fsdp.transformer_impl"
    assert found == {
        ("verl.experimental.agent_loop", None, None),
        ("verl.workers.rollout.base", "_ROLLOUT_REGISTRY", None),
        ("verl.workers.engine.base", "EngineRegistry._engines", None),
        ("verl.workers.engine.base", "EngineRegistry.public", PATCHED),
        (None, "_autocast_dtype", None),
        (None, "_scaler", None),
        (engine, "CPUOffloadPolicy", PATCHED),
        (engine, "_hidden", None),
        (None, "_hidden", None),
        (trainer, "PPOTrainerSync._step_once", OVERRIDDEN),
        (trainer, "PPOTrainerSync._balance_batch", None),
        ("verl.workers.rollout.replica", "RolloutReplica._server_handle", INSTANCE),
    }


def test_scan_match_needs_the_module_and_kind_of_the_entry():
    table = (VerlSymbol("verl.a", "B._c", OVERRIDDEN, "test"),)
    assert Use("verl.a", "B._c", OVERRIDDEN, "x").listed_in(table)
    assert Use(None, "_c", None, "x").listed_in(table)
    assert not Use("verl.other", "B._c", None, "x").listed_in(table)
    assert not Use("verl.a", "B._c", PATCHED, "x").listed_in(table)


@pytest.fixture(scope="module")
def src_uses() -> set[Use]:
    uses = set()
    for path in sorted(SRC.rglob("*.py")):
        uses |= scan(path.read_text(), str(path.relative_to(ROOT)))
    return uses


def test_every_private_verl_use_in_src_is_in_the_table(src_uses):
    unlisted = sorted(
        f"{use.where}: {use.module}:{use.attr} ({use.kind or 'any kind'})"
        for use in src_uses
        if not use.listed_in(VERL_SURFACE)
    )
    assert unlisted == [], "add these to VERL_SURFACE in src/common/verl_surface.py"


def test_scan_finds_every_entry_but_the_public_names_looked_up_by_a_computed_name(src_uses):
    unfound = [s for s in VERL_SURFACE if not any(use.listed_in((s,)) for use in src_uses)]
    assert [s.name for s in unfound if s.kind != USED or any(map(_private, s.attr.split(".")))] == []

"""The lock files under requirements/ are in step with pyproject.toml, and set-up installs exactly them."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "opd" / "setup_opd.sh"
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+$")


def _load_lock_header():
    spec = importlib.util.spec_from_file_location("lock_header", ROOT / "scripts" / "opd" / "lock_header.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_header = _load_lock_header()
PYPROJECT = lock_header.load_pyproject()


def _lock_text(profile: str) -> str:
    return (ROOT / "requirements" / f"{profile}.lock").read_text()


def _pins(profile: str) -> dict[str, Version]:
    lines = [
        line
        for line in _lock_text(profile).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    bad = [line for line in lines if not PIN.match(line)]
    assert not bad, f"{profile}.lock lines that are no exact name==version pin: {bad}"
    pins = {}
    for line in lines:
        name, version = line.split("==")
        assert canonicalize_name(name) not in pins, f"{name} pinned twice in {profile}.lock"
        pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.mark.parametrize("profile", lock_header.PROFILES)
def test_lock_header_records_the_current_pyproject_requirements(profile):
    recorded = lock_header.header_fields(_lock_text(profile))[lock_header.HASH_KEY]
    assert recorded == lock_header.requirements_hash(PYPROJECT, profile), (
        f"pyproject.toml's requirements changed since requirements/{profile}.lock was made: "
        f"run bash scripts/opd/lock_deps.sh {profile}"
    )


@pytest.mark.parametrize("profile", lock_header.PROFILES)
def test_every_pyproject_requirement_is_pinned_within_its_specifier(profile):
    pins = _pins(profile)
    for group, lines in lock_header.profile_groups(PYPROJECT, profile).items():
        for line in lines:
            requirement = Requirement(line)
            pinned = pins.get(canonicalize_name(requirement.name))
            assert pinned is not None, f"{requirement.name} ({group}) is missing from {profile}.lock"
            assert requirement.specifier.contains(pinned, prereleases=True), f"{line} vs {pinned}"


def test_both_locks_are_for_one_python():
    pythons = {lock_header.header_fields(_lock_text(p))[lock_header.PYTHON_KEY] for p in lock_header.PROFILES}
    assert len(pythons) == 1 and re.fullmatch(r"3\.\d+", pythons.pop())


def test_cpu_lock_takes_the_cpu_build_of_torch_and_no_cuda_package():
    pins = _pins("cpu")
    assert pins["torch"].local == "cpu"
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]


def _edited(edit) -> dict:
    pyproject = copy.deepcopy(PYPROJECT)
    edit(pyproject["project"])
    return pyproject


@pytest.mark.parametrize("profile", lock_header.PROFILES)
def test_hash_ignores_spelling_and_order(profile):
    def respell(project):
        project["dependencies"] = [line.replace(">=", " >= ") for line in reversed(project["dependencies"])]

    assert lock_header.requirements_hash(_edited(respell), profile) == lock_header.requirements_hash(
        PYPROJECT, profile
    )


@pytest.mark.parametrize("profile", lock_header.PROFILES)
@pytest.mark.parametrize(
    "edit",
    [
        lambda project: project["dependencies"].append("rich"),
        lambda project: project["dependencies"].__setitem__(0, project["dependencies"][0] + ",!=0.0.1"),
        lambda project: project["optional-dependencies"]["test"].append("hypothesis"),
    ],
    ids=["added", "specifier", "test-extra"],
)
def test_hash_changes_with_any_requirement_of_the_profile(profile, edit):
    assert lock_header.requirements_hash(_edited(edit), profile) != lock_header.requirements_hash(
        PYPROJECT, profile
    )


@pytest.mark.parametrize(("profile", "other"), [("cpu", "gpu"), ("gpu", "cpu")])
def test_hash_changes_with_its_own_extra_only(profile, other):
    def extend(extra):
        return lambda project: project["optional-dependencies"][extra].append("rich")

    before = lock_header.requirements_hash(PYPROJECT, profile)
    assert lock_header.requirements_hash(_edited(extend(profile)), profile) != before
    assert lock_header.requirements_hash(_edited(extend(other)), profile) == before


def test_header_round_trips_its_fields():
    text = lock_header.header(PYPROJECT, "gpu", "3.11")
    assert lock_header.header_fields(text) == {
        lock_header.PYTHON_KEY: "3.11",
        lock_header.HASH_KEY: lock_header.requirements_hash(PYPROJECT, "gpu"),
    }


def test_header_cli_prints_the_committed_header(capsys):
    assert lock_header.main(["cpu"]) == 0
    python = lock_header.header_fields(_lock_text("cpu"))[lock_header.PYTHON_KEY]
    assert capsys.readouterr().out == lock_header.header(PYPROJECT, "cpu", python)
    assert lock_header.main(["tpu"]) == 2


def test_lock_deps_refuses_an_unknown_profile_before_any_work():
    script = ROOT / "scripts" / "opd" / "lock_deps.sh"
    result = subprocess.run(["bash", str(script), "tpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown profile 'tpu'" in result.stderr


# A stand-in venv: its python and uv log their arguments, answer the version query with $FAKE_PYTHON and
# accept the import check read from stdin, so set-up's decisions are seen without installing anything.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
if [[ "$1" == -c ]]; then echo "$FAKE_PYTHON"; elif [[ "$1" == - ]]; then cat > /dev/null; fi
"""
FAKE_UV = """#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_LOG"
"""


def _fake_venv(root: Path) -> Path:
    for name, text in (("python", FAKE_PYTHON), ("uv", FAKE_UV)):
        tool = root / "bin" / name
        tool.parent.mkdir(parents=True, exist_ok=True)
        tool.write_text(text)
        tool.chmod(0o755)
    return root


def _setup(tmp_path: Path, venv: Path, profile: str = "cpu", python: str = "3.11"):
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = dict(
        os.environ, OPD_VENV=str(venv), OPD_SETUP_PROFILE=profile, OPD_WHEELHOUSE=str(tmp_path / "wheels")
    )
    env.update(FAKE_LOG=str(log), FAKE_PYTHON=python)
    result = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_setup_installs_the_lock_without_resolving_and_fetches_once(tmp_path):
    lock = str(ROOT / "requirements" / "cpu.lock")
    result, calls = _setup(tmp_path, _fake_venv(tmp_path / "venv1"))
    assert result.returncode == 0, result.stderr
    fetches = [call for call in calls if call.startswith("python -m pip wheel")]
    assert len(fetches) == 1 and f"-r {lock}" in fetches[0] and "--no-deps" in fetches[0]
    installs = [call for call in calls if call.startswith("uv pip install")]
    assert len(installs) == 2
    assert all("--no-deps" in call and "--no-index" in call for call in installs)
    assert f"-r {lock}" in installs[0] and f"-e {ROOT}" in installs[1]
    assert (tmp_path / "venv1" / ".opd-setup-stamp").is_file()

    _, calls = _setup(tmp_path, _fake_venv(tmp_path / "venv2"))
    assert not [call for call in calls if call.startswith("python -m pip wheel")]
    assert len([call for call in calls if call.startswith("uv pip install")]) == 2


def test_setup_refuses_a_venv_of_another_python(tmp_path):
    result, calls = _setup(tmp_path, _fake_venv(tmp_path / "venv"), python="3.12")
    assert result.returncode == 2
    assert "has Python 3.12 but" in result.stderr and "is for Python 3.11" in result.stderr
    assert not [call for call in calls if "install" in call or "wheel" in call]


def test_setup_refuses_a_profile_without_a_lock(tmp_path):
    result, calls = _setup(tmp_path, _fake_venv(tmp_path / "venv"), profile="tpu")
    assert result.returncode == 2
    assert "no lock file for profile 'tpu'" in result.stderr
    assert calls == []


def _fingerprint(root: Path, profile: str) -> str:
    common = root / "scripts" / "lib" / "common.sh"
    result = subprocess.run(
        ["bash", "-c", f'source "{common}"; setup_fingerprint'],
        env=dict(os.environ, OPD_SETUP_PROFILE=profile),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def test_editing_the_profiles_lock_makes_the_env_stale(tmp_path):
    for part in ("pyproject.toml", "scripts/lib/common.sh", "scripts/opd/setup_opd.sh", "requirements"):
        source, target = ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    before = _fingerprint(tmp_path, "cpu")
    with (tmp_path / "requirements" / "gpu.lock").open("a") as lock:
        lock.write("rich==14.0.0\n")
    assert _fingerprint(tmp_path, "cpu") == before
    with (tmp_path / "requirements" / "cpu.lock").open("a") as lock:
        lock.write("rich==14.0.0\n")
    assert _fingerprint(tmp_path, "cpu") != before

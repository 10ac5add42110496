"""The header of a lock file under requirements/: what the lock was resolved from.

    python scripts/opd/lock_header.py PROFILE   # prints the header lock_deps.sh puts above the pins

A profile's inputs are pyproject's base dependencies plus the extras of the same name and ``test``. The
header records their hash, taken over each requirement as packaging normalises it, sorted within its
group: a change of spacing, quoting or order in pyproject.toml keeps the hash, a change of any name,
specifier, extra or marker alters it, and another profile's extra is no input. It also records the
Python the lock was resolved for, which setup_opd.sh checks the venv against.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
PROFILES = ("cpu", "gpu")
HASH_KEY = "pyproject-requirements-sha256"
PYTHON_KEY = "python"


def profile_groups(pyproject: dict, profile: str) -> dict[str, list[str]]:
    """The profile's requirements by group (``dependencies`` and each extra), normalised and sorted."""
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    groups = {"dependencies": project["dependencies"], profile: extras[profile], "test": extras["test"]}
    return {name: sorted(str(Requirement(line)) for line in lines) for name, lines in groups.items()}


def requirements_hash(pyproject: dict, profile: str) -> str:
    return hashlib.sha256(json.dumps(profile_groups(pyproject, profile), sort_keys=True).encode()).hexdigest()


def load_pyproject(path: Path = PYPROJECT) -> dict:
    return tomllib.loads(path.read_text())


def header(pyproject: dict, profile: str, python: str) -> str:
    return f"""\
# Lock of the {profile} profile: every package that pyproject.toml's dependencies and its extras
# {profile} and test need, each pinned exactly, for CPython {python} on Linux x86_64. setup_opd.sh
# installs exactly these pins (no dependency resolution at set-up time).
# Regenerate after editing pyproject.toml's dependencies: bash scripts/opd/lock_deps.sh {profile}
# {PYTHON_KEY}: {python}
# {HASH_KEY}: {requirements_hash(pyproject, profile)}
"""


def header_fields(lock_text: str) -> dict[str, str]:
    """The ``# key: value`` fields of a lock's header."""
    fields = {}
    for line in lock_text.splitlines():
        key, sep, value = line.removeprefix("# ").partition(": ")
        if line.startswith("# ") and sep and key in (HASH_KEY, PYTHON_KEY):
            fields[key] = value.strip()
    return fields


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROFILES:
        print(__doc__, file=sys.stderr)
        return 2
    python = "{}.{}".format(*sys.version_info[:2])
    print(header(load_pyproject(), argv[0], python), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Backend settings for every entry point that starts verl: the OPD trainer and verl's own ``main_ppo``.

On a machine without a GPU verl needs the CPU backend's hydra overrides and environment
(``common.cpu_backend``); on a GPU node only the extra modules every verl process must import. Two
ways in, one set of rules:

* :func:`apply_to_config` for an entry point that composes the config itself (``opd.main_opd``);
* the CLI for an unmodified verl entry point, which only sees its command line::

      python -m common.launch [--dry-run] [--module M] [--gpu-default KEY=VALUE] -- \\
          python -m verl.trainer.main_ppo key=value ...

  adds the backend overrides the command does not set itself, checks the installed verl against
  ``common.verl_surface``, exports the environment and execs the command (``--dry-run``: prints it
  instead, one argument per line after the first, and checks nothing).

An override the user gave always wins over a backend default for the same key.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable, Sequence

from common import cpu_backend
from common.verl_surface import VerlSurfaceError, check_verl_surface

# Set in the driver and every Ray actor on the CPU backend.
CPU_ENV_KEYS = ("VERL_PLATFORM", "PYTHONPATH", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
EXTERNAL_MODULES_VAR = "VERL_USE_EXTERNAL_MODULES"


def override_key(override: str) -> str:
    """``key`` of a hydra override ``[+|++|~]key=value``."""
    return override.split("=", 1)[0].lstrip("+~")


def backend_overrides(user_keys: Iterable[str] = (), gpu_defaults: Sequence[str] = ()) -> list[str]:
    """Hydra overrides (command-line syntax) for this machine's backend, minus the keys in ``user_keys``.

    ``gpu_defaults`` are applied only when a GPU is used: settings such as the rollout engine whose
    CPU value the CPU backend already sets.
    """
    keys = set(user_keys)
    overrides = cpu_backend.cpu_hydra_overrides() if cpu_backend.use_cpu_backend() else list(gpu_defaults)
    return [o for o in overrides if override_key(o) not in keys]


def backend_env(extra_modules: Sequence[str] = (), base: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to export: the CPU backend's (on CPU) and ``extra_modules`` in the external modules."""
    base = dict(os.environ if base is None else base)
    env: dict[str, str] = {}
    if cpu_backend.use_cpu_backend():
        cpu_env = cpu_backend.cpu_run_env(base)
        env = {key: cpu_env[key] for key in CPU_ENV_KEYS if key in cpu_env}
        base[EXTERNAL_MODULES_VAR] = cpu_env[EXTERNAL_MODULES_VAR]
    present = [m for m in base.get(EXTERNAL_MODULES_VAR, "").split(",") if m]
    modules = present + [m for m in extra_modules if m not in present]
    if modules:
        env[EXTERNAL_MODULES_VAR] = ",".join(modules)
    return env


def apply_to_config(
    config, user_keys: Iterable[str] = (), extra_modules: Sequence[str] = ()
) -> dict[str, str]:
    """Merge the backend overrides into a composed verl config and export the environment.

    The variables go into ``os.environ`` and into Ray's ``runtime_env``, so actors started on an
    existing cluster see them as well. Returns the exported variables.
    """
    from omegaconf import OmegaConf, open_dict

    overrides = [o.lstrip("+") for o in backend_overrides(user_keys)]
    env = backend_env(extra_modules)
    os.environ.update(env)
    with open_dict(config):
        config.merge_with(OmegaConf.from_dotlist(overrides))
        env_vars = config.ray_kwargs.ray_init.setdefault("runtime_env", {}).setdefault("env_vars", {})
        for key, value in env.items():
            env_vars[key] = value
    return env


def build_command(command: Sequence[str], gpu_defaults: Sequence[str] = ()) -> list[str]:
    """``command`` with the backend overrides inserted before its own (which therefore win)."""
    overrides_at = (i for i, arg in enumerate(command) if "=" in arg and not arg.startswith("-"))
    split = next(overrides_at, len(command))
    user_keys = {override_key(arg) for arg in command[split:] if "=" in arg}
    return [*command[:split], *backend_overrides(user_keys, gpu_defaults), *command[split:]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--module", action="append", default=[], help="extra module for every verl process")
    parser.add_argument("--gpu-default", action="append", default=[], help="KEY=VALUE used only on a GPU")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its overrides")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    final = build_command(command, args.gpu_default)
    env = backend_env(args.module)
    backend = "cpu" if cpu_backend.use_cpu_backend() else "gpu"
    if args.dry_run:
        print(f"# backend: {backend}")
        for key, value in sorted(env.items()):
            print(f"export {key}={shlex.quote(value)}")
        print(" \\\n  ".join(shlex.quote(arg) for arg in final))
        return
    # before exec, so a verl other than the pinned one stops here with the missing names
    try:
        check_verl_surface()
    except VerlSurfaceError as error:
        raise SystemExit(f"[launch] {error}") from None
    print(f"[launch] backend {backend}: {shlex.join(final[:3])} ...", flush=True)
    os.environ.update(env)
    os.execvp(final[0], final)


if __name__ == "__main__":
    main(sys.argv[1:])

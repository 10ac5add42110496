"""The training scripts' console: every line of the trainer goes to the run's log file, a few to the screen.

A run through Ray prints thousands of lines (each worker's library warnings, per-sample notices, the
config dump); a person needs the set-up summary, one progress line per step, validation, the end summary,
the project's warnings (once each) and, when something breaks, everything from the first error on.
``scripts/lib/opd.sh`` puts one filter on the trainer's stdout and one on its stderr::

    python -m opd.console --log RUN_DIR/train.log [--all] < trainer output

``--all`` (``OPD_VERBOSE=1``) shows every line and still writes the log.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

WARNING_TAG = "[opd] warning:"
# the prefix Ray puts on lines it forwards from an actor or task, in colour or not:
# "(TaskRunner pid=123) ", "\x1b[36m(WorkerDict pid=7, ip=10.0.0.1)\x1b[0m "
_COLOUR = r"(?:\x1b\[[0-9;]*m)?"
_RAY_PREFIX = re.compile(rf"^{_COLOUR}\(\w+ pid=\d+(?:, ip=[\d.]+)?\){_COLOUR} ")
_OWN_TAGS = re.compile(r"^\[(?:opd|warm_start|build_tool_database|tool_tasks|[\w.-]+\.sh)\] ")
_ERROR_START = re.compile(
    r"^(?:Traceback \(most recent call last\)|error: |opd: |[\w.]*(?:Error|Exception)(?:\(|:|$))"
)


_warned: set[str] = set()


def warn(logger: logging.Logger, message: str, *args) -> None:
    """Log a warning that needs the user, once per process and ``message`` template (whatever ``args``):
    a condition that recurs every step is counted in a metric, not repeated. The console then shows each
    text once, whichever process logs it."""
    if message in _warned:
        return
    _warned.add(message)
    logger.warning(f"{WARNING_TAG} {message}", *args)


def strip_ray_prefix(line: str) -> str:
    return _RAY_PREFIX.sub("", line, count=1)


def console_lines(lines: Iterable[str], show_all: bool = False) -> Iterator[str]:
    """The lines of ``lines`` (newline-free) a person should see, Ray's prefix removed from the project's own.

    After the first error line (a traceback, an exception line, ``error:``/``opd:`` messages) every line is
    shown, so a failure is never cut short; the project's warnings are shown once each.
    """
    failing, warned = show_all, set()
    for line in lines:
        text = strip_ray_prefix(line)
        if not failing and _ERROR_START.match(text):
            failing = True
        if failing:
            yield line
        elif WARNING_TAG in text:
            # loggers may put a level or a time stamp before the message
            text = text[text.index(WARNING_TAG) :]
            if text not in warned:
                warned.add(text)
                yield text
        elif _OWN_TAGS.match(text):
            yield text


def _input_lines(stream) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opd.console", description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives every line (appended)")
    parser.add_argument("--all", action="store_true", help="show every line, not only the summary lines")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: the filter must outlive the trainer to show how it stopped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a", encoding="utf-8", buffering=1) as log:

        def logged() -> Iterator[str]:
            for line in _input_lines(sys.stdin):
                log.write(line + "\n")
                yield line

        for line in console_lines(logged(), show_all=args.all):
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""Per-benchmark accuracy, mean@k and pass@k from a verl validation run (``trainer.val_only=True``).

Two sources, both written by verl itself:

* the validation dump (``trainer.validation_data_dir``, one ``<step>.jsonl``): one line per sample.
  With the ``eval.scoring`` reward every line carries its ``data_source`` and ``prompt_id``, so the
  numbers here are exact: accuracy (fraction of samples with a positive score), mean@n (mean score of
  the n samples per prompt) and the unbiased pass@k estimator of Chen et al. (2021);
* verl's validation metrics (``val-core/<data_source>/<var>/<metric>``), from its file logger
  (``VERL_FILE_LOGGER_PATH``) or its console lines. verl's ``best@k/mean`` is a bootstrap estimate
  that undercounts pass@k at k = n, so it is kept only as a cross-check (``verl_metrics``).

CLI::

    python -m eval.report --generations DIR [--metrics FILE] [--model NAME] --json OUT.json --markdown OUT.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCHMARK_PREFIX = "opd/"
_METRIC_KEY = re.compile(
    r"^val-(?:core|aux)/(?P<source>.+)/(?P<var>[^/]+)/(?P<metric>(?:mean|std)@\d+|(?:best|worst|maj)@\d+/(?:mean|std))$"
)
_CONSOLE_STEP = re.compile(r"step:(\d+) - (.*)")
# verl's console logger prints numpy scalars by their repr: ``np.float64(0.75)``
_NUMPY_REPR = re.compile(r"^np\.\w+\((.*)\)$")


def benchmark_name(data_source: str) -> str:
    """``opd/math500`` -> ``math500``; other data sources keep their name."""
    return data_source[len(BENCHMARK_PREFIX) :] if data_source.startswith(BENCHMARK_PREFIX) else data_source


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def report_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n: the k verl reports too."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


# ---------------------------------------------------------------------------- validation dump


def load_generations(path: str | Path) -> list[dict]:
    """Rows of a validation dump: the file itself, or the latest ``<step>.jsonl`` in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not files:
            raise FileNotFoundError(f"no validation dump (*.jsonl) in {path}")
        path = files[-1]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_generations(rows: Iterable[dict]) -> dict[str, dict]:
    """``{benchmark: stats}`` from dump rows carrying ``data_source`` (``eval.scoring``) and ``score``."""
    by_source: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if "data_source" not in row:
            raise ValueError("dump rows carry no data_source: evaluate with the eval.scoring reward")
        # samples of one prompt share its id; rows without extra_info.index fall back to the prompt text
        key = row.get("prompt_id") or row["input"]
        by_source[row["data_source"]][key].append(float(row["score"]))
    return {
        benchmark_name(source): _sample_stats(source, prompts)
        for source, prompts in sorted(by_source.items())
    }


def _sample_stats(source: str, prompts: dict[str, list[float]]) -> dict:
    scores = list(prompts.values())
    n = min(len(s) for s in scores)
    stats = {
        "data_source": source,
        "num_prompts": len(scores),
        "samples_per_prompt": n,
        "accuracy": _mean(float(x > 0) for s in scores for x in s),
        f"mean@{n}": _mean(_mean(s) for s in scores),
    }
    for k in report_ks(n):
        stats[f"pass@{k}"] = _mean(pass_at_k(len(s), sum(x > 0 for x in s), k) for s in scores)
    return stats


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- verl's metrics


def load_validation_metrics(path: str | Path) -> dict[str, float]:
    """The last record with validation metrics, from verl's file logger (JSONL) or a console log."""
    text = Path(path).read_text(errors="replace")
    records: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line).get("data", {}))
            except json.JSONDecodeError:
                pass
    if not records:
        for match in _CONSOLE_STEP.finditer(text):
            pairs = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
            records.append(dict(pairs))
    validation = [r for r in records if any(str(key).startswith("val-") for key in r)]
    if not validation:
        raise ValueError(f"no validation metrics in {path}")
    return {k: _number(v) for k, v in validation[-1].items() if _METRIC_KEY.match(str(k))}


def _number(value) -> float:
    match = _NUMPY_REPR.match(str(value).strip())
    return float(match.group(1) if match else value)


def summarize_metrics(metrics: dict[str, float]) -> dict[str, dict]:
    """``{benchmark: {"mean@n", "best@k/mean", ...}}`` of verl's core variable (``acc``, else ``reward``)."""
    by_source: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in metrics.items():
        match = _METRIC_KEY.match(key)
        if match:
            by_source[match["source"]][match["var"]][match["metric"]] = value
    summary = {}
    for source, variables in sorted(by_source.items()):
        core = variables.get("acc") or variables.get("reward") or {}
        summary[benchmark_name(source)] = {"data_source": source, **dict(sorted(core.items()))}
    return summary


# ---------------------------------------------------------------------------- report


def build_report(
    generations: Sequence[dict] | None = None,
    metrics: dict[str, float] | None = None,
    **info: object,
) -> dict:
    """``benchmarks`` (exact, from the dump), ``verl_metrics`` (cross-check) and the ``info`` items."""
    if generations is None and metrics is None:
        raise ValueError("need the validation dump or verl's validation metrics")
    report: dict = {key: value for key, value in info.items() if value is not None}
    if generations is not None:
        report["benchmarks"] = summarize_generations(generations)
    if metrics is not None:
        report["verl_metrics"] = summarize_metrics(metrics)
        report.setdefault(
            "benchmarks", {name: _from_verl(stats) for name, stats in report["verl_metrics"].items()}
        )
    return report


def _from_verl(stats: dict) -> dict:
    """Dump missing: mean@n as accuracy, verl's bootstrap best@k as pass@k (approximate)."""
    n = max(int(key.split("@")[1].split("/")[0]) for key in stats if "@" in key)
    out = {"data_source": stats["data_source"], "samples_per_prompt": n, "accuracy": stats[f"mean@{n}"]}
    out[f"mean@{n}"] = stats[f"mean@{n}"]
    out["pass@1"] = stats[f"mean@{n}"]
    for key, value in stats.items():
        if key.startswith("best@") and key.endswith("/mean"):
            out[f"pass@{key[5:-5]}"] = value
    return out


def to_markdown(report: dict) -> str:
    """One row per benchmark: prompts, samples per prompt, accuracy, mean@n, pass@k."""
    benchmarks = report["benchmarks"]
    metric_cols = sorted(
        {key for stats in benchmarks.values() for key in stats if key.startswith(("mean@", "pass@"))},
        key=lambda key: (key.startswith("pass@"), int(key.split("@")[1])),
    )
    header = ["benchmark", "prompts", "n", "accuracy", *metric_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in benchmarks.items():
        cells = [name, str(stats.get("num_prompts", "")), str(stats["samples_per_prompt"])]
        cells += [_fmt(stats.get(col)) for col in ("accuracy", *metric_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    title = f"# Evaluation: {report['model']}\n\n" if report.get("model") else ""
    return title + "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", help="validation dump: a <step>.jsonl or the folder holding it")
    parser.add_argument("--metrics", help="verl's file-logger JSONL or a console log of the run")
    parser.add_argument("--model", help="name shown in the report")
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--markdown", required=True, help="output markdown table")
    parser.add_argument("--info", action="append", default=[], help="KEY=VALUE recorded in the report")
    args = parser.parse_args(argv)
    generations = load_generations(args.generations) if args.generations else None
    metrics = load_validation_metrics(args.metrics) if args.metrics else None
    info = dict(item.split("=", 1) for item in args.info)
    report = build_report(generations, metrics, model=args.model, **info)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    Path(args.markdown).write_text(markdown)
    print(markdown, end="")
    return report


if __name__ == "__main__":
    main()

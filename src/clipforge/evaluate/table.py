"""``clipforge eval table``: result JSON files side by side, as CLIP_benchmark's ``build`` gathers them.

A sweep (checkpoints x datasets x tasks) leaves one JSON per run; this reads them back and prints one Markdown table
per task (a row per result, a column per metric, in percent) and optionally writes every metric to a CSV with one
row per result, the columns CLIP_benchmark's ``build`` writes (``dataset``, ``model``, ``pretrained``, ``task``,
``language``, then the metrics).
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

IDENTITY = ("dataset", "model", "pretrained", "task", "language")
# counts and sizes, printed as they are; every other numeric metric is a fraction, printed in percent
_COUNTS = {"n_images", "n_captions", "images", "n_samples", "ties", "skipped"}


def load_results(paths: list[str]) -> list[dict]:
    """The result dicts of ``paths``: files, which must be ``eval`` results (else an error naming the file), or
    folders, searched for ``*.json`` results (other JSON files there, such as a run's config, are passed over)."""
    named: list[Path] = []
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            named.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    results = [_read(file, strict=True) for file in named] + [_read(file, strict=False) for file in found]
    results = [r for r in results if r is not None]
    if not results:
        raise ValueError(f"no eval results in {', '.join(paths)}")
    return results


def _read(file: Path, strict: bool) -> dict | None:
    try:
        result = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if strict:
            raise ValueError(f"{file}: not a JSON file ({exc})") from None
        return None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) or "task" not in result:
        if strict:
            raise ValueError(f"{file}: not a result of `clipforge eval` or CLIP_benchmark (no 'task' and 'metrics')")
        return None
    result["source"] = str(file)
    return result


def natural_key(text: str) -> list:
    """Sort key that orders numbers inside names by value: epoch_2 before epoch_10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _numeric_metrics(result: dict) -> dict:
    return {k: v for k, v in result["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cell(name: str, value) -> str:
    if value is None:
        return ""
    if name in _COUNTS:
        return str(int(value))
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def _name(result: dict) -> str:
    """How a result's model reads in a table: the checkpoint (or tag) it was loaded from, with the architecture."""
    model, pretrained = result.get("model"), result.get("pretrained")
    if model and pretrained:
        return f"{model} {pretrained}"
    return str(pretrained or model or "(random weights)")


def markdown_tables(results: list[dict]) -> str:
    """One Markdown table per task, rows sorted by dataset then model, metric columns in their first order."""
    tables = []
    for task in sorted({r["task"] for r in results}):
        rows = sorted((r for r in results if r["task"] == task),
                      key=lambda r: (str(r.get("dataset")), natural_key(_name(r))))
        columns = list(dict.fromkeys(k for r in rows for k in _numeric_metrics(r)))
        header = ["dataset", "model", *[c if c in _COUNTS else f"{c} (%)" for c in columns]]
        lines = [f"{task}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            metrics = _numeric_metrics(r)
            cells = [str(r.get("dataset", "")), _name(r), *[_cell(c, metrics.get(c)) for c in columns]]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def metric_matrix(results: list[dict], metric: str) -> str:
    """One Markdown table of one metric (in percent): a row per model, a column per dataset, and their mean where
    a row has every dataset (the leaderboard view)."""
    having = [r for r in results if metric in _numeric_metrics(r)]
    if not having:
        known = sorted({k for r in results for k in _numeric_metrics(r)})
        raise ValueError(f"no result has the metric {metric!r}; these do: {', '.join(known)}")
    datasets = sorted({str(r.get("dataset")) for r in having})
    table: dict[str, dict[str, float]] = {}
    for r in having:  # a later file for the same model and dataset replaces an earlier one
        table.setdefault(_name(r), {})[str(r.get("dataset"))] = _numeric_metrics(r)[metric]
    mean = len(datasets) > 1
    header = ["model", *datasets, *(["mean"] if mean else [])]
    lines = [f"{metric} (%):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(table, key=natural_key):
        row = table[name]
        cells = [_cell(metric, row.get(d)) for d in datasets]
        if mean:
            cells.append(_cell(metric, sum(row.values()) / len(row)) if len(row) == len(datasets) else "")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def write_csv(results: list[dict], path: str) -> None:
    """Every numeric metric of every result, one row each (blank where a result lacks a metric); fractions as
    they are in the JSON."""
    from ..files import atomic_path

    columns = list(dict.fromkeys(k for r in results for k in _numeric_metrics(r)))
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*IDENTITY, *columns, "source"])
        for r in results:
            metrics = _numeric_metrics(r)
            writer.writerow([r.get(k, "") if r.get(k) is not None else "" for k in IDENTITY]
                            + [metrics.get(c, "") for c in columns] + [r["source"]])

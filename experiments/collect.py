"""Merge finished runs' results.json into one per-seed table and one summary table.

    python experiments/collect.py runs/sweeps/hopper-mr [MORE_ROOTS...] --csv out.csv --md out.md

Without --csv and --md the Markdown (both tables) goes to stdout. Every results.json under the roots is
read; a workdir (a folder holding config.json) without one is unfinished: it is named on stderr and left
out, so collecting while a sweep still runs gives the finished part rather than failing.

Why the hyperparameter columns are found rather than declared: the config values (flattened with '.')
that differ between the collected runs are exactly what a sweep varied, so the tables need no knowledge
of the spec and also work for runs started by hand. The base seed is excluded (it is the `seed` column).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

BASE_COLUMNS = ["workdir", "dataset", "env", "stage", "seed", "return", "normalized_score"]
SCORE = "normalized_score"


class CollectError(Exception):
    """A problem that makes the tables wrong (corrupt results, missing root); printed as one line."""


def find_runs(roots: list[str]) -> tuple[list[str], list[str]]:
    """(results.json paths, unfinished workdirs) under the roots, each in sorted order, deduplicated.

    The walk does not descend into a workdir: its checkpoints hold many files and no further runs."""
    results, unfinished, seen = [], [], set()
    for root in roots:
        if not os.path.isdir(root):
            raise CollectError(f"{root}: not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "results.json" not in filenames and "config.json" not in filenames:
                continue
            dirnames[:] = []
            if os.path.realpath(dirpath) in seen:
                continue
            seen.add(os.path.realpath(dirpath))
            if "results.json" in filenames:
                results.append(os.path.join(dirpath, "results.json"))
            else:
                unfinished.append(dirpath)
    return results, unfinished


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_results(path: str) -> dict:
    """Read one results.json and check the fields the tables use, so a bad file fails loudly by name."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CollectError(f"{path}: corrupt results.json: {e}") from None
    problem = None
    if not isinstance(res, dict):
        problem = "not an object"
    elif not isinstance(res.get("final"), dict):
        problem = "'final' missing or not an object"
    elif not isinstance(res.get("seed"), int) or isinstance(res.get("seed"), bool):
        problem = "'seed' missing or not an integer"
    elif not isinstance(res.get("config", {}), dict):
        problem = "'config' is not an object"
    else:
        for stage, scores in res["final"].items():
            returns = scores.get("return") if isinstance(scores, dict) else None
            if not isinstance(returns, list) or not all(map(_is_number, returns)):
                problem = f"final.{stage}.return missing or not a list of numbers"
                break
            norm = scores.get(SCORE)
            if norm is not None and (not isinstance(norm, list) or len(norm) != len(returns)
                                     or not all(map(_is_number, norm))):
                problem = f"final.{stage}.{SCORE} is not a list of {len(returns)} numbers"
                break
    if problem:
        raise CollectError(f"{path}: corrupt results.json: {problem}")
    return res


def flatten(config: dict, prefix: str = "") -> dict:
    """{'awac': {'tau': 0.005}} -> {'awac.tau': 0.005}; lists become 'a,b' as on the command line."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


def varied_keys(configs: list[dict]) -> list[str]:
    """Flattened config keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({k for c in configs for k in c} - {"seed"})
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def collect(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Per-seed rows (one per workdir, stage, seed index) and the varied hyperparameter columns."""
    loaded = [(os.path.dirname(p), load_results(p)) for p in paths]
    configs = [flatten(res.get("config", {})) for _, res in loaded]
    varied = varied_keys(configs)
    columns = [f"config.{k}" if k in BASE_COLUMNS else k for k in varied]
    rows = []
    for (workdir, res), config in zip(loaded, configs):
        hyper = {col: config.get(k) for col, k in zip(columns, varied)}
        for stage, scores in res["final"].items():
            norm = scores.get(SCORE) or [None] * len(scores["return"])
            for i, (ret, score) in enumerate(zip(scores["return"], norm)):
                rows.append({"workdir": workdir, "dataset": res.get("dataset"), "env": res.get("env"),
                             "stage": stage, "seed": res["seed"] + i, "return": ret, SCORE: score,
                             **hyper})
    return rows, columns


def _sort_key(values) -> tuple:
    """Numbers numerically, then everything else as text, so 2 < 10 and None sorts first."""
    return tuple((0, "", 0.0) if v is None else (1, "", float(v)) if _is_number(v) else (2, str(v), 0.0)
                 for v in values)


def summarize(rows: list[dict], columns: list[str]) -> list[dict]:
    """n, mean and sample std of normalized_score per (dataset, stage, varied hyperparameters)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["dataset"], row["stage"], *(row[c] for c in columns))
        groups.setdefault(key, [])
        if row[SCORE] is not None:
            groups[key].append(row[SCORE])
    out = []
    for key in sorted(groups, key=_sort_key):
        scores = groups[key]
        out.append({"dataset": key[0], "stage": key[1], **dict(zip(columns, key[2:])), "n": len(scores),
                    f"{SCORE} mean": statistics.fmean(scores) if scores else None,
                    f"{SCORE} std": statistics.stdev(scores) if len(scores) > 1 else None})
    return out


def _cell(value, metric: bool) -> str:
    if value is None:
        return ""
    if metric and isinstance(value, float) and math.isfinite(value):
        return f"{value:.2f}"
    return re.sub(r"([|\\])", r"\\\1", str(value)).replace("\n", " ")


def markdown_table(records: list[dict], header: list[str], metrics: set[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_cell(r[h], h in metrics) for h in header) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], columns: list[str]) -> str:
    summary = summarize(rows, columns)
    mean, std = f"{SCORE} mean", f"{SCORE} std"
    return "\n".join([
        "## Summary (normalized score over seeds; std with ddof=1)", "",
        markdown_table(summary, ["dataset", "stage", *columns, "n", mean, std], {mean, std}), "",
        "## Per-seed results", "",
        markdown_table(rows, [*BASE_COLUMNS, *columns], {"return", SCORE}), "",
    ])


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*BASE_COLUMNS, *columns])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--csv", help="write the per-seed rows here")
    parser.add_argument("--md", help="write the summary and per-seed Markdown tables here")
    args = parser.parse_args(argv)
    try:
        paths, unfinished = find_runs(args.roots)
        rows, columns = collect(paths)
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for workdir in unfinished:
        print(f"unfinished: {workdir}", file=sys.stderr)
    if not paths:
        print(f"no finished runs under {' '.join(args.roots)}", file=sys.stderr)
    text = markdown(rows, columns)
    try:
        if args.csv:
            write_csv(args.csv, rows, columns)
        if args.md:
            with open(args.md, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        print(f"error: {e.filename}: cannot write: {e.strerror}", file=sys.stderr)
        return 1
    if not (args.csv or args.md):
        sys.stdout.write(text)
    print(f"collected {len(paths)} finished run(s), {len(rows)} row(s); {len(unfinished)} unfinished",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

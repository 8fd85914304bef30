"""Print a run's learning curve (every evaluation in WORKDIR/metrics.jsonl) as a Markdown table.

    python experiments/curve.py WORKDIR [--metrics rollout_fraction_terminated,q_data]

One row per evaluation: stage, step (AWAC gradient steps; MB2PO iterations), mean return and normalised
score over seeds (and the per-seed values when there are several). --metrics adds, per named training
metric, the per-seed values the same stage logged at the same step (blank where it logged none).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(workdir: str) -> list[dict]:
    return [r for r in records(workdir) if "normalized_score" in r]


def _seeds(values, fmt: str = ".1f") -> str:
    values = values if isinstance(values, list) else [values]
    mean = sum(values) / len(values)
    return f"{mean:{fmt}}" + (f" ({', '.join(f'{x:{fmt}}' for x in values)})" if len(values) > 1 else "")


def table(workdir: str, metrics: list[str]) -> str:
    every = records(workdir)
    logged = {(r["stage"], r["step"]): r for r in every if "normalized_score" not in r}  # the last per step
    lines = ["| stage | step | return | normalised score |" + "".join(f" {m} |" for m in metrics),
             "|---|---|---|---|" + "---|" * len(metrics)]
    for r in (r for r in every if "normalized_score" in r):
        train = logged.get((r["stage"], r["step"]), {})
        extra = "".join(f" {_seeds(train[m], '.4g') if m in train else ''} |" for m in metrics)
        lines.append(f"| {r['stage']} | {r['step']} | {_seeds(r['return'])} | {_seeds(r['normalized_score'])} |"
                     + extra)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--metrics", default="", help="comma-separated training metrics to add as columns")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.workdir, "metrics.jsonl")):
        print(f"error: {args.workdir}: no metrics.jsonl (not a mb2po-train workdir?)", file=sys.stderr)
        return 1
    print(table(args.workdir, [m for m in args.metrics.split(",") if m]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

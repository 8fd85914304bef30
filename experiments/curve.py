"""Print a run's learning curve (every evaluation in WORKDIR/metrics.jsonl) as a Markdown table.

    python experiments/curve.py runs/evidence/hopper-mr-cpu-1seed

One row per evaluation: stage, step (AWAC gradient steps; MB2PO iterations), mean return and normalised
score over seeds (and the per-seed values when there are several).
"""
from __future__ import annotations

import json
import os
import sys


def curve(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "normalized_score" in record:
                rows.append(record)
    return rows


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(argv[0], "metrics.jsonl")):
        print(f"error: {argv[0]}: no metrics.jsonl (not a mb2po-train workdir?)", file=sys.stderr)
        return 1
    print("| stage | step | return | normalised score |\n|---|---|---|---|")
    for r in curve(argv[0]):
        ret, norm = r["return"], r["normalized_score"]
        mean = lambda xs: sum(xs) / len(xs)
        per_seed = f" ({', '.join(f'{x:.1f}' for x in norm)})" if len(norm) > 1 else ""
        print(f"| {r['stage']} | {r['step']} | {mean(ret):.1f} | {mean(norm):.1f}{per_seed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

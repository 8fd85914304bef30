"""Summarise the critic ablation (experiments/sweeps/critic_ablation.json) as a Markdown table.

    python experiments/sweep.py experiments/sweeps/critic_ablation.json array --out /tmp/ablation.sh
    bash /tmp/ablation.sh                       # the 8 runs, one after another (resumable)
    python experiments/critic_ablation.py runs/sweeps/critic-ablation

One row per (dataset, critic, value transform): the final AWAC evaluation's normalised score (mean +/- std
over seeds, and each seed), the mean over every evaluation of the run (less noisy than the last one alone),
and the update rate (AWAC updates per second for all seeds together, the median of the logged calls).
"""
from __future__ import annotations

import json
import os
import statistics
import sys


def summarise(workdir: str) -> dict | None:
    """The row of one finished run, or None if it has no results.json yet."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return None
    awac = results["config"]["awac"]
    final = results["final"]["awac"]["normalized_score"]
    evals = [statistics.fmean(r["normalized_score"]) for r in records if "normalized_score" in r]
    rates = [r["updates_per_s"] for r in records if "updates_per_s" in r]
    return {"dataset": results["dataset"], "critic": awac["critic"], "transform": awac["value_transform"],
            "final": final, "eval_mean": statistics.fmean(evals), "rate": statistics.median(rates)}


def table(rows: list[dict]) -> str:
    lines = ["| dataset | critic | value transform | final score (mean +/- std) | seeds | mean of all evals "
             "| updates/s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["critic"] != "twin", r["transform"])):
        spread = statistics.pstdev(r["final"]) if len(r["final"]) > 1 else 0.0
        seeds = ", ".join(f"{s:.1f}" for s in r["final"])
        lines.append(f"| {r['dataset']} | {r['critic']} | {'h' if r['transform'] else '-'} | "
                     f"{statistics.fmean(r['final']):.1f} +/- {spread:.1f} | {seeds} | {r['eval_mean']:.1f} | "
                     f"{r['rate']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    root = argv[0]
    if not os.path.isdir(root):
        print(f"error: {root}: no such sweep directory", file=sys.stderr)
        return 1
    rows = [r for name in sorted(os.listdir(root)) if (r := summarise(os.path.join(root, name)))]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

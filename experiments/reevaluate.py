"""Re-evaluate finished runs' final AWAC and MB2PO policies with many episodes, and tabulate the result.

    python experiments/reevaluate.py --out results/probes/reevaluations --episodes 100 LABEL=WORKDIR ...
    python experiments/reevaluate.py --out results/probes/reevaluations      # only the table, from the files

A run's recorded final score is its last evaluation: --final_eval_episodes episodes per seed (100 at the cpu
and paper presets; runs made before that flag: --eval_episodes, 10). Over 10 episodes on walker2d and hopper
one fall more or less moves it by several points, the size of the paper's 3-point bound. This runs
`mb2po-eval WORKDIR --stage S --seed K --episodes N` for each stage and seed (progress on stderr), keeps each
JSON line as OUT/LABEL/S_seedK.json (an existing file is kept: rerun to resume), and prints one Markdown row
per label: mean normalised score over the N episodes per seed, its standard error, the episodes that ended
before the time limit, and the recorded final score beside them with its episode count (from
WORKDIR/results.json, copied as OUT/LABEL/recorded.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from mb2po_jax import config as config_lib

STAGES = ("awac", "mb2po")


def evaluate(out: str, label: str, workdir: str, episodes: int) -> None:
    target = os.path.join(out, label)
    os.makedirs(target, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, "results.json"), os.path.join(target, "recorded.json"))
    seeds = int(json.load(open(os.path.join(target, "recorded.json")))["num_seeds"])
    for stage in STAGES:
        for seed in range(seeds):
            path = os.path.join(target, f"{stage}_seed{seed}.json")
            if os.path.exists(path):
                continue
            print(f"reevaluate: {label} {stage} seed {seed} ({episodes} episodes)", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, "-m", "mb2po_jax.eval_cli", workdir, "--stage", stage,
                                   "--seed", str(seed), "--episodes", str(episodes)],
                                  stdout=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(f"error: mb2po-eval {workdir} --stage {stage} --seed {seed} exited {done.returncode}")
            with open(path + ".tmp", "w") as f:
                f.write(done.stdout)
            os.replace(path + ".tmp", path)


def _scores(d: dict) -> list[float]:
    """Per-episode normalised scores (the score is affine in the return)."""
    from mb2po_jax.data.registry import normalized_score
    return [float(x) for x in normalized_score(d["env"], d["returns"])]


def _seeds(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ({', '.join(f'{x:.1f}' for x in values)})"


def table(out: str) -> str:
    lines = ["| run | stage | recorded (episodes) | N episodes: mean (per seed) | standard error per seed "
             "| episodes ended early per seed |", "|---|---|---|---|---|---|"]
    for label in sorted(os.listdir(out)):
        record = json.load(open(os.path.join(out, label, "recorded.json")))
        recorded, config = record["final"], record["config"]
        for stage in STAGES:
            episodes = config_lib.recorded_final_episodes(config, recorded[stage]) or 10
            runs = [json.load(open(os.path.join(out, label, f"{stage}_seed{k}.json")))
                    for k in range(len(recorded[stage]["normalized_score"]))]
            scores = [_scores(d) for d in runs]
            limit = [int(d.get("max_episode_steps") or 1000) for d in runs]
            lines.append(
                f"| {label} | {stage} | {_seeds(recorded[stage]['normalized_score'])} ({episodes} each) "
                f"| {_seeds([statistics.fmean(s) for s in scores])} ({len(scores[0])} each) "
                f"| {', '.join(f'{statistics.stdev(s) / len(s) ** 0.5:.1f}' for s in scores)} "
                f"| {', '.join(str(sum(n < m for n in d['lengths'])) for d, m in zip(runs, limit))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder of LABEL/STAGE_seedK.json files")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("runs", nargs="*", metavar="LABEL=WORKDIR", help="finished mb2po-train workdirs")
    args = parser.parse_args()
    for run in args.runs:
        label, sep, workdir = run.partition("=")
        if not sep or not os.path.exists(os.path.join(workdir, "results.json")):
            sys.exit(f"error: {run}: expected LABEL=WORKDIR of a finished mb2po-train run (with results.json)")
        evaluate(args.out, label, workdir, args.episodes)
    print(table(args.out))


if __name__ == "__main__":
    main()

"""Exporting a finished behaviour run as the small assets that the SAC-based dataset kinds are made from.

Medium-replay that ships with the package (design). The exact data is a run's replay log (hopper: about
30 floats x the medium step, ~30-60 MB as float32): too big for git. Two ways to rebuild it from a clean
checkout were weighed:
  1. a deterministic re-run of SAC up to the medium step: 0.1-0.4 M updates at ~5 ms on 2 CPU cores is
     10-40 minutes, not "minutes", and it is only bit-exact on the same CPU kind, XLA version and thread
     count (XLA's CPU kernels differ between AVX2 and AVX-512, and SAC amplifies last-bit differences);
  2. actor snapshots along the run: the stochastic policy of the snapshot taken at step s (acting policy of
     env steps (s, s + eval_every]) is rolled out for those steps, uniform random actions for the
     warm-up steps [0, start_steps). Cost: one actor forward pass + one MuJoCo step per transition, about a
     minute for 300 k transitions; size: ~70 k parameters per snapshot (~140 KB as float16), so a snapshot
     every 10-20 k steps up to medium is a few MB per environment.
We use (2). It is an approximation of the true buffer: the same sequence of behaviour policies at the
snapshot granularity (in training the acting policy changes every `steps_per_call` steps; here every
`replay_every` steps), with fresh environment randomness instead of the training run's; episodes run
across policy switches as in training. Measured: hopper, 40 k transitions regenerated in 18 s.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mb2po_jax.behavior.policies import load_actor, save_actor
from mb2po_jax.behavior.rundir import read_evaluations, read_run, select_policies
from mb2po_jax.data import registry


def export_assets(workdir: str, out_dir: str, *, replay_every: int = 10_000, replay_dtype=np.float16) -> dict:
    """Writes what rebuilding the datasets needs to `out_dir` (e.g. mb2po_jax/behavior/assets/hopper):
    expert.npz and medium.npz (float32, exactly the evaluated policies), replay_<step>.npz (the actors
    of medium-replay, every `replay_every` env steps up to the medium step, `replay_dtype`), manifest.json,
    and training_curve.json (the run's evaluations, `write_training_curve`).

    Medium-replay regeneration (an approximation of the true replay buffer, see the module docstring):
    steps [0, start_steps) uniform random actions; then for each listed snapshot at step s, its stochastic
    policy for env steps [max(s, start_steps), next snapshot's step or `transitions`).
    """
    summary = select_policies(workdir, registry.env_id_for(read_run(workdir)["env_id"]))
    if summary["medium"] is None:
        raise ValueError(f"{workdir}: no medium policy found: {summary}")
    run = read_run(workdir)
    os.makedirs(out_dir, exist_ok=True)
    for kind in ("expert", "medium"):
        params, info = load_actor(os.path.join(workdir, summary[kind]["snapshot"]))
        save_actor(os.path.join(out_dir, f"{kind}.npz"), params, **info)
    medium_step = summary["medium"]["step"]
    start_steps = run["config"]["start_steps"]
    replay = _export_replay_actors(workdir, out_dir, start_steps, medium_step, replay_every, replay_dtype)
    manifest = {
        "env_id": summary["env_id"],
        "seed": run["seed"],
        "expert": {**summary["expert"], "file": "expert.npz"},
        "medium": {**summary["medium"], "file": "medium.npz"},
        "medium_target_return": summary["medium_target_return"],
        "medium_replay": {"transitions": medium_step, "random_steps": start_steps, "snapshots": replay},
        "sac_config": run["config"]["sac"],
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    write_training_curve(workdir, os.path.join(out_dir, "training_curve.json"))
    return manifest


def _export_replay_actors(workdir: str, out_dir: str, start_steps: int, medium_step: int, replay_every: int,
                          replay_dtype) -> list[dict]:
    """Copies the snapshots at start_steps, + replay_every, ... below `medium_step` as replay_<step>.npz in
    `replay_dtype`; returns their manifest entries [{"step", "file"}]."""
    replay = []
    for step in range(start_steps, medium_step, replay_every):
        path = os.path.join(workdir, "snapshots", f"actor_{step:09d}.npz")
        if not os.path.exists(path):  # the run saves a snapshot at every evaluation; warm-up has none
            continue
        params, info = load_actor(path, dtype=replay_dtype)
        name = f"replay_{step:09d}.npz"
        save_actor(os.path.join(out_dir, name), params, **info)
        replay.append({"step": step, "file": name})
    if not replay or replay[0]["step"] > start_steps:
        raise ValueError(f"{workdir}: no snapshot at the end of warm-up (step {start_steps})")
    return replay


def write_training_curve(workdir: str, path: str) -> None:
    """The run's evaluation curve (step, return, normalised score, wall seconds since the previous
    evaluation), rounded to 0.1: the record of how the shipped policies were reached, kept beside them."""
    run = read_run(workdir)
    config = run["config"]

    def point(e):
        out = {"step": e["step"], "return": round(float(e["return"]), 1)}
        for key in ("normalized_score", "interval_seconds"):
            if e.get(key) is not None:
                out[key] = round(float(e[key]), 1)
        return out

    curve = {"env_id": registry.env_id_for(run["env_id"]),
             "evaluation": f"{config['eval_episodes']} deterministic episodes every {config['eval_every']} env steps",
             "curve": [point(e) for e in read_evaluations(workdir)]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(curve, f, indent=1)

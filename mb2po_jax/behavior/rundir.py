"""A behaviour run's directory (`train.train_behavior` writes it; `export.export_assets` reads it).

  checkpoints/          orbax checkpoints (`mb2po_jax.checkpoint`), newest two
  replay/               every transition in order (observations, actions, rewards, next_observations,
                        terminals, timeouts), float32/bool, as <start>-<end>.npz segments
  snapshots/actor_<step>.npz   actor parameters (`policies.save_actor`) with the step and evaluation
                        return, one per evaluation (the policy acting from that step on)
  metrics.jsonl         one record per evaluation: step, return (10 deterministic episodes), returns,
                        normalized_score, training-episode returns and the SAC losses
  run.json              env id, seed and `BehaviorConfig`
  behavior.json         at the end: the expert and medium choice (`select_policies`)
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from mb2po_jax.data import registry

STAGE = "behavior"
REPLAY_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


# ------------------------------------------------------------------------------------- replay log
def segment_files(workdir: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of the replay-log segments in `workdir`, in order."""
    out = []
    for path in glob.glob(os.path.join(workdir, "replay", "*.npz")):
        m = re.fullmatch(r"(\d+)-(\d+)\.npz", os.path.basename(path))
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)


def write_segment(workdir: str, start: int, rows: dict[str, np.ndarray]) -> None:
    end = start + len(rows["rewards"])
    path = os.path.join(workdir, "replay", f"{start:09d}-{end:09d}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **rows)
    os.replace(tmp, path)


def load_replay_log(workdir: str, start: int = 0, end: int | None = None) -> dict[str, np.ndarray]:
    """Transitions [start, end) of a run, in order (end None: all that were written)."""
    segments = segment_files(workdir)
    if end is None:
        end = segments[-1][1] if segments else 0
    parts: dict[str, list] = {k: [] for k in REPLAY_FIELDS}
    covered = start
    for s, e, path in segments:
        if e <= start or s >= end:
            continue
        if s > covered:
            raise FileNotFoundError(f"{workdir}/replay: transitions [{covered}, {s}) are missing")
        with np.load(path) as z:
            for k in REPLAY_FIELDS:
                parts[k].append(z[k][max(start - s, 0): min(end, e) - s])
        covered = min(end, e)
    if covered < end:
        raise FileNotFoundError(f"{workdir}/replay: transitions [{covered}, {end}) are missing")
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


# ------------------------------------------------------------------------------------- run.json, metrics
def read_run(workdir: str) -> dict:
    """The run's settings (env_id, seed, config), written to run.json when training starts."""
    with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
        return json.load(f)


def truncate_metrics(workdir: str, step: int) -> None:
    """Drops metrics.jsonl records written after checkpoint `step` (a resumed run writes them again)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # torn last line
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_evaluations(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("stage") == STAGE and "return" in rec:
                out.append(rec)
    return out


# ------------------------------------------------------------------------------------- selection
def select_policies(workdir: str, env_id: str, *, expert_window: float = 0.2,
                    medium_band: tuple[float, float] = (25.0, 50.0), medium_tolerance: float = 0.15,
                    smoothing: int = 1) -> dict:
    """Expert and medium snapshots of a finished run, from its evaluations.

    expert: the best-evaluated snapshot in the last `expert_window` of training (a fully trained policy;
      the window guards against a final evaluation that caught a dip).
    medium: D4RL stops training when the policy reaches about one third of the expert's return: the first
      snapshot whose return, and the mean return of the `smoothing` evaluations on either side of it, are
      within `medium_tolerance` of expert/3 (and whose normalised score lies in `medium_band` when the env
      has reference scores). Early SAC evaluations swing widely (hopper: 240, 1090, 950, 600 at 35-50 k
      steps); the neighbours make "reached" mean a level the run holds, not one lucky evaluation.
      If no snapshot qualifies: the in-band snapshot closest to expert/3 (own and neighbourhood return).
    medium-replay: transitions [0, medium step) (`load_replay_log`); for regeneration, the snapshots up to
      the medium step.
    """
    evals = read_evaluations(workdir)
    if not evals:
        raise ValueError(f"{workdir}: no evaluations")
    last_step = evals[-1]["step"]
    late = [e for e in evals if e["step"] >= (1.0 - expert_window) * last_step]
    expert = max(late, key=lambda e: e["return"])
    target = expert["return"] / 3.0
    has_ref = registry.has_reference_score(env_id)
    returns = np.asarray([e["return"] for e in evals])
    around = [float(returns[max(0, i - smoothing): i + smoothing + 1].mean()) for i in range(len(evals))]

    def in_band(i):
        return (not has_ref) or medium_band[0] <= evals[i]["normalized_score"] <= medium_band[1]

    def miss(i):  # relative distance of the snapshot and of its neighbourhood from the target
        return max(abs(returns[i] - target), abs(around[i] - target)) / abs(target)

    candidates = [i for i, e in enumerate(evals) if e["step"] < expert["step"] and in_band(i)]
    near = [i for i in candidates if miss(i) <= medium_tolerance]
    if near:
        medium = evals[near[0]]
    else:
        medium = evals[min(candidates, key=miss)] if candidates else None

    def describe(e):
        if e is None:
            return None
        return {"step": e["step"], "return": e["return"], "normalized_score": e["normalized_score"],
                "snapshot": os.path.join("snapshots", f"actor_{e['step']:09d}.npz")}

    return {"env_id": env_id, "expert": describe(expert), "medium": describe(medium),
            "medium_target_return": target,
            "medium_replay": None if medium is None else {
                "transitions": medium["step"],
                "snapshots": [describe(e)["snapshot"] for e in evals if e["step"] < medium["step"]]}}

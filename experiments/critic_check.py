"""Are a run's critics plausible? Q(s, a) and the TD error on the run's own dataset rows, per seed.

    python experiments/critic_check.py WORKDIR [--stage awac|mb2po|online] [--rows 20000] [--seed 0] [--json]

A critic that diverged on a small region of the data does not show in the evaluations, and hardly in the
logged critic loss (a mean over batches, and over seeds on the progress line). This reads the stage's
newest checkpoint (default: the newest finished stage with an agent; critics, target critics, actor and
normaliser, not the model ring) and `--rows` random rows of the dataset the run trained on, and prints per
seed:
- Q(s, a) of both twins in return units: mean (of the min over the twins, the value the actor's advantage
  reads), min and max over both twins, and the fraction of rows where a twin is outside the range of
  returns the data's rewards allow: [min(r_lo, r_lo / (1 - gamma)), max(r_hi, r_hi / (1 - gamma))] (an
  episode may end after one step, or go on forever), or is not finite. The range is the offline data's:
  MB2PO's reward r - lambda u can sit below r_lo, and online rewards above r_hi, so at those stages an
  end of the range is a guide, not a bound.
- the squared TD error against the critics' own Bellman target (a' ~ pi(.|s'), min over the target twins),
  summed over the twins as the loss sums it, in return units: mean, median, the share of its sum carried by
  the worst 1 % of the rows, and by the rows outside the range;
- the dataset rows furthest outside the range, with the twin's value there (and with --json every row
  outside it, `outside_rows`, up to 10,000).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax import awac, networks
from mb2po_jax.data import load_dataset
from mb2po_jax.data.envs import env_spaces
from mb2po_jax.errors import Mb2poError, WorkdirError
from mb2po_jax.policy import find_policy, load_agents, seed_of


@jax.jit
def q_and_target(agent: awac.AWACState, obs, actions, rewards, terminals, next_obs, key):
    """Both twins' Q(s, a) [2, B] and the Bellman target [B] of one seed's critics, in return units."""
    config = agent.config
    a = jnp.clip(actions, -1.0 + networks.ACTION_EPS, 1.0 - networks.ACTION_EPS)
    q = awac.critic_network(config).apply(agent.critic_params, agent.normalizer(obs), a)
    y = awac.bellman_target(agent, agent.normalizer(next_obs), rewards, terminals, key)
    return awac.critic_values(q, config), awac.critic_values(y[None], config)[0]


def return_range(rewards: np.ndarray, gamma: float) -> tuple[float, float]:
    """The returns sum_t gamma^t r_t can take with every r_t in [min r, max r] over episodes of any length."""
    lo, hi = float(rewards.min()), float(rewards.max())
    return min(lo, lo / (1.0 - gamma)), max(hi, hi / (1.0 - gamma))


def summarise(q: np.ndarray, y: np.ndarray, rows: np.ndarray, value_range: tuple[float, float],
              worst: int = 5, max_rows: int = 10000) -> dict:
    """The figures of one seed (module docstring) from both twins' Q [2, B], the targets [B], the dataset
    row of each [B] and `return_range`."""
    lo, hi = value_range
    finite = np.isfinite(q).all(0) & np.isfinite(y)
    with np.errstate(invalid="ignore", over="ignore"):
        beyond = np.where(finite, np.maximum(lo - q, q - hi).max(0), np.inf)  # > 0: a twin outside the range
        err = np.where(finite, ((q - y[None]) ** 2).sum(0), 0.0)  # the TD figures are over finite rows
    outside = beyond > 0
    total = err.sum()
    top = np.sort(err[finite])[-max(1, int(finite.sum()) // 100):]
    far = np.argsort(beyond, kind="stable")[::-1][:worst]
    far = far[outside[far]]
    twin = np.nan_to_num(np.abs(q[:, far] - np.clip(q[:, far], lo, hi)), nan=np.inf).argmax(0)  # further out
    return {"q_mean": float(q.min(0)[finite].mean()), "q_min": float(q[:, finite].min(initial=np.inf)),
            "q_max": float(q[:, finite].max(initial=-np.inf)), "range": [float(lo), float(hi)],
            "outside_fraction": float(outside.mean()), "nonfinite": int((~finite).sum()),
            "td_mse": float(err[finite].mean()), "td_median": float(np.median(err[finite])),
            "worst_1pct_share": float(top.sum() / total) if total > 0 else 0.0,
            "outside_share": float(err[outside].sum() / total) if total > 0 else 0.0,
            "furthest": [{"row": int(rows[i]), "q": float(q[t, i])} for i, t in zip(far, twin)],
            "outside_rows": [int(r) for r in rows[outside][:max_rows]]}


def _dataset_of(source) -> str:
    """What the run trained on: the recorded path if it is still a file there, else the dataset argument
    as given (a local or D4RL name, a Minari id, or a path relative to where training started)."""
    config_path = os.path.join(source.workdir, "config.json")
    with open(config_path) as f:
        recorded = json.load(f)
    if not isinstance(recorded, dict):
        raise WorkdirError(f"{config_path}: not a mb2po-train config.json (expected a JSON object)")
    candidates = [recorded.get("dataset_path"), (recorded.get("identity") or {}).get("dataset")]
    candidates = [c for c in candidates if c]
    if not candidates:
        raise WorkdirError(f"{config_path}: names no dataset (dataset_path, identity.dataset)")
    return next((c for c in candidates if os.path.isfile(c)), candidates[-1])


def check(workdir: str, stage: str | None, num_rows: int, seed: int = 0, chunk: int = 65536) -> dict:
    """The report of every seed of `workdir`'s `stage` (module docstring) on `num_rows` rows drawn with
    `seed`, `chunk` rows per compiled call."""
    source = find_policy(workdir, stage)
    dataset = _dataset_of(source)
    data = load_dataset(dataset, source.env_id).transitions
    spaces = env_spaces(source.env_id)
    actions = data.actions if spaces.unit_actions else spaces.to_unit_actions(data.actions)
    rows = np.sort(np.random.default_rng(seed).choice(len(data.rewards), min(num_rows, len(data.rewards)),
                                                      replace=False))
    agents = load_agents(source, critics=True)  # the checkpoint find_policy chose, every seed
    seeds = []
    for s in range(source.num_seeds):
        agent = seed_of(agents, s)
        parts = []
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            batch = [jnp.asarray(x[r], jnp.float32) for x in
                     (data.observations, actions, data.rewards, data.terminals, data.next_observations)]
            key = jax.random.fold_in(jax.random.PRNGKey(seed), start)  # a' drawn afresh in every chunk
            parts.append([np.asarray(x) for x in q_and_target(agent, *batch, key)])
        q, y = np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts])
        seeds.append(summarise(q, y, rows, return_range(data.rewards, agent.config.gamma)))
    return {"workdir": source.workdir, "stage": source.stage, "step": source.step, "dataset": dataset,
            "rows": int(len(rows)), "seeds": seeds}


def table(report: dict) -> str:
    """The report as a header line and a Markdown table, a row per seed."""
    lo, hi = report["seeds"][0]["range"]
    lines = [f"{report['workdir']}: {report['stage']} checkpoint {report['step']}, {report['rows']} rows of "
             f"{report['dataset']}; range of returns the data's rewards allow [{lo:.4g}, {hi:.4g}]",
             "| seed | Q mean | Q min | Q max | outside range | TD mean | TD median | worst 1 % share "
             "| outside rows' share | furthest rows (Q) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(report["seeds"]):
        far = ", ".join(f"{f['row']} ({f['q']:.4g})" for f in s["furthest"]) or "-"
        outside = f"{s['outside_fraction']:.2%}" + (f" ({s['nonfinite']} not finite)" if s["nonfinite"] else "")
        lines.append(f"| {i} | {s['q_mean']:.4g} | {s['q_min']:.4g} | {s['q_max']:.4g} | {outside} | "
                     f"{s['td_mse']:.3g} | {s['td_median']:.3g} | {s['worst_1pct_share']:.2f} | "
                     f"{s['outside_share']:.2f} | {far} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--stage", choices=("awac", "mb2po", "online"), default=None,
                        help="default: the newest finished stage with an agent")
    parser.add_argument("--rows", type=int, default=20000, help="dataset rows drawn (without replacement)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row draw and of a' ~ pi(.|s')")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        if args.rows < 1:
            raise ValueError(f"--rows must be at least 1, got {args.rows}")
        report = check(args.workdir, args.stage, args.rows, args.seed)
    except (Mb2poError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Are a run's critics plausible? Q(s, a) and the TD error on the run's own dataset rows, per seed.

    python experiments/critic_check.py WORKDIR [--stage mb2po] [--rows 20000] [--json]

A critic that diverged on a small region of the data does not show in the evaluations, and hardly in the
logged critic loss (a mean over batches, and over seeds on the progress line). This reads the stage's
newest checkpoint (critics, target critics, actor, normaliser; not the model ring) and `--rows` random rows
of the dataset the run trained on, and prints per seed:
- Q(s, a), the min over the twins in return units: mean, min, max, and the fraction of rows outside the
  range a discounted sum of the data's rewards can take, [min r, max r] / (1 - gamma). (MB2PO's reward
  r - lambda u can sit below min r, so its lower end is a guide there, not a bound.)
- the squared TD error against the critics' own Bellman target (a' ~ pi(.|s'), min over the target twins,
  in return units): mean, median, and the share of its sum carried by the worst 1 % of the rows;
- the dataset rows where Q is furthest outside that range (with Q there).
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
from mb2po_jax.policy import find_policy, load_agent


@jax.jit
def q_and_target(agent: awac.AWACState, obs, actions, rewards, terminals, next_obs, key):
    """Q(s, a) (min over the twins) and the Bellman target of one seed's critics, both in return units [B]."""
    config = agent.config
    a = jnp.clip(actions, -1.0 + networks.ACTION_EPS, 1.0 - networks.ACTION_EPS)
    q = awac.critic_network(config).apply(agent.critic_params, agent.normalizer(obs), a)
    y = awac.bellman_target(agent, agent.normalizer(next_obs), rewards, terminals, key)
    return awac.critic_values(q, config).min(0), awac.critic_values(y[None], config)[0]


def summarise(q: np.ndarray, y: np.ndarray, rows: np.ndarray, reward_range: tuple[float, float],
              gamma: float, worst: int = 5) -> dict:
    """The figures of one seed from Q [B], targets [B], the dataset row of each [B] and the data's reward
    range (see the module docstring)."""
    lo, hi = reward_range[0] / (1.0 - gamma), reward_range[1] / (1.0 - gamma)
    err = (q - y) ** 2
    top = np.sort(err)[-max(1, len(err) // 100):]
    beyond = np.maximum(lo - q, q - hi)  # > 0 outside the range
    far = np.argsort(beyond)[::-1][:worst]
    far = far[beyond[far] > 0]
    return {"q_mean": float(q.mean()), "q_min": float(q.min()), "q_max": float(q.max()),
            "range": [float(lo), float(hi)], "outside_fraction": float(np.mean(beyond > 0)),
            "td_mse": float(err.mean()), "td_median": float(np.median(err)),
            "worst_1pct_share": float(top.sum() / max(err.sum(), 1e-30)),
            "furthest": [{"row": int(rows[i]), "q": float(q[i])} for i in far]}


def check(workdir: str, stage: str | None, num_rows: int, seed: int = 0) -> dict:
    source = find_policy(workdir, stage)
    config_path = os.path.join(source.workdir, "config.json")
    with open(config_path) as f:
        recorded = json.load(f)
    dataset_path = recorded.get("dataset_path") or (recorded.get("identity") or {}).get("dataset")
    if not dataset_path:
        raise WorkdirError(f"{config_path}: names no dataset (dataset_path)")
    data = load_dataset(dataset_path, source.env_id).transitions
    spaces = env_spaces(source.env_id)
    actions = data.actions if spaces.unit_actions else spaces.to_unit_actions(data.actions)
    rows = np.sort(np.random.default_rng(seed).choice(len(data.rewards), min(num_rows, len(data.rewards)),
                                                      replace=False))
    batch = [jnp.asarray(x[rows], jnp.float32) for x in
             (data.observations, actions, data.rewards, data.terminals, data.next_observations)]
    reward_range = (float(data.rewards.min()), float(data.rewards.max()))
    seeds = []
    for s in range(source.num_seeds):
        agent = load_agent(find_policy(workdir, source.stage, s), critics=True)
        q, y = q_and_target(agent, *batch, jax.random.PRNGKey(seed))
        seeds.append(summarise(np.asarray(q), np.asarray(y), rows, reward_range, agent.config.gamma))
    return {"workdir": source.workdir, "stage": source.stage, "step": source.step, "dataset": dataset_path,
            "rows": int(len(rows)), "seeds": seeds}


def table(report: dict) -> str:
    lo, hi = report["seeds"][0]["range"]
    lines = [f"{report['workdir']}: {report['stage']} checkpoint {report['step']}, {report['rows']} rows of "
             f"{report['dataset']}; data's range of discounted returns [{lo:.0f}, {hi:.0f}]",
             "| seed | Q mean | Q min | Q max | outside range | TD MSE | TD median | worst 1 % share | furthest rows (Q) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(report["seeds"]):
        far = ", ".join(f"{f['row']} ({f['q']:.0f})" for f in s["furthest"]) or "-"
        lines.append(f"| {i} | {s['q_mean']:.1f} | {s['q_min']:.0f} | {s['q_max']:.0f} | "
                     f"{s['outside_fraction']:.2%} | {s['td_mse']:.3g} | {s['td_median']:.3g} | "
                     f"{s['worst_1pct_share']:.2f} | {far} |")
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
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    try:
        report = check(args.workdir, args.stage, args.rows, args.seed)
    except (Mb2poError, OSError, ValueError) as e:
        print(f"critic_check: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

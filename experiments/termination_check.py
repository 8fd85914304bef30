"""Does a finished ensemble end imagined episodes as often as the data does, one step from the data's pairs?

    MB2PO_DATA_DIR=... python experiments/termination_check.py WORKDIR DATASET

For each seed of WORKDIR's finished dynamics stage (a workdir of DATASET, a hopper or walker2d dataset;
read with the settings it records, never written): one model step from ~50,000 of the dataset's own (s, a)
pairs (every k-th row), a uniformly drawn member as the rollouts draw, the next state sampled (as the
rollouts do) and the drawn member's mean; the environment's termination function on each, against the
dataset's terminal rate on the same rows. Then h-step rollouts (h = the run's horizon; `rollout.rollout`,
as MB2PO collects) of the AWAC stage's policy from the same rows: the share of the still-running
trajectories that terminate at each step.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax import config as config_lib, dynamics as dyn, mb2po, pipeline, rollout as ro, termination
from mb2po_jax.policy import find_policy, load_agents, seed_of
from mb2po_jax.errors import Mb2poError


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 2:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        check(*argv)
    except (Mb2poError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check(workdir: str, dataset: str) -> None:
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = config_lib.from_dict(json.load(f)["config"])  # the settings the workdir was trained with
    run = pipeline.Run(workdir, dataset, None, recorded, log=lambda m: None, record=False)  # reads only
    try:
        models = run.finished_dynamics()
    finally:
        run.close()
    data = run.dataset.transitions
    rows = np.arange(0, len(data.rewards), max(1, len(data.rewards) // 50_000))
    obs, act = (jnp.asarray(x[rows], jnp.float32) for x in (data.observations, data.actions))  # [-1, 1] actions
    done = termination.termination_fn_for(run.env_id)
    print(f"{dataset}: {len(rows)} rows, terminal rate in the data {data.terminals[rows].mean():.4f}")
    agents = load_agents(find_policy(workdir, "awac"))
    rollout_fn = ro.make_rollout_fn(mb2po.policy_sample, done, recorded.mb2po.rollout_config())  # one compile
    for s in range(jax.tree.leaves(models)[0].shape[0]):
        one = jax.tree.map(lambda x: x[s], models)
        members, _ = ro.member_sets(one, recorded.mb2po.rollout_config())
        params = dyn.take_members(one.params, members)
        key = jax.random.PRNGKey(s)
        drawn = jax.random.randint(key, (len(rows),), 0, len(members))
        eps = jax.random.normal(jax.random.fold_in(key, 1), (one.obs_dim + 1, len(rows)))
        sampled, _, _ = ro.model_step(obs, act, one, params, drawn, eps, penalty="max_std")
        mean, _, _ = ro.model_step(obs, act, one, params, drawn, jnp.zeros_like(eps), penalty="max_std")
        t_sampled, t_mean = np.asarray(done(obs, act, sampled)), np.asarray(done(obs, act, mean))
        caught = t_sampled[data.terminals[rows] > 0]
        print(f"seed {s}: imagined terminal rate {t_sampled.mean():.4f} (sampled s'), {t_mean.mean():.4f} "
              f"(mean s'); of the data's terminal rows, imagined terminal "
              + (f"{caught.mean():.3f}" if caught.size else "- (none in these rows)"))
        # the AWAC policy's h-step rollouts from the same rows, by the engine MB2PO collects with
        imagined, valid, _ = rollout_fn(jax.random.fold_in(key, 2), seed_of(agents, s), one, obs)
        ended = np.asarray(imagined.terminals).reshape(recorded.mb2po.horizon, -1) > 0  # row t * B + b
        running = np.asarray(valid).reshape(recorded.mb2po.horizon, -1)  # a trajectory's last row is valid
        rates = (ended & running).sum(1) / np.maximum(running.sum(1), 1)
        print(f"  AWAC policy, h = {recorded.mb2po.horizon}: terminal share of the running per step "
              + " ".join(f"{r:.4f}" for r in rates))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

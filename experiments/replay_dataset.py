"""Write the exact replay buffer of a SAC behaviour run, transitions [0, END), as a D4RL-layout file.

    python experiments/replay_dataset.py runs/behavior/hopper 100000 runs/data/hopper-medium-replay-sac.hdf5

This is D4RL's own medium-replay recipe taken literally (every transition the replay buffer held until the
medium policy), from the run's replay log (`mb2po_jax.behavior.load_replay_log`). The shipped
`medium-replay` kind regenerates an approximation of it from policy snapshots instead, because the log is
too big for git; this script is for the machine that ran the training.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

import mb2po_jax
from mb2po_jax import behavior
from mb2po_jax.data import d4rl


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    workdir, end, out = argv[0], int(argv[1]), argv[2]
    with open(os.path.join(workdir, "run.json")) as f:
        run = json.load(f)
    rows = behavior.load_replay_log(workdir, 0, end)
    arrays = {k: rows[k].astype(np.float32) for k in ("observations", "actions", "rewards", "next_observations")}
    arrays["terminals"] = rows["terminals"] > 0.5
    arrays["timeouts"] = rows["timeouts"].astype(bool)
    metadata = {"algorithm": "sac", "kind": "medium-replay", "source": "replay log", "env_id": run["env_id"],
                "seed": int(run["seed"]), "transitions": int(end), "mb2po_jax_version": mb2po_jax.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    d4rl.write_d4rl_hdf5(out, arrays, metadata)
    print(f"{out}: {end} transitions of {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Offline datasets: D4RL-layout HDF5 files, Minari datasets, and locally generated D4RL-style data.

    ds = load_dataset("hopper-medium-replay-v2")   # or a path, "hopper-random-local", "mujoco/hopper/medium-v0"
    ds.transitions.observations                     # [N, obs_dim] float32, host numpy

Generating the local D4RL-style datasets (`ensure_default_dataset` included) rolls out behaviour policies, so
it lives in `mb2po_jax.behavior.generation`, which imports this package; only the `mb2po-data` command
line (`cli`, which drives both) imports `behavior`.
"""

from mb2po_jax.data.d4rl import read_d4rl_hdf5, write_d4rl_hdf5
from mb2po_jax.data.loader import load_dataset
from mb2po_jax.data.registry import DEFAULT_DATASET, env_id_for, normalized_score
from mb2po_jax.data.transitions import Dataset, Transitions

__all__ = [
    "Transitions",
    "Dataset",
    "load_dataset",
    "read_d4rl_hdf5",
    "write_d4rl_hdf5",
    "normalized_score",
    "env_id_for",
    "DEFAULT_DATASET",
]

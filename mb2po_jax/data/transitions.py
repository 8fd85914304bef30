"""The one transition type (`Transitions`: the offline dataset, the model ring's samples, an imagined
rollout's output and every AWAC minibatch) and `Dataset` (a dataset's transitions plus provenance)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import struct

_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


class Transitions(struct.PyTreeNode):
    """One row per transition (s, a, r, s', done): host numpy arrays when read from a file, device arrays
    inside the compiled steps (a pytree, so `jax.device_put`, `jax.tree.map` and indexing by rows apply).

    `terminals` is 1.0 only where the environment (or the model's termination rule) really terminated: the
    critic target drops the bootstrap there; time-limit truncations are 0.0 so the critic bootstraps
    through them.

    `next_valid` (optional, [N]) is 0.0 where `next_observations[i]` is NOT the true successor state: this
    only happens for terminal rows of files without `next_observations` (the successor was never recorded;
    the row holds a copy of `observations[i]`). Such rows are right for the critic, whose target ignores s'
    when done=1, but must not be dynamics-model targets. None means every row is valid.
    """

    observations: Any  # [N, obs_dim]
    actions: Any  # [N, act_dim]
    rewards: Any  # [N]
    next_observations: Any  # [N, obs_dim]
    terminals: Any  # [N]
    next_valid: Any = None  # [N] or None (= all ones)

    @classmethod
    def from_numpy(cls, **arrays: np.ndarray) -> "Transitions":
        """Host transitions with their shapes and dtypes (float32) checked; raises ValueError naming the
        field. What loaders build; compiled code builds `Transitions(...)` directly."""
        t = cls(**arrays)
        n = t.observations.shape[0]
        if t.observations.ndim != 2 or t.actions.ndim != 2:
            raise ValueError(f"Transitions: observations and actions must be 2-D, got {t.observations.shape} "
                             f"and {t.actions.shape}")
        if t.next_observations.shape != t.observations.shape:
            raise ValueError(f"Transitions: next_observations {t.next_observations.shape} != observations "
                             f"{t.observations.shape}")
        if t.actions.shape[0] != n:
            raise ValueError(f"Transitions: actions has {t.actions.shape[0]} rows, observations {n}")
        for field in ("rewards", "terminals", "next_valid"):
            value = getattr(t, field)
            if value is not None and value.shape != (n,):
                raise ValueError(f"Transitions: {field} must be [{n}], got {value.shape}")
        for field in (*_FIELDS, "next_valid"):
            value = getattr(t, field)
            if value is not None and value.dtype != np.float32:
                raise ValueError(f"Transitions: {field} must be float32, got {value.dtype}")
        return t

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def next_valid_mask(self) -> np.ndarray:
        """[N] float32, 1.0 where next_observations is the true successor (use it to mask dynamics targets)."""
        if self.next_valid is None:
            return np.ones(len(self), np.float32)
        return self.next_valid

    def as_dict(self) -> dict[str, Any]:
        """The five core arrays by field name (`next_valid` is left out; use `next_valid_mask`)."""
        return {field: getattr(self, field) for field in _FIELDS}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Transitions plus where they came from.

    `episode_returns` / `episode_lengths` cover every row of the source, including rows that could not become
    transitions and the last, possibly partial, episode; `episode_lengths.sum()` is the number of rows read.
    """

    name: str  # "hopper-medium-replay-v2", "hopper-random-local", a Minari id, or the file stem
    path: str  # file (or Minari data directory) it was read from
    env_id: str  # Gymnasium id, e.g. "Hopper-v5"
    transitions: Transitions
    episode_returns: np.ndarray  # [num_episodes] float64
    episode_lengths: np.ndarray  # [num_episodes] int64
    metadata: dict  # metadata/* scalars and strings, keys without the "metadata/" prefix

    @property
    def num_transitions(self) -> int:
        return len(self.transitions)

    @property
    def num_rows(self) -> int:
        """Rows in the source; larger than num_transitions when rows without a known next state were dropped."""
        return int(np.sum(self.episode_lengths))

    @property
    def num_episodes(self) -> int:
        return int(self.episode_returns.shape[0])

    @property
    def obs_dim(self) -> int:
        return self.transitions.obs_dim

    @property
    def act_dim(self) -> int:
        return self.transitions.act_dim

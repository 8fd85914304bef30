"""Host-side containers for offline RL data: `Transitions` (flat arrays) and `Dataset` (transitions + provenance)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transitions:
    """One row per transition (s, a, r, s', done); host numpy arrays, all float32.

    `terminals` is 1.0 only where the environment really terminated (the critic target drops the bootstrap
    there); time-limit truncations are 0.0 so the critic bootstraps through them.

    `next_valid` (optional, [N]) is 0.0 where `next_observations[i]` is NOT the true successor state: this only
    happens for terminal rows of files without `next_observations` (the successor was never recorded; the row
    holds a copy of `observations[i]`). Such rows are right for the critic, whose target ignores s' when
    done=1, but must not be used as dynamics-model targets. None means every row is valid.
    """

    observations: np.ndarray  # [N, obs_dim]
    actions: np.ndarray  # [N, act_dim]
    rewards: np.ndarray  # [N]
    next_observations: np.ndarray  # [N, obs_dim]
    terminals: np.ndarray  # [N]
    next_valid: np.ndarray | None = None  # [N] or None (= all ones)

    def __post_init__(self):
        n = self.observations.shape[0]
        if self.observations.ndim != 2 or self.actions.ndim != 2:
            raise ValueError(
                f"Transitions: observations and actions must be 2-D, got {self.observations.shape} "
                f"and {self.actions.shape}"
            )
        if self.next_observations.shape != self.observations.shape:
            raise ValueError(
                f"Transitions: next_observations {self.next_observations.shape} != observations "
                f"{self.observations.shape}"
            )
        for field, value in (("actions", self.actions), ("rewards", self.rewards),
                             ("terminals", self.terminals)):
            if value.shape[0] != n:
                raise ValueError(f"Transitions: {field} has {value.shape[0]} rows, observations {n}")
        if self.rewards.shape != (n,) or self.terminals.shape != (n,):
            raise ValueError(
                f"Transitions: rewards/terminals must be [N], got {self.rewards.shape}/{self.terminals.shape}"
            )
        if self.next_valid is not None and self.next_valid.shape != (n,):
            raise ValueError(f"Transitions: next_valid must be [{n}], got {self.next_valid.shape}")
        for field, value in (*self.as_dict().items(), ("next_valid", self.next_valid)):
            if value is not None and value.dtype != np.float32:
                raise ValueError(f"Transitions: {field} must be float32, got {value.dtype}")

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

    def as_dict(self) -> dict[str, np.ndarray]:
        """The five core arrays by field name (`next_valid` is left out; use `next_valid_mask`)."""
        return {
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "next_observations": self.next_observations,
            "terminals": self.terminals,
        }


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

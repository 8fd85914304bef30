"""Policy evaluation in the real (Gymnasium / MuJoCo) environment.

Host-side edge code: the caller passes a deterministic policy as a host callable (typically a jitted
function closed over params with a leading seed axis), and every step of all S x N episodes is one call,
so the device sees one batched forward pass per environment step instead of S x N tiny ones.

Reset seeds: episode j of training seed s is reset with `seed + 1000 * s + j`, so an evaluation is
reproducible, episodes differ from one another, and seed row s of an S-seed evaluation is the same as
evaluating that seed alone with `seed + 1000 * s` (hence num_episodes <= 1000).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gymnasium as gym
import numpy as np

from mb2po_jax.data.envs import make_env

_SEED_STRIDE = 1000


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Undiscounted episode returns and lengths, one row per training seed."""

    returns: np.ndarray  # [S, N] float64
    lengths: np.ndarray  # [S, N] int64

    def mean_return(self) -> np.ndarray:
        """[S]: mean over each seed's episodes."""
        return self.returns.mean(axis=1)

    def std_return(self) -> np.ndarray:
        """[S]: standard deviation (ddof=0) over each seed's episodes."""
        return self.returns.std(axis=1)


def evaluate(
    act_fn: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    *,
    num_seeds: int,
    num_episodes: int,
    seed: int,
    max_episode_steps: int = 1000,
    env_kwargs: dict | None = None,
    first_seed_index: int = 0,
) -> EvalResult:
    """Runs `num_episodes` episodes of `env_id` for each of `num_seeds` policies, side by side.

    act_fn: obs [S, N, *obs_shape] float32 -> actions [S, N, *act_shape]; called exactly once per
      environment step. Episodes that have ended keep receiving their last observation and their actions
      are ignored. Actions are clipped to the action space bounds before stepping.
    Episodes end at termination or after `max_episode_steps` steps (truncation).
    first_seed_index: row s is training seed `first_seed_index + s` (reset seeds as in an evaluation of all
      seeds), so a process evaluating only its own seeds gets the rows a whole evaluation would.
    """
    if num_seeds < 1 or num_episodes < 1:
        raise ValueError(f"evaluate: num_seeds={num_seeds} and num_episodes={num_episodes} must be >= 1")
    if num_episodes > _SEED_STRIDE:
        raise ValueError(f"evaluate: num_episodes={num_episodes} > {_SEED_STRIDE} would reuse reset seeds")
    if max_episode_steps < 1:
        raise ValueError(f"evaluate: max_episode_steps={max_episode_steps} must be >= 1")
    S, N = num_seeds, num_episodes
    # The passive env checker wraps every step in extra Python; the env ids are registered ones.
    envs = [
        make_env(env_id, max_episode_steps=max_episode_steps, disable_env_checker=True, **(env_kwargs or {}))
        for _ in range(S * N)
    ]
    try:
        space = envs[0].action_space
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"evaluate: {env_id} has a {type(space).__name__} action space, need a Box")
        low, high = space.low, space.high
        obs_shape = envs[0].observation_space.shape

        obs = np.zeros((S * N, *obs_shape), np.float32)  # row s*N + j = episode j of seed s
        for i, env in enumerate(envs):
            s, j = divmod(i, N)
            obs[i], _ = env.reset(seed=seed + _SEED_STRIDE * (first_seed_index + s) + j)
        returns = np.zeros(S * N, np.float64)
        lengths = np.zeros(S * N, np.int64)
        active = np.ones(S * N, bool)

        while active.any():
            actions = np.asarray(act_fn(obs.reshape(S, N, *obs_shape)))
            if actions.shape != (S, N, *space.shape):
                raise ValueError(
                    f"evaluate: act_fn returned shape {actions.shape}, expected {(S, N, *space.shape)}"
                )
            actions = actions.reshape(S * N, *space.shape)
            if not np.isfinite(actions[active]).all():
                raise ValueError(f"evaluate: act_fn returned non-finite actions on {env_id}")
            actions = np.clip(actions, low, high).astype(space.dtype, copy=False)
            for i in np.flatnonzero(active):
                o, r, terminated, truncated, _ = envs[i].step(actions[i])
                obs[i] = o
                returns[i] += float(r)
                lengths[i] += 1
                if terminated or truncated:
                    active[i] = False
    finally:
        for env in envs:
            env.close()
    return EvalResult(returns=returns.reshape(S, N), lengths=lengths.reshape(S, N))

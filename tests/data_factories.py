"""Small synthetic D4RL-layout datasets for the data-layer tests (Hopper-v5 sizes: obs 11, act 3)."""

from __future__ import annotations

import numpy as np

OBS_DIM, ACT_DIM = 11, 3


def hopper_arrays(lengths=(5, 7, 4), *, ends=("timeout", "terminal", "none"), dtype=np.float32,
                  next_observations=True, column_flags=False, timeouts=True, seed=0) -> dict:
    """Episodes of the given lengths, each ending as listed ('timeout', 'terminal' or 'none' = cut off).

    observations[:, 0] = 100 * episode + step and [:, 1] = episode, so a test can tell which episode and step a
    state belongs to; the other columns are random. next_observations (when present) is the true successor:
    the next row inside an episode, a fresh state (step = len) at episode ends.
    """
    rng = np.random.default_rng(seed)
    obs, next_obs, terms, touts = [], [], [], []
    for e, (length, end) in enumerate(zip(lengths, ends)):
        o = rng.normal(size=(length + 1, OBS_DIM))
        o[:, 0] = 100 * e + np.arange(length + 1)
        o[:, 1] = e
        obs.append(o[:-1])
        next_obs.append(o[1:])
        t = np.zeros(length, bool)
        u = np.zeros(length, bool)
        t[-1] = end == "terminal"
        u[-1] = end == "timeout"
        terms.append(t)
        touts.append(u)
    n = sum(lengths)
    shape = (n, 1) if column_flags else (n,)
    raw = {
        "observations": np.concatenate(obs).astype(dtype),
        "actions": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(dtype),
        "rewards": rng.normal(size=n).astype(dtype).reshape(shape),
        "terminals": np.concatenate(terms).reshape(shape),
    }
    if timeouts:
        raw["timeouts"] = np.concatenate(touts).reshape(shape)
    if next_observations:
        raw["next_observations"] = np.concatenate(next_obs).astype(dtype)
    return raw


def hopper_unhealthy(obs: np.ndarray) -> np.ndarray:
    """SPEC section 3: healthy iff all finite, |s[1:]| < 100, height s[0] > 0.7, |angle s[1]| < 0.2."""
    healthy = (np.all(np.isfinite(obs), axis=1) & np.all(np.abs(obs[:, 1:]) < 100, axis=1)
               & (obs[:, 0] > 0.7) & (np.abs(obs[:, 1]) < 0.2))
    return ~healthy

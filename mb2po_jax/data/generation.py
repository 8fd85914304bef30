"""Making D4RL-style datasets in Gymnasium's MuJoCo environments (SPEC section 2: D4RL's recipe).

`random` = uniform random policy. The SAC-based kinds (medium, medium-replay, expert, medium-expert) are added
to `GENERATORS` by the SAC data module; `generate` and the CLI pick them up from there.

Files have D4RL's layout: observations, actions, rewards, next_observations (float32), terminals and timeouts
(bool; terminal = the environment terminated, timeout = the time limit truncated), infos/qpos and infos/qvel
(float64, the MuJoCo state behind observations[i]), infos/action_log_probs, and metadata attributes.
Generation is deterministic: the same arguments and library versions give byte-identical files.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np

import mb2po_jax
from mb2po_jax.errors import DataError
from mb2po_jax.data import d4rl, registry
from mb2po_jax.data.envs import env_spaces, make_env

MAX_EPISODE_STEPS = 1000  # D4RL's locomotion episodes
DEFAULT_DATASET = "hopper-random-local"
DEFAULT_DATASET_SIZE = 100_000
DEFAULT_SEED = 0

# policy(observation [obs_dim] float64) -> (action [act_dim], log-probability of that action)
Policy = Callable[[np.ndarray], tuple[np.ndarray, float]]


def _library_versions() -> dict:
    import gymnasium

    versions = {"mb2po_jax_version": mb2po_jax.__version__, "gymnasium_version": gymnasium.__version__}
    try:
        import mujoco

        versions["mujoco_version"] = mujoco.__version__
    except ImportError:
        pass
    return versions


def rollout(env_id: str, policy: Policy, size: int, seed: int,
            max_episode_steps: int = MAX_EPISODE_STEPS) -> dict[str, np.ndarray]:
    """Run `policy` in the real environment for exactly `size` steps; D4RL-layout arrays (no metadata).

    The environment is seeded once, at its first reset; later resets continue its random stream, so a fixed
    seed (and a deterministic policy stream) reproduces the data. The last episode may be cut short by `size`.
    """
    if size < 1:
        raise DataError(f"dataset size must be at least 1, got {size}")
    env = make_env(env_id, max_episode_steps=max_episode_steps, disable_env_checker=True)
    try:
        obs_dim = env.observation_space.shape[0]
        act_dim = env.action_space.shape[0]
        sim_data = getattr(env.unwrapped, "data", None)  # MuJoCo state, when there is one
        has_state = sim_data is not None and hasattr(sim_data, "qpos") and hasattr(sim_data, "qvel")
        observations = np.empty((size, obs_dim), np.float32)
        next_observations = np.empty((size, obs_dim), np.float32)
        actions = np.empty((size, act_dim), np.float32)
        rewards = np.empty(size, np.float32)
        terminals = np.zeros(size, bool)
        timeouts = np.zeros(size, bool)
        log_probs = np.empty(size, np.float32)
        qpos = np.empty((size, sim_data.qpos.shape[0]), np.float64) if has_state else None
        qvel = np.empty((size, sim_data.qvel.shape[0]), np.float64) if has_state else None

        obs, _ = env.reset(seed=seed)
        step = env.step
        for i in range(size):
            if has_state:
                qpos[i] = sim_data.qpos
                qvel[i] = sim_data.qvel
            action, log_prob = policy(obs)
            next_obs, reward, terminated, truncated, _ = step(action)
            observations[i] = obs
            actions[i] = action
            rewards[i] = reward
            next_observations[i] = next_obs
            log_probs[i] = log_prob
            if terminated or truncated:
                terminals[i] = terminated
                timeouts[i] = truncated and not terminated
                obs, _ = env.reset()
            else:
                obs = next_obs
    finally:
        env.close()
    arrays = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "next_observations": next_observations,
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/action_log_probs": log_probs,
    }
    if has_state:
        arrays["infos/qpos"] = qpos
        arrays["infos/qvel"] = qvel
    return arrays


def generate_random(env_id: str, size: int, seed: int, path: str,
                    max_episode_steps: int = MAX_EPISODE_STEPS) -> str:
    """Uniform random policy in `env_id` for `size` steps, written to `path` (atomically). Returns `path`."""
    env_id = registry.env_id_for(env_id)
    spaces = env_spaces(env_id)
    low, high = spaces.act_low, spaces.act_high
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise DataError(f"{env_id}: action space is unbounded; a uniform random policy needs finite bounds")
    # All actions drawn up front from their own Generator: the policy costs one array index per step.
    rng = np.random.default_rng(seed)
    sampled = rng.uniform(low, high, size=(size, low.shape[0])).astype(np.float32)
    log_prob = float(-np.sum(np.log(high - low)))
    counter = iter(range(size))

    def policy(_obs):
        return sampled[next(counter)], log_prob

    arrays = rollout(env_id, policy, size, seed, max_episode_steps)
    metadata = {
        "algorithm": "uniform_random",
        "kind": "random",
        "env_id": env_id,
        "seed": int(seed),
        "size": int(size),
        "max_episode_steps": int(max_episode_steps),
        **_library_versions(),
    }
    d4rl.write_d4rl_hdf5(path, arrays, metadata)
    return path


def _generate_random_kind(env_id: str, size: int, seed: int, path: str) -> str:
    return generate_random(env_id, size, seed, path)


# kind -> fn(env_id, size, seed, path) -> path. Other kinds register here (see the module docstring).
GENERATORS: dict[str, Callable[[str, int, int, str], str]] = {"random": _generate_random_kind}


def generate(env: str, kind: str, *, size: int, seed: int = DEFAULT_SEED, path: str | None = None) -> str:
    """Make a dataset of `kind` for `env` (key like 'hopper' or a Gymnasium id). Default path: the local
    name's file in `registry.local_data_dir()`. Returns the path written."""
    local = registry.local_name_for(env, kind)
    if kind not in GENERATORS:
        raise DataError(
            f"dataset kind {kind!r} is not available yet; available: {', '.join(sorted(GENERATORS))}"
        )
    return GENERATORS[kind](local.env_id, size, seed, path or local.path)


def ensure_default_dataset() -> str:
    """Path of DEFAULT_DATASET, generating it (DEFAULT_DATASET_SIZE transitions) on first use."""
    local = registry.parse_local_name(DEFAULT_DATASET)
    path = local.path
    if not os.path.isfile(path):
        print(
            f"mb2po-data: generating the default dataset {DEFAULT_DATASET} ({DEFAULT_DATASET_SIZE} transitions, "
            f"{local.env_id}, seed {DEFAULT_SEED}) at {path}",
            file=sys.stderr,
            flush=True,
        )
        generate(local.env, local.kind, size=DEFAULT_DATASET_SIZE, seed=DEFAULT_SEED, path=path)
    return path

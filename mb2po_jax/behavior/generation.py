"""Making D4RL-style datasets in Gymnasium's MuJoCo environments (SPEC section 2: D4RL's recipe).

`random` = D4RL's "randomly initialized policy": the stochastic policy of the behaviour SAC actor at its
initialisation (`train.initial_actor`, the network of the medium/expert policies, seeded with the dataset's
seed; no assets needed). `uniform` = uniform random actions (not a D4RL kind; what `random` files held until
2026-12-05: `registry.RECIPES` makes the loader refuse those by local name). The SAC-based kinds are rollouts of the
behaviour policies of one online SAC run (`train` trains them, `export` writes them as small assets):
  medium, expert   the stochastic policy of the exported medium / expert actor, `size` steps
  medium-replay    the run's sequence of behaviour policies up to the medium one (`policies.medium_replay_policy`)
  medium-expert    the medium rows, then the expert rows (same seed), as D4RL concatenates its two files
Assets: $MB2PO_BEHAVIOR_DIR/<env>/ if that variable is set, else the shipped mb2po_jax/behavior/assets/<env>/
(<env> = hopper, halfcheetah, walker2d, or the Gymnasium id of other envs). All six kinds are in `GENERATORS`.
This module lives in `behavior/`, not `data/`, because five of the six kinds are rollouts of behaviour
policies: it imports `data` (formats, names, environments) and `data` never imports it, so imports flow one way.

Files have D4RL's layout: observations, actions, rewards, next_observations (float32), terminals and timeouts
(bool; terminal = the environment terminated, timeout = the time limit truncated), infos/qpos and infos/qvel
(float64, the MuJoCo state behind observations[i]), infos/action_log_probs, and metadata attributes.
Generation is deterministic: the same arguments and library versions give byte-identical files (the SAC
kinds also need the same CPU kind: XLA's kernels, and so the sampled actions, may differ in the last bit
between AVX2 and AVX-512 machines).
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Callable

import gymnasium
import jax
import numpy as np

from mb2po_jax.behavior import policies, train
from mb2po_jax.behavior.policies import BEHAVIOR_DIR_VAR, behavior_asset_dir
from mb2po_jax.data import d4rl, registry
from mb2po_jax.data.envs import env_spaces, make_env
from mb2po_jax.errors import DataError
from mb2po_jax.logger import Progress
from mb2po_jax.version import __version__

MAX_EPISODE_STEPS = 1000  # D4RL's locomotion episodes
# The size of `registry.DEFAULT_DATASET` (the built-in default of `mb2po-train`, rolled out from the shipped
# hopper behaviour policies on first use, `ensure_default_dataset`); None = its full size.
DEFAULT_DATASET_SIZE: int | None = None
DEFAULT_SEED = 0

# policy(observation [obs_dim] float64) -> (action [act_dim], log-probability of that action)
Policy = Callable[[np.ndarray], tuple[np.ndarray, float]]


def _library_versions() -> dict:
    versions = {"mb2po_jax_version": __version__, "gymnasium_version": gymnasium.__version__}
    try:
        import mujoco

        versions["mujoco_version"] = mujoco.__version__
    except ImportError:
        pass
    return versions


def rollout(env_id: str, policy: Policy, size: int, seed: int,
            max_episode_steps: int = MAX_EPISODE_STEPS, desc: str | None = None) -> dict[str, np.ndarray]:
    """Run `policy` in the real environment for exactly `size` steps; D4RL-layout arrays (no metadata).
    With `desc`, a progress line on stderr every few seconds (steps/s, ETA, episodes, mean episode return).

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

        progress = Progress(size, desc, min_interval_s=10.0) if desc else None
        episodes, episode_return, returns_sum = 0, 0.0, 0.0
        obs, _ = env.reset(seed=seed)
        step = env.step
        for i in range(size):
            if progress is not None and i % 1000 == 0:
                progress.update(i, episodes=episodes, return_mean=returns_sum / max(episodes, 1))
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
            episode_return += reward
            if terminated or truncated:
                episodes, returns_sum, episode_return = episodes + 1, returns_sum + episode_return, 0.0
                terminals[i] = terminated
                timeouts[i] = truncated and not terminated
                obs, _ = env.reset()
            else:
                obs = next_obs
        if progress is not None:
            progress.update(size, episodes=episodes)
            progress.close()
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
    """D4RL's random kind: the stochastic policy of a freshly initialised behaviour SAC actor
    (`train.initial_actor(env_id, seed)`, the actor `train-behavior --seed seed` starts from), sampled with
    `seed` as the medium/expert kinds sample theirs; `size` steps written to `path` (atomically). Returns `path`.

    At initialisation the actor's mean and log-std heads are near 0 (small output init), so the actions are
    close to tanh(N(0, 1)) in every state, not uniform: fewer near 0 (|a| < 0.5: ~42 % against 50 %), more
    at 0.6 < |a| < 0.99, each with its own log-probability.
    """
    env_id = registry.env_id_for(env_id)
    config = train.BehaviorConfig().sac
    policy = policies.policy_fn(train.initial_actor(env_id, seed), seed)
    arrays = rollout(env_id, _in_env_bounds(policy, env_id), size, seed, max_episode_steps,
                     desc=f"random {env_id}")
    metadata = {
        "algorithm": registry.RECIPES["random"],
        "kind": "random",
        "env_id": env_id,
        "seed": int(seed),
        "size": int(size),
        "max_episode_steps": int(max_episode_steps),
        "policy_step": 0,
        "policy_hidden_dims": "x".join(str(int(h)) for h in config.hidden_dims),
        "jax_version": jax.__version__,
        **_library_versions(),
    }
    d4rl.write_d4rl_hdf5(path, arrays, metadata)
    return path


def generate_uniform(env_id: str, size: int, seed: int, path: str,
                     max_episode_steps: int = MAX_EPISODE_STEPS) -> str:
    """Uniform random actions in `env_id` for `size` steps, written to `path` (atomically). Returns `path`."""
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

    arrays = rollout(env_id, policy, size, seed, max_episode_steps, desc=f"uniform {env_id}")
    metadata = {
        "algorithm": registry.RECIPES["uniform"],
        "kind": "uniform",
        "env_id": env_id,
        "seed": int(seed),
        "size": int(size),
        "max_episode_steps": int(max_episode_steps),
        **_library_versions(),
    }
    d4rl.write_d4rl_hdf5(path, arrays, metadata)
    return path


# D4RL's dataset sizes (transitions). medium-replay's is the behaviour run's own: every env step up to the
# medium policy (the assets' manifest), so it has no fixed default.
DEFAULT_SIZES = {"random": 1_000_000, "uniform": 1_000_000, "medium": 1_000_000, "expert": 1_000_000,
                 "medium-expert": 2_000_000}
SAC_KINDS = ("medium", "medium-replay", "expert", "medium-expert")


def _default_size(generate_fn: Callable[..., str], kind: str) -> Callable[[str, int | None, int, str], str]:
    def make(env_id: str, size: int | None, seed: int, path: str) -> str:
        return generate_fn(env_id, DEFAULT_SIZES[kind] if size is None else size, seed, path)

    return make


# ------------------------------------------------------------------------------------- SAC-based kinds
def _missing_assets(env_id: str, asset_dir: str, what: str) -> DataError:
    env = registry.env_key(env_id) or env_id
    return DataError(
        f"no behaviour-policy assets for {env_id} in {asset_dir} ({what}); make them with `mb2po-data "
        f"train-behavior --env {env} --workdir W` (a long SAC run, resumable), then `mb2po-data export-behavior "
        f"W --out {asset_dir}` (or point ${BEHAVIOR_DIR_VAR} at a directory holding {env}/manifest.json)"
    )


def _asset_files(manifest: dict, kinds: tuple[str, ...]) -> list[str]:
    """The actor files that the datasets of `kinds` are made from, in a fixed order."""
    files = [manifest[k]["file"] for k in kinds if k != "medium-replay"]
    if "medium-replay" in kinds:
        files += [s["file"] for s in sorted(manifest["medium_replay"]["snapshots"], key=lambda s: s["step"])]
    return files


def load_behavior_assets(env_id: str, kinds: tuple[str, ...]) -> tuple[str, dict]:
    """(asset dir, manifest) for `env_id` (`policies.behavior_asset_dir`), checked to hold the actor files of
    `kinds`; DataError otherwise."""
    asset_dir = behavior_asset_dir(env_id)
    if not os.path.isdir(asset_dir):
        raise _missing_assets(env_id, asset_dir, "no such directory")
    if not os.path.isfile(os.path.join(asset_dir, "manifest.json")):
        raise _missing_assets(env_id, asset_dir, "no manifest.json")
    try:
        manifest = policies.read_manifest(asset_dir)
        files = _asset_files(manifest, kinds)
    except (ValueError, KeyError, TypeError) as e:  # torn or foreign manifest
        raise DataError(
            f"{asset_dir}/manifest.json: not a behaviour-asset manifest ({type(e).__name__}: {e})") from e
    if manifest.get("env_id") != env_id:
        raise DataError(
            f"{asset_dir}: the behaviour policies there are for {manifest.get('env_id')}, not {env_id}")
    absent = [f for f in files if not os.path.isfile(os.path.join(asset_dir, f))]
    if absent:
        raise _missing_assets(env_id, asset_dir, f"{absent[0]}, listed in manifest.json, is missing")
    return asset_dir, manifest


def _provenance(asset_dir: str, manifest: dict, kinds: tuple[str, ...]) -> dict:
    """Metadata naming the behaviour run and the exact asset files (sha256 of the manifest, then the actors)
    a dataset was made from, and JAX's version: the policies sample with JAX's PRNG and kernels."""
    digest = hashlib.sha256()
    for name in ["manifest.json", *_asset_files(manifest, kinds)]:
        with open(os.path.join(asset_dir, name), "rb") as f:
            digest.update(f.read())
    return {"behavior_seed": int(manifest["seed"]), "behavior_assets_sha256": digest.hexdigest(),
            "jax_version": jax.__version__}


def _in_env_bounds(policy: Policy, env_id: str) -> Policy:
    """SAC acts in (-1, 1)^act_dim (training scales that to the env's bounds); do the same here. The
    log-probability stays that of the (-1, 1) action. D4RL's envs have bounds +-1: the policy is unchanged."""
    spaces = env_spaces(env_id)
    if np.all(spaces.act_low == -1.0) and np.all(spaces.act_high == 1.0):
        return policy

    def act(obs):
        a, log_prob = policy(obs)
        return spaces.from_unit_actions(a), log_prob

    return act


def _sac_rollout(env_id: str, asset_dir: str, manifest: dict, kind: str, size: int | None, seed: int,
                 max_episode_steps: int) -> tuple[dict[str, np.ndarray], int]:
    """Arrays of one single-policy-sequence kind (medium, expert, medium-replay) and the rows made."""
    if kind == "medium-replay":
        policy, transitions = policies.medium_replay_policy(asset_dir, seed)
        if size is not None and size > transitions:
            raise DataError(
                f"medium-replay of {env_id} has {transitions} transitions (the behaviour run's steps up to the "
                f"medium policy, {asset_dir}); cannot make {size}")
        size = transitions if size is None else size
    else:
        policy = policies.asset_policy(asset_dir, kind, seed)
        size = DEFAULT_SIZES[kind] if size is None else size
    arrays = rollout(env_id, _in_env_bounds(policy, env_id), size, seed, max_episode_steps, desc=f"{kind} {env_id}")
    return arrays, size


def _medium_expert_sizes(size: int | None) -> tuple[int, int]:
    """(medium rows, expert rows): D4RL's full 1 M + 1 M by default, else half each (medium gets the odd row)."""
    if size is None:
        return DEFAULT_SIZES["medium"], DEFAULT_SIZES["expert"]
    if size < 2:
        raise DataError(f"medium-expert needs at least 2 transitions (one of each half), got {size}")
    return size - size // 2, size // 2


# The arrays of a SAC-kind file, in the order `rollout` makes them (the writer keeps the order: same bytes).
_ARRAY_NAMES = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
                "infos/action_log_probs", "infos/qpos", "infos/qvel")


def _cached_half(env_id: str, asset_dir: str, manifest: dict, kind: str, size: int, seed: int,
                 max_episode_steps: int) -> dict[str, np.ndarray] | None:
    """The arrays of the cached local `kind` file (medium or expert) when it is what `_sac_rollout` would make
    now: same env, seed, size, episode limit, asset files (sha256) and library versions. Else None.

    A full medium-expert file is 2M policy steps (hopper: ~50 min on the dev CPU) that the cached 1M medium
    and expert files usually already hold; their rows are exactly its halves (`generate_sac`).
    """
    path = registry.local_name_for(env_id, kind).path
    if not os.path.isfile(path):
        return None
    try:
        raw = d4rl.read_d4rl_hdf5(path)
    except DataError:
        return None
    meta = d4rl.metadata_scalars(raw)
    expected = {"algorithm": "sac", "kind": kind, "env_id": env_id, "seed": int(seed), "size": int(size),
                "max_episode_steps": int(max_episode_steps), **_provenance(asset_dir, manifest, (kind,)),
                **_library_versions()}
    if any(meta.get(key) != value for key, value in expected.items()):
        return None
    arrays = {name: raw[name] for name in _ARRAY_NAMES if name in raw}
    if any(len(a) != size for a in arrays.values()):
        return None
    print(f"[{kind} {env_id}] {size}/{size} rows reused from {path} (same seed, policies and library versions)",
          file=sys.stderr, flush=True)
    return arrays


def generate_sac(env_id: str, kind: str, size: int | None, seed: int, path: str,
                 max_episode_steps: int = MAX_EPISODE_STEPS) -> str:
    """A SAC-based dataset `kind` (SAC_KINDS) for `env_id`, `size` rows (None: the kind's D4RL size), written
    to `path` atomically. Returns `path`. Missing behaviour assets: DataError saying where and how to make them.

    medium-expert = the medium file's rows, then the expert file's, each made with `seed` (so it equals the
    two files of the same seed and sizes concatenated); the seam is an episode end that the readers find from
    next_observations (it is neither a terminal nor a timeout, as the last row of any file); metadata
    `medium_size` says where it is. A half whose local file is cached with the same seed, size, policies and
    library versions is read from it instead of rolled out again (`_cached_half`).
    """
    if kind not in SAC_KINDS:
        raise DataError(f"{kind!r} is not a SAC-based dataset kind; expected one of {', '.join(SAC_KINDS)}")
    env_id = registry.env_id_for(env_id)
    parts = ("medium", "expert") if kind == "medium-expert" else (kind,)
    asset_dir, manifest = load_behavior_assets(env_id, parts)
    metadata = {"algorithm": "sac", "kind": kind, "env_id": env_id, "seed": int(seed)}
    if kind == "medium-expert":
        sizes = _medium_expert_sizes(size)
        halves = [_cached_half(env_id, asset_dir, manifest, k, n, seed, max_episode_steps)
                  or _sac_rollout(env_id, asset_dir, manifest, k, n, seed, max_episode_steps)[0]
                  for k, n in zip(parts, sizes)]
        arrays = {name: np.concatenate([h[name] for h in halves]) for name in halves[0]}
        metadata.update(size=sum(sizes), medium_size=sizes[0], expert_size=sizes[1],
                        medium_policy_step=int(manifest["medium"]["step"]),
                        expert_policy_step=int(manifest["expert"]["step"]))
    else:
        arrays, size = _sac_rollout(env_id, asset_dir, manifest, kind, size, seed, max_episode_steps)
        metadata["size"] = int(size)
        if kind == "medium-replay":  # the data are the run's env steps [0, policy_step)
            mr = manifest["medium_replay"]
            metadata.update(policy_step=int(mr["transitions"]), random_steps=int(mr["random_steps"]),
                            policy_snapshots=len(mr["snapshots"]))
        else:
            metadata.update(policy_step=int(manifest[kind]["step"]),
                            policy_eval_return=float(manifest[kind]["return"]))
    metadata.update(max_episode_steps=int(max_episode_steps), **_provenance(asset_dir, manifest, parts),
                    **_library_versions())
    d4rl.write_d4rl_hdf5(path, arrays, metadata)
    return path


def _sac_kind(kind: str) -> Callable[[str, int | None, int, str], str]:
    def make(env_id: str, size: int | None, seed: int, path: str) -> str:
        return generate_sac(env_id, kind, size, seed, path)

    make.__name__ = f"generate_{kind.replace('-', '_')}"
    return make


# kind -> fn(env_id, size or None for the kind's default, seed, path) -> path, in registry.LOCAL_KINDS order.
GENERATORS: dict[str, Callable[[str, int | None, int, str], str]] = {
    "random": _default_size(generate_random, "random"), "uniform": _default_size(generate_uniform, "uniform"),
    **{kind: _sac_kind(kind) for kind in SAC_KINDS}}


def generate(env: str, kind: str, *, size: int | None = None, seed: int = DEFAULT_SEED,
             path: str | None = None) -> str:
    """Make a dataset of `kind` for `env` (key like 'hopper' or a Gymnasium id), `size` transitions (None:
    D4RL's size for the kind, `DEFAULT_SIZES`; medium-replay: all of the behaviour run's). Default path: the
    local name's file in `registry.local_data_dir()`. Returns the path written."""
    local = registry.local_name_for(env, kind)
    if kind not in GENERATORS:
        raise DataError(
            f"dataset kind {kind!r} is not available yet; available: {', '.join(sorted(GENERATORS))}"
        )
    return GENERATORS[kind](local.env_id, size, seed, path or local.path)


def ensure_default_dataset() -> str:
    """Path of `registry.DEFAULT_DATASET`, generating it (DEFAULT_DATASET_SIZE transitions, None = the kind's
    default) on first use."""
    local = registry.parse_local_name(registry.DEFAULT_DATASET)
    path = local.path
    if not os.path.isfile(path):
        print(
            f"mb2po-data: generating the default dataset {registry.DEFAULT_DATASET} "
            f"({DEFAULT_DATASET_SIZE or 'all'} transitions, {local.env_id}, seed {DEFAULT_SEED}) at {path}",
            file=sys.stderr,
            flush=True,
        )
        generate(local.env, local.kind, size=DEFAULT_DATASET_SIZE, seed=DEFAULT_SEED, path=path)
    return path

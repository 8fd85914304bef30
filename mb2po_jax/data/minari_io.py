"""Minari datasets (the maintained successor of D4RL), read with minari's own API; minari is optional.

Layout: `$MINARI_DATASETS_PATH` or `~/.minari/datasets`, then `<id>/data/` with `metadata.json` and
`main_data.hdf5` (`episode_<k>` groups, where observations has one more row than actions). Each episode of T
steps gives T transitions with s' = observations[t + 1], all valid, including the last one of a truncated
episode (Minari keeps the final observation). `terminations` become terminals, `truncations` timeouts.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mb2po_jax.errors import DataError
from mb2po_jax.data import registry, validation
from mb2po_jax.data.d4rl import episode_stats
from mb2po_jax.data.transitions import Dataset, Transitions


def minari_root() -> str:
    """Where minari keeps datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets (minari's own rule)."""
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(
        os.path.expanduser("~"), ".minari", "datasets"
    )


def minari_data_dir(dataset_id: str) -> str:
    return os.path.join(minari_root(), *dataset_id.split("/"), "data")


def _import_minari():
    try:
        import minari
    except ImportError as e:
        raise DataError(
            f"reading Minari datasets needs the minari package ({e}); install it with "
            f"pip install 'minari[hdf5]>=0.5,<0.6' (or pip install -e '.[minari]')"
        ) from e
    return minari


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def read_minari(dataset_id: str) -> tuple[dict[str, np.ndarray], np.ndarray, str | None, dict]:
    """Raw D4RL-layout arrays (with next_observations and timeouts), per-episode lengths, the env id from the
    dataset's env spec (None if it has none) and its scalar metadata."""
    data_dir = minari_data_dir(dataset_id)
    if not os.path.isdir(data_dir):
        raise DataError(
            f"{dataset_id}: Minari dataset not found at {data_dir} ($MINARI_DATASETS_PATH, else "
            f"~/.minari/datasets); get it with `minari download {dataset_id}` where there is network access "
            f"and copy the folder there"
        )
    minari = _import_minari()
    try:
        dataset = minari.load_dataset(dataset_id)
        episodes = list(dataset.iterate_episodes())
        env_spec = dataset.env_spec
        storage_metadata = dict(dataset.storage.metadata)
    except DataError:
        raise
    except Exception as e:  # minari raises assorted errors on bad or unsupported data; all are bad input here
        raise DataError(f"{dataset_id}: Minari could not read the dataset: {_one_line(e)}") from e
    if not episodes:
        raise DataError(f"{dataset_id}: dataset is empty (0 episodes)")

    columns: dict[str, list] = {k: [] for k in
                                ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")}
    lengths = []
    for episode in episodes:
        obs, actions = episode.observations, episode.actions
        if not isinstance(obs, np.ndarray) or not isinstance(actions, np.ndarray):
            raise DataError(
                f"{dataset_id}: episode {episode.id} has structured (Dict/Tuple) observations or actions; "
                f"only flat Box spaces are supported"
            )
        steps = len(episode.rewards)
        if steps == 0:  # nothing to learn from, and it would break the episode bookkeeping
            continue
        if obs.shape[0] != steps + 1 or actions.shape[0] != steps:
            raise DataError(
                f"{dataset_id}: episode {episode.id} has {obs.shape[0]} observations and {actions.shape[0]} "
                f"actions for {steps} steps (expected {steps + 1} and {steps})"
            )
        columns["observations"].append(obs[:-1])
        columns["next_observations"].append(obs[1:])
        columns["actions"].append(actions)
        columns["rewards"].append(np.asarray(episode.rewards))
        columns["terminals"].append(np.asarray(episode.terminations, bool))
        columns["timeouts"].append(np.asarray(episode.truncations, bool))
        lengths.append(steps)
    if not lengths:
        raise DataError(f"{dataset_id}: dataset is empty (0 steps)")
    raw = {key: np.concatenate(parts) for key, parts in columns.items()}
    metadata = {k: v for k, v in storage_metadata.items() if isinstance(v, (str, int, float, bool))}
    env_id = getattr(env_spec, "id", None)
    return raw, np.asarray(lengths, np.int64), env_id, metadata


def recorded_env_id(dataset_id: str) -> str | None:
    """The env spec id in the dataset's metadata.json (read without minari or the data); None if absent."""
    try:
        with open(os.path.join(minari_data_dir(dataset_id), "metadata.json"), encoding="utf-8") as f:
            spec = json.load(f).get("env_spec")
        env_id = json.loads(spec).get("id") if isinstance(spec, str) else None
    except (OSError, ValueError, AttributeError):
        return None
    return env_id if isinstance(env_id, str) else None


def implied_env_id(dataset_id: str) -> str | None:
    """For a dataset that records no env spec: Minari's MuJoCo datasets (mujoco/hopper/...) were collected in
    Gymnasium's v5, so a known environment in the id gives its v5 id; None otherwise."""
    return registry.env_id_for(dataset_id) if registry.env_key(dataset_id) else None


def load_minari(dataset_id: str, env_id: str | None = None, *, validate: bool = True) -> Dataset:
    """A Minari dataset as a Dataset. The environment is `env_id`, else the one in the dataset's env spec,
    else the one its id implies (`implied_env_id`)."""
    raw, lengths, spec_env_id, metadata = read_minari(dataset_id)
    env_id = env_id or spec_env_id or implied_env_id(dataset_id)
    if env_id is None:
        raise DataError(f"{dataset_id}: the dataset records no environment; pass --env (a Gymnasium id)")
    if validate:
        validation.validate_raw(raw, dataset_id, env_id)
    else:
        validation.check_structure(raw, dataset_id)
    ends = np.zeros(lengths.sum(), bool)
    ends[np.cumsum(lengths) - 1] = True
    returns, lengths = episode_stats(raw["rewards"].reshape(-1), ends)
    transitions = Transitions.from_numpy(
        observations=raw["observations"].astype(np.float32),
        actions=raw["actions"].astype(np.float32),
        rewards=raw["rewards"].reshape(-1).astype(np.float32),
        next_observations=raw["next_observations"].astype(np.float32),
        terminals=raw["terminals"].astype(np.float32),
    )
    return Dataset(
        name=dataset_id,
        path=minari_data_dir(dataset_id),
        env_id=env_id,
        transitions=transitions,
        episode_returns=returns,
        episode_lengths=lengths,
        metadata=metadata,
    )

"""D4RL-layout HDF5 files: reading, writing, turning rows into transitions, and finding D4RL's cached files.

Layout: `observations [N, obs_dim]`, `actions [N, act_dim]`, `rewards [N]`, `terminals [N]`, optional
`timeouts [N]` and `next_observations [N, obs_dim]`, optional `infos/*` datasets and `metadata/*` (D4RL stores
metadata as scalar datasets; files written here store it as attributes of the `metadata` group; both are read).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Mapping

import numpy as np

from mb2po_jax.errors import DataError
from mb2po_jax.data.transitions import Transitions

# Files without `timeouts` (some D4RL v0 files): a run of this many non-terminal rows ends an episode, as
# d4rl.qlearning_dataset assumes (all D4RL locomotion episodes are capped at 1000 steps).
V0_MAX_EPISODE_STEPS = 1000
# Relative tolerance when checking next_observations[i] against observations[i + 1] to find episode starts.
_CONTINUITY_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Raw file I/O


def _read_value(dataset):
    import h5py

    info = h5py.check_string_dtype(dataset.dtype)
    if info is not None and info.length is None:  # variable-length strings -> str (scalar) / object array of str
        return dataset.asstr()[()]
    return dataset[()]


def read_d4rl_hdf5(path: str, *, infos: bool = True, arrays: bool = True) -> dict[str, np.ndarray]:
    """Every dataset of a D4RL-layout file by its full name ('observations', 'infos/qpos', 'metadata/algorithm').

    dtypes are kept as stored. Attributes of the `metadata` group (and of the root) are returned as
    'metadata/<name>' entries too, so metadata reads the same whichever way it was stored. Scalar
    variable-length strings come back as `str`. `infos=False` skips the (large) `infos/*` arrays;
    `arrays=False` reads only the metadata.
    """
    import h5py

    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a D4RL-layout .hdf5 file")
    try:
        if not h5py.is_hdf5(path):
            raise DataError(f"{path}: not an HDF5 file")
        raw: dict = {}
        with h5py.File(path, "r") as f:

            def visit(name, obj):
                wanted = (infos or not name.startswith("infos/")) and (arrays or name.startswith("metadata/"))
                if isinstance(obj, h5py.Dataset) and wanted:
                    raw[name] = _read_value(obj)

            f.visititems(visit)
            for group in (f.get("metadata"), f):  # precedence: datasets, then metadata attrs, then root attrs
                if isinstance(group, h5py.Group):
                    for attr, value in group.attrs.items():
                        raw.setdefault(f"metadata/{attr}", value.decode() if isinstance(value, bytes) else value)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:  # truncated or corrupt file
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: cannot read HDF5 file: {msg}") from e
    return raw


def _dataset_value(value):
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "U":  # numpy unicode has no HDF5 equivalent; store variable-length UTF-8
        return array.astype(object)
    return array


def write_d4rl_hdf5(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping | None = None) -> None:
    """Write `arrays` as datasets (names may contain '/', e.g. 'infos/qpos') and `metadata` as attributes of
    the `metadata` group. dtypes are kept. The file appears atomically: written to a temporary file in the same
    directory, then renamed over `path`, so readers never see a partial file and a failure leaves none behind.
    """
    import h5py

    metadata = dict(metadata or {})
    clash = [k for k in metadata if f"metadata/{k}" in arrays]
    if clash:
        raise ValueError(f"metadata key {clash[0]!r} is also given as the array 'metadata/{clash[0]}'")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name in arrays:  # insertion order, so equal inputs give byte-identical files
                parts = name.split("/")
                for depth in range(1, len(parts)):  # explicit groups: h5py's create_group stores no timestamps
                    f.require_group("/".join(parts[:depth]))
                value = _dataset_value(arrays[name])
                if isinstance(value, str) or value.dtype == object:
                    f.create_dataset(name, data=value, dtype=h5py.string_dtype())
                else:
                    f.create_dataset(name, data=value)
            if metadata:
                group = f.require_group("metadata")
                for key, value in metadata.items():
                    group.attrs[key] = value
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def metadata_scalars(raw: Mapping) -> dict:
    """'metadata/*' entries that are scalars or strings, as Python values, keys without the prefix."""
    out = {}
    for key, value in raw.items():
        if not key.startswith("metadata/"):
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if isinstance(value, np.generic):
            value = value.item()
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
        if isinstance(value, (str, int, float, bool)):
            out[key[len("metadata/"):]] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows -> transitions


def _flat(raw: Mapping, key: str) -> np.ndarray | None:
    return None if key not in raw else np.asarray(raw[key]).reshape(-1)


def episode_ends(raw: Mapping[str, np.ndarray], max_episode_steps: int = V0_MAX_EPISODE_STEPS) -> np.ndarray:
    """[N] bool, True on the last row of each episode.

    An episode ends at a terminal, at a timeout, and at the last row of the file. With `next_observations`,
    also wherever `next_observations[i] != observations[i+1]` (robust to missing or wrong timeouts). Without
    both `timeouts` and `next_observations` (D4RL v0), `max_episode_steps` consecutive rows with no terminal
    end an episode, as d4rl.qlearning_dataset assumes.
    """
    terminals = _flat(raw, "terminals").astype(bool)
    n = terminals.shape[0]
    ends = terminals.copy()
    if "timeouts" in raw:
        ends |= _flat(raw, "timeouts").astype(bool)
    if "next_observations" in raw:
        obs, next_obs = raw["observations"], raw["next_observations"]
        for start in range(0, n - 1, 1 << 18):  # chunked: float64 temporaries of a 2M-row file are large
            stop = min(start + (1 << 18), n - 1)
            after, predicted = obs[start + 1 : stop + 1], next_obs[start:stop]
            jump = np.abs(after.astype(np.float64) - predicted) > _CONTINUITY_RTOL * (1.0 + np.abs(after))
            ends[start:stop] |= jump.any(axis=1)
    elif "timeouts" not in raw:
        idx = np.arange(n)
        is_start = np.zeros(n, bool)
        is_start[0] = True
        is_start[1:] = terminals[:-1]
        pos = idx - np.maximum.accumulate(np.where(is_start, idx, 0))  # step index inside the episode
        ends |= (pos + 1) % max_episode_steps == 0
    ends[-1] = True
    return ends


def episode_stats(rewards: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode (returns float64, lengths int64) for rows split at `ends`."""
    stops = np.flatnonzero(ends) + 1
    starts = np.concatenate([[0], stops[:-1]])
    returns = np.add.reduceat(rewards.astype(np.float64), starts)
    return returns, (stops - starts).astype(np.int64)


def transitions_from_d4rl(
    raw: Mapping[str, np.ndarray], path: str, max_episode_steps: int = V0_MAX_EPISODE_STEPS
) -> tuple[Transitions, np.ndarray, np.ndarray]:
    """Transitions (float32) and per-episode returns/lengths from raw D4RL arrays (structure already checked).

    With `next_observations`: every row is one transition, as stored.

    Without it, the successor of row i is `observations[i+1]` only inside an episode (see `episode_ends`):
      * a non-terminal episode end (timeout, `max_episode_steps` cut, last row) has no known successor and is
        dropped; `observations[i+1]` there is the next episode's first state (d4rl.qlearning_dataset's bug);
      * a terminal row is kept, because the critic needs it and its target ignores s' (done = 1); its
        next_observations is a copy of observations[i] and `next_valid` is 0 so dynamics training can skip it.
    Timeouts are never terminals. `path` only names the source in errors.
    """
    del path  # errors about the content are raised by validation, before this is called
    obs = np.asarray(raw["observations"], dtype=np.float32)
    actions = np.asarray(raw["actions"], dtype=np.float32)
    rewards = _flat(raw, "rewards").astype(np.float32)
    terminals = _flat(raw, "terminals").astype(bool)
    ends = episode_ends(raw, max_episode_steps)
    returns, lengths = episode_stats(_flat(raw, "rewards"), ends)

    if "next_observations" in raw:
        transitions = Transitions.from_numpy(
            observations=obs,
            actions=actions,
            rewards=rewards,
            next_observations=np.asarray(raw["next_observations"], dtype=np.float32),
            terminals=terminals.astype(np.float32),
        )
        return transitions, returns, lengths

    keep = ~ends | terminals
    next_obs = np.empty_like(obs)
    next_obs[:-1] = obs[1:]
    next_obs[terminals] = obs[terminals]  # placeholder; masked by (1 - done) and by next_valid
    next_valid = (~terminals).astype(np.float32)
    transitions = Transitions.from_numpy(
        observations=obs[keep],
        actions=actions[keep],
        rewards=rewards[keep],
        next_observations=next_obs[keep],
        terminals=terminals[keep].astype(np.float32),
        next_valid=next_valid[keep] if terminals.any() else None,
    )
    return transitions, returns, lengths


# ----------------------------------------------------------------------------------------------------------
# D4RL dataset names -> the files d4rl caches

D4RL_ENVS = ("halfcheetah", "hopper", "walker2d")
D4RL_KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay", "mixed")
_D4RL_NAME = re.compile(r"^(halfcheetah|hopper|walker2d)-([a-z-]+)-v(\d+)$")
_D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


def parse_d4rl_name(name: str) -> tuple[str, str, int] | None:
    """'hopper-medium-replay-v2' -> ('hopper', 'medium-replay', 2); 'hopper-mixed-v0' -> (.., 'medium-replay', 0).

    None if `name` is not a D4RL locomotion dataset name.
    """
    m = _D4RL_NAME.match(name.strip().lower())
    if m is None or m.group(2) not in D4RL_KINDS:
        return None
    env, kind, version = m.group(1), m.group(2), int(m.group(3))
    if kind == "mixed":  # the v0 name of medium-replay (the paper's "mixed")
        if version != 0:
            return None
        kind = "medium-replay"
    if version not in (0, 1, 2) or (kind == "full-replay" and version == 0):
        return None
    return env, kind, version


def d4rl_file_name(name: str) -> str:
    """The file name d4rl caches for a dataset name (the last part of its download URL)."""
    parsed = parse_d4rl_name(name)
    if parsed is None:
        raise DataError(f"{name}: not a D4RL locomotion dataset name (e.g. hopper-medium-replay-v2)")
    env, kind, version = parsed
    if version == 0:
        if kind == "medium-replay":  # v0 replay files are "<env>_mixed.hdf5", walker's is "walker_mixed.hdf5"
            return f"{'walker' if env == 'walker2d' else env}_mixed.hdf5"
        return f"{env}_{kind.replace('-', '_')}.hdf5"
    return f"{env}_{kind.replace('-', '_')}-v{version}.hdf5"


def d4rl_name_for_file(stem: str) -> str | None:
    """The D4RL dataset name of a file named as d4rl caches it, given without '.hdf5' ('hopper_medium_replay-v2'
    -> 'hopper-medium-replay-v2', 'walker_mixed' -> 'walker2d-medium-replay-v0') or named by the dataset name;
    None for any other name."""
    stem = stem.strip().lower()
    if parse_d4rl_name(stem) is not None:
        return stem
    for env in D4RL_ENVS:
        for kind in D4RL_KINDS:
            for version in (0, 1, 2):
                name = f"{env}-{kind}-v{version}"
                if parse_d4rl_name(name) is not None and d4rl_file_name(name) == f"{stem}.hdf5":
                    return name
    return None


def d4rl_url(name: str) -> str:
    version = parse_d4rl_name(name)[2]
    folder = "gym_mujoco" if version == 0 else f"gym_mujoco_v{version}"
    return f"{_D4RL_URL}/{folder}/{d4rl_file_name(name)}"


def d4rl_search_dirs() -> list[str]:
    """$D4RL_DATASET_DIR (d4rl's own setting) if set, then d4rl's default ~/.d4rl/datasets."""
    dirs = []
    if os.environ.get("D4RL_DATASET_DIR"):
        dirs.append(os.environ["D4RL_DATASET_DIR"])
    dirs.append(os.path.join(os.path.expanduser("~"), ".d4rl", "datasets"))
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def resolve_d4rl_path(name: str) -> str:
    """Path of D4RL's cached file for `name`; DataError saying where it looked and how to get it if missing."""
    file_name = d4rl_file_name(name)
    dirs = d4rl_search_dirs()
    for directory in dirs:
        candidate = os.path.join(directory, file_name)
        if os.path.isfile(candidate):
            return candidate
    env, kind, _ = parse_d4rl_name(name)
    local_kind = "medium-replay" if kind == "full-replay" else kind  # closest kind the generator knows
    raise DataError(
        f"{name}: D4RL file {file_name} not found in {' or '.join(dirs)} ($D4RL_DATASET_DIR, then "
        f"~/.d4rl/datasets); copy D4RL's file into {dirs[0]} (from {d4rl_url(name)}), or make a local "
        f"stand-in with `mb2po-data generate --env {env} --kind {local_kind}` and use the name "
        f"{env}-{local_kind}-local"
    )

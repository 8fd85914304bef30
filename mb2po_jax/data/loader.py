"""`load_dataset`: one entry point for every way a user names data (file, D4RL name, local name, Minari id)."""

from __future__ import annotations

import logging
import os

from mb2po_jax.errors import DataError
from mb2po_jax.data import d4rl, registry, validation
from mb2po_jax.data.transitions import Dataset

HDF5_SUFFIXES = (".hdf5", ".h5")
_log = logging.getLogger(__name__)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in HDF5_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def describe_source(name_or_path: str) -> tuple[str, str]:
    """('file' | 'd4rl' | 'local' | 'minari', path or id) for a user's dataset argument, without reading it.

    Order: an existing path; a D4RL name; a local name (<env>-<kind>-local); a Minari id (contains '/').
    """
    s = os.fspath(name_or_path)
    if os.path.exists(s):
        if os.path.isdir(s):
            raise DataError(f"{s}: is a directory, expected a D4RL-layout .hdf5 file (or pass a Minari id)")
        return "file", s
    if s.endswith(HDF5_SUFFIXES):
        raise DataError(f"{s}: file not found")
    if d4rl.parse_d4rl_name(s) is not None:
        return "d4rl", d4rl.resolve_d4rl_path(s)
    if registry.is_local_name(s):
        local = registry.parse_local_name(s)
        if not os.path.isfile(local.path):
            raise DataError(
                f"{s}: local dataset file {local.path} not found (directory: $MB2PO_DATA_DIR, else "
                f"~/.cache/mb2po_jax/datasets); make it with `mb2po-data generate --env {local.env} "
                f"--kind {local.kind}`"
            )
        return "local", local.path
    if "/" in s:
        return "minari", s
    raise DataError(
        f"{s}: no such file, and not a D4RL name (e.g. hopper-medium-replay-v2), a local name "
        f"(e.g. hopper-medium-replay-local) or a Minari id (e.g. mujoco/hopper/medium-v0)"
    )


def _implied_env_id(name: str) -> str | None:
    """The environment a name implies (`name`: a file's stem, else the user's argument), for data that records
    none. D4RL's names and file names (hopper-medium-replay-v2, hopper_medium_replay-v2, walker_mixed) give
    D4RL_ENV_VERSION (v4, the models D4RL collected in); local names, Minari ids and other names v5."""
    d4rl_name = d4rl.d4rl_name_for_file(name)
    if d4rl_name is not None:
        return registry.env_id_for(d4rl_name, registry.D4RL_ENV_VERSION)
    if registry.is_local_name(name):
        return registry.parse_local_name(name).env_id
    if "/" in name:
        from mb2po_jax.data import minari_io  # imports minari, an optional extra: only when asked for

        return minari_io.implied_env_id(name)
    return registry.env_id_for(name) if registry.env_key(name) else None


def _recorded_env_id(metadata: dict) -> str | None:
    env_id = metadata.get("env_id")
    return env_id if isinstance(env_id, str) else None


def dataset_env_id(name_or_path: str, env_id: str | None = None) -> str:
    """The Gymnasium id `load_dataset` evaluates a dataset in, reading at most its metadata (no arrays).

    A source that is not there (a D4RL name whose file is not downloaded) is resolved from its name alone.
    DataError if the environment cannot be told.
    """
    if env_id is not None:
        return env_id
    s = os.fspath(name_or_path)
    try:
        kind, location = describe_source(s)
    except DataError:
        kind, location = None, s
    if kind == "minari":
        from mb2po_jax.data import minari_io

        recorded = minari_io.recorded_env_id(s)
    elif kind is not None:
        recorded = _recorded_env_id(d4rl.metadata_scalars(d4rl.read_d4rl_hdf5(location, arrays=False)))
    else:
        recorded = None
    named = _stem(s) if kind == "file" or s.endswith(HDF5_SUFFIXES) else s
    found = recorded or _implied_env_id(named)
    if found is None:
        raise DataError(f"{s}: cannot tell which environment this data is from; pass --env, e.g. --env Hopper-v5")
    return found


def load_dataset(name_or_path: str, env_id: str | None = None, *, validate: bool = True) -> Dataset:
    """Read and check a dataset; DataError (one line naming the source and the problem) on any bad input.

    `name_or_path`: a D4RL-layout .hdf5 file, a D4RL name (`hopper-medium-replay-v2`, `hopper-mixed-v0`; file
    looked up in $D4RL_DATASET_DIR or ~/.d4rl/datasets), a local generated name (`hopper-random-local`), or a
    Minari id (`mujoco/hopper/medium-v0`). The environment is `env_id` if given, else the file's
    `metadata/env_id` (Minari: its env spec), else the one the name implies (for files: the file name, like
    hopper_...hdf5): Gymnasium's v4 for D4RL's names and file names, whose data was collected in gym's v3
    models, v5 for the rest.

    `validate=False` skips the value and environment checks (NaN, bounds, sizes vs the env) but not the
    structural ones (keys, shapes, row counts) the conversion relies on.
    """
    s = os.fspath(name_or_path)
    kind, location = describe_source(s)
    if kind == "minari":
        from mb2po_jax.data import minari_io

        return minari_io.load_minari(s, env_id, validate=validate)

    path = location
    raw = d4rl.read_d4rl_hdf5(path, infos=False)
    metadata = d4rl.metadata_scalars(raw)
    env_id = env_id or _recorded_env_id(metadata) or _implied_env_id(_stem(path) if kind == "file" else s)
    if env_id is None:
        raise DataError(
            f"{path}: cannot tell which environment this data is from (no metadata/env_id, file name does "
            f"not start with {', '.join(sorted(registry.GYM_NAMES))}); pass --env, e.g. --env Hopper-v5"
        )
    if validate:
        if kind == "local":  # a local name promises its kind's current recipe
            registry.check_recipe(registry.parse_local_name(s), metadata, path)
        validation.validate_raw(raw, path, env_id)
    else:
        validation.check_structure(raw, path)
    transitions, returns, lengths = d4rl.transitions_from_d4rl(raw, path)
    dropped = int(lengths.sum()) - len(transitions)
    if dropped:  # SPEC: never shrink a dataset silently
        _log.info("%s: %d of %d rows end an episode without a recorded next state and are not transitions",
                  path, dropped, int(lengths.sum()))
    return Dataset(
        name=_stem(path) if kind == "file" else s,
        path=path,
        env_id=env_id,
        transitions=transitions,
        episode_returns=returns,
        episode_lengths=lengths,
        metadata=metadata,
    )

"""Names: D4RL reference scores, environment ids, and where locally generated datasets live."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from mb2po_jax.errors import DataError

# D4RL's reference returns (random policy / expert SAC), used for every version of its locomotion datasets.
REF_MIN_SCORE = {"halfcheetah": -280.178953, "hopper": -20.272305, "walker2d": 1.629008}
REF_MAX_SCORE = {"halfcheetah": 12135.0, "hopper": 3234.3, "walker2d": 4592.3}

# Short environment keys (D4RL's spelling) -> Gymnasium environment name without version.
GYM_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
_ALIASES = {"walker": "walker2d", "cheetah": "halfcheetah"}  # "walker" is D4RL v0's walker_mixed.hdf5

# Dataset kinds made with D4RL's recipe (SPEC section 2; random = the randomly initialised SAC policy), plus
# `uniform` (uniform random actions, not a D4RL kind); behavior/generation.py makes each.
LOCAL_KINDS = ("random", "uniform", "medium", "medium-replay", "expert", "medium-expert")
LOCAL_SUFFIX = "-local"
# metadata/algorithm of each kind's files. A local file whose recipe differs (a `random` file of uniform
# actions, made before random became the initial SAC policy) is refused by name (`check_recipe`).
RECIPES = {"random": "sac_init", "uniform": "uniform_random", "medium": "sac", "medium-replay": "sac",
           "expert": "sac", "medium-expert": "sac"}
# The built-in default of `mb2po-train`: a medium-replay dataset (where MB2PO has something to show, paper
# Table 1), rolled out from the shipped hopper behaviour policies on first use
# (`mb2po_jax.behavior.generation.ensure_default_dataset`).
DEFAULT_DATASET = "hopper-medium-replay-local"

# D4RL's locomotion files (v0-v2) were collected in gym's v3 MuJoCo environments. Gymnasium's v4 keeps those
# models on the `mujoco` bindings; v5 changed them (Walker2d's right foot friction 0.9 -> 1.9, no healthy
# reward on Hopper's and Walker2d's terminating step), so D4RL data is evaluated in v4. Our generated
# datasets (behavior/generation.py) and Minari's MuJoCo datasets are collected in v5.
D4RL_ENV_VERSION = "v4"
DEFAULT_ENV_VERSION = "v5"

_GYM_ID = re.compile(r"^(?:[\w.-]+/)?[\w.:-]+-v\d+$")


def env_key(name: str) -> str | None:
    """'hopper' for 'hopper-medium-v2', 'Hopper-v5', 'hopper_mixed', 'mujoco/hopper/medium-v0'; None if unknown."""
    text = name.strip().lower()
    parts = [p for p in text.split("/") if p]
    if len(parts) >= 2:  # Minari "namespace/env/dataset-vN" or "env/dataset-vN": the env is next to last
        text = parts[-2]
    elif parts:
        text = parts[0]
    token = re.split(r"[-_]", text, maxsplit=1)[0]
    token = _ALIASES.get(token, token)
    return token if token in GYM_NAMES else None


def _is_registered_gym_id(name: str) -> bool:
    if not _GYM_ID.match(name):
        return False
    import gymnasium  # deferred: only needed for ids we do not know

    return name in gymnasium.envs.registry


def env_id_for(name_or_env: str, version: str = DEFAULT_ENV_VERSION) -> str:
    """Gymnasium id of `version` for a dataset or environment name: 'hopper' -> 'Hopper-v5'.

    A name that already is a registered Gymnasium id ('Hopper-v4', 'Pendulum-v1') is returned unchanged;
    `version` only applies to names given by environment key. Unknown names raise DataError. Which version a
    dataset's data came from is the loader's business (`loader.dataset_env_id`: D4RL's is D4RL_ENV_VERSION).
    """
    if _is_registered_gym_id(name_or_env):
        return name_or_env
    key = env_key(name_or_env)
    if key is None:
        raise DataError(
            f"{name_or_env}: cannot tell the environment; use one of {', '.join(sorted(GYM_NAMES))} "
            f"or a Gymnasium id such as Hopper-v5"
        )
    return f"{GYM_NAMES[key]}-{version}"


def normalized_score(env: str, returns) -> np.ndarray:
    """D4RL normalised score 100 * (return - ref_min) / (ref_max - ref_min), as float64 array shaped like `returns`.

    `env` may be a dataset name, an environment key or a Gymnasium id. Environments without a D4RL reference
    score give NaN (not an error), so callers can log the raw return alongside without special cases.
    """
    returns = np.asarray(returns, dtype=np.float64)
    key = env_key(env)
    if key is None:
        return np.full(returns.shape, np.nan)
    lo, hi = REF_MIN_SCORE[key], REF_MAX_SCORE[key]
    return 100.0 * (returns - lo) / (hi - lo)


def has_reference_score(env: str) -> bool:
    return env_key(env) is not None


def local_data_dir() -> str:
    """Where generated datasets live: $MB2PO_DATA_DIR, else ~/.cache/mb2po_jax/datasets."""
    return os.environ.get("MB2PO_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mb2po_jax", "datasets"
    )


@dataclasses.dataclass(frozen=True)
class LocalName:
    env: str  # environment key ("hopper") or a Gymnasium id ("InvertedPendulum-v5")
    kind: str  # one of LOCAL_KINDS

    @property
    def name(self) -> str:
        return f"{self.env}-{self.kind}{LOCAL_SUFFIX}"

    @property
    def env_id(self) -> str:
        return env_id_for(self.env)

    @property
    def file_name(self) -> str:
        # D4RL's convention (hopper_medium_replay-v2.hdf5) with "local" in place of the version.
        return f"{self.env}_{self.kind.replace('-', '_')}{LOCAL_SUFFIX}.hdf5"

    @property
    def path(self) -> str:
        return os.path.join(local_data_dir(), self.file_name)


def is_local_name(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIX) and os.sep not in name and not name.endswith(".hdf5")


def parse_local_name(name: str) -> LocalName:
    """'hopper-medium-replay-local' -> LocalName('hopper', 'medium-replay'). DataError if malformed."""
    stem = name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else name
    for kind in sorted(LOCAL_KINDS, key=len, reverse=True):  # "medium-expert" before "expert"
        if stem.endswith("-" + kind) and len(stem) > len(kind) + 1:
            return LocalName(env=stem[: -len(kind) - 1], kind=kind)
    raise DataError(
        f"{name}: not a local dataset name; expected <env>-<kind>-local with kind one of "
        f"{', '.join(LOCAL_KINDS)} (e.g. hopper-medium-replay-local)"
    )


def local_name_for(env: str, kind: str) -> LocalName:
    """Local name for an environment (key, D4RL-style name or Gymnasium id) and kind."""
    if kind not in LOCAL_KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {', '.join(LOCAL_KINDS)}")
    key = env_key(env)
    if _is_registered_gym_id(env):
        # The default-version id of a known env ("Hopper-v5") shares the short name; other ids keep theirs.
        return LocalName(env=key if key and env == env_id_for(key) else env, kind=kind)
    if key is None:
        raise DataError(
            f"unknown environment {env!r}; use one of {', '.join(sorted(GYM_NAMES))} or a Gymnasium id"
        )
    return LocalName(env=key, kind=kind)


def check_recipe(local: LocalName, metadata: dict, path: str) -> None:
    """DataError if the file of local dataset `local` was made with another recipe than its kind's now."""
    made, expected = metadata.get("algorithm"), RECIPES.get(local.kind)
    if metadata.get("kind") == local.kind and made is not None and made != expected:
        raise DataError(
            f"{local.name}: {path} was made by an older recipe (algorithm {made}, now {expected}); make it again "
            f"with `mb2po-data generate --env {local.env} --kind {local.kind} --force`")

"""Checks on raw D4RL-layout arrays before any work is done with them.

Every problem raises DataError with one line naming the source (file, dataset name) and the problem, e.g.
"hopper.hdf5: observations has NaN at row 1234". Used for D4RL files, generated files and Minari data.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mb2po_jax.errors import DataError
from mb2po_jax.data.envs import EnvSpaces, env_spaces

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
FLAG_KEYS = ("terminals", "timeouts")
# Absolute slack on the action bounds, scaled by max(1, |bound|): float rounding of actions stored at the bound.
ACTION_TOLERANCE = 1e-3
_CHUNK = 1 << 18  # rows per chunk when scanning values, to bound temporary memory on multi-million-row files
_F32_MAX = float(np.finfo(np.float32).max)


def check_structure(raw: Mapping[str, np.ndarray], source: str) -> int:
    """Keys, shapes, row counts and dtypes; returns the number of rows N."""
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        found = ", ".join(sorted(k for k in raw if "/" not in k)) or "none"
        raise DataError(f"{source}: missing key '{missing[0]}' (top-level datasets found: {found})")
    arrays = {k: raw[k] for k in (*REQUIRED_KEYS, "timeouts", "next_observations") if k in raw}
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise DataError(f"{source}: {key} is not an array (got {type(value).__name__})")
    n = arrays["observations"].shape[0]
    for key, value in arrays.items():
        if value.shape[0] != n:
            raise DataError(f"{source}: {key} has {value.shape[0]} rows, observations has {n}")
    if n == 0:
        raise DataError(f"{source}: dataset is empty (0 rows)")
    for key in ("observations", "actions", "next_observations"):
        if key in arrays and arrays[key].ndim != 2:
            raise DataError(f"{source}: {key} must be 2-D [N, dim], got shape {arrays[key].shape}")
    if "next_observations" in arrays and arrays["next_observations"].shape != arrays["observations"].shape:
        raise DataError(
            f"{source}: next_observations has shape {arrays['next_observations'].shape}, "
            f"observations {arrays['observations'].shape}"
        )
    for key in ("rewards", *FLAG_KEYS):
        if key in arrays and arrays[key].shape not in ((n,), (n, 1)):
            raise DataError(f"{source}: {key} must have shape ({n},) or ({n}, 1), got {arrays[key].shape}")
    for key in ("observations", "actions", "rewards", "next_observations"):
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.floating):
            raise DataError(f"{source}: {key} has dtype {arrays[key].dtype}, expected float32 or float64")
    for key in FLAG_KEYS:
        if key in arrays and not (arrays[key].dtype == np.bool_ or np.issubdtype(arrays[key].dtype, np.number)):
            raise DataError(f"{source}: {key} has dtype {arrays[key].dtype}, expected bool or 0/1 numbers")
    return int(n)


def _first_bad_row(bad: np.ndarray) -> int | None:
    rows = bad.reshape(bad.shape[0], -1).any(axis=1)
    return int(np.argmax(rows)) if rows.any() else None


def check_finite(value: np.ndarray, key: str, source: str) -> None:
    """NaN, inf, or (for float64 data) values that overflow the float32 we train in; reports the first row."""
    wide = value.dtype.itemsize > 4
    for start in range(0, value.shape[0], _CHUNK):
        chunk = value[start : start + _CHUNK]
        ok = np.abs(chunk) <= _F32_MAX if wide else np.isfinite(chunk)  # both False for NaN and inf
        row = _first_bad_row(~ok)
        if row is not None:
            bad = chunk[row].reshape(-1)[~ok[row].reshape(-1)][0]
            what = "NaN" if np.isnan(bad) else ("inf" if np.isinf(bad) else f"value {bad:g} beyond float32 range")
            raise DataError(f"{source}: {key} has {what} at row {start + row}")


def check_values(raw: Mapping[str, np.ndarray], source: str) -> None:
    """All float arrays finite; terminal/timeout flags 0 or 1."""
    for key in ("observations", "actions", "rewards", "next_observations"):
        if key in raw:
            check_finite(raw[key], key, source)
    for key in FLAG_KEYS:
        if key in raw and raw[key].dtype != np.bool_:
            flags = raw[key].reshape(-1)
            row = _first_bad_row((flags != 0) & (flags != 1))
            if row is not None:
                raise DataError(f"{source}: {key} has value {flags[row]:g} at row {row} (expected 0 or 1)")


def check_env(raw: Mapping[str, np.ndarray], source: str, spaces: EnvSpaces) -> None:
    """Observation/action sizes match the environment; actions inside its bounds (small tolerance)."""
    obs_dim, act_dim = raw["observations"].shape[1], raw["actions"].shape[1]
    if obs_dim != spaces.obs_dim:
        raise DataError(
            f"{source}: observations have {obs_dim} dims, {spaces.env_id} expects {spaces.obs_dim}"
        )
    if act_dim != spaces.act_dim:
        raise DataError(f"{source}: actions have {act_dim} dims, {spaces.env_id} expects {spaces.act_dim}")
    low, high = spaces.act_low, spaces.act_high
    tol_low = ACTION_TOLERANCE * np.maximum(1.0, np.abs(low))
    tol_high = ACTION_TOLERANCE * np.maximum(1.0, np.abs(high))
    actions = raw["actions"]
    for start in range(0, actions.shape[0], _CHUNK):
        chunk = actions[start : start + _CHUNK]
        bad = (chunk < low - tol_low) | (chunk > high + tol_high)
        row = _first_bad_row(bad)
        if row is not None:
            dim = int(np.argmax(bad[row]))
            raise DataError(
                f"{source}: actions out of {spaces.env_id}'s bounds at row {start + row}: "
                f"value {chunk[row, dim]:g} in dim {dim}, bounds [{low[dim]:g}, {high[dim]:g}]"
            )


def validate_raw(raw: Mapping[str, np.ndarray], source: str, env_id: str | None) -> int:
    """Every check: structure, values, and (when env_id is given) the environment's spaces. Returns N."""
    n = check_structure(raw, source)
    check_values(raw, source)
    if env_id is not None:
        try:
            spaces = env_spaces(env_id)
        except DataError as e:
            raise DataError(f"{source}: {e}") from e
        check_env(raw, source, spaces)
    return n

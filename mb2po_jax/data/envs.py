"""Making Gymnasium environments quietly, and their space shapes/bounds for validating data."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings

import numpy as np

from mb2po_jax.errors import DataError

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_mujoco():
    """Route MuJoCo's compiler warnings to logging instead of stderr and ./MUJOCO_LOG.TXT.

    MuJoCo >= 3.3 warns that HalfCheetah's XML uses the deprecated 'settotalmass'; printed, it breaks the
    one-line output contract of the CLIs and litters the working directory with MUJOCO_LOG.TXT.
    """
    try:
        import mujoco
    except ImportError:  # a non-MuJoCo environment: nothing to silence
        yield
        return
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda msg: _log.debug("mujoco: %s", msg))
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_env(env_id: str, **kwargs):
    """gymnasium.make(env_id, **kwargs) without MuJoCo's warning noise; DataError if it cannot be made.

    Gymnasium warns that v4 is "out of date": D4RL's data is evaluated in v4 on purpose (registry.
    D4RL_ENV_VERSION), so that warning is dropped; any other is kept.
    """
    import gymnasium as gym

    try:
        with quiet_mujoco(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is out of date", category=DeprecationWarning)
            return gym.make(env_id, **kwargs)
    except Exception as e:  # unknown id, missing optional dependency, bad kwargs
        msg = " ".join(str(e).split())
        raise DataError(f"cannot make Gymnasium environment {env_id!r}: {type(e).__name__}: {msg}") from e


@dataclasses.dataclass(frozen=True)
class EnvSpaces:
    env_id: str
    obs_shape: tuple
    act_shape: tuple
    act_low: np.ndarray  # [act_dim] float64
    act_high: np.ndarray  # [act_dim] float64

    @property
    def obs_dim(self) -> int:
        return int(self.obs_shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.act_shape[0])

    def from_unit_actions(self, action) -> np.ndarray:
        """A policy's action in (-1, 1)^act_dim (a tanh policy's: SAC, AWAC) -> the env's [act_low,
        act_high], float64."""
        return self.act_low + (np.asarray(action, np.float64) + 1.0) * 0.5 * (self.act_high - self.act_low)

    def to_unit_actions(self, action) -> np.ndarray:
        """The env's actions -> the policy's [-1, 1] scale, float32 (the inverse of `from_unit_actions`)."""
        return (2.0 * (action - self.act_low) / (self.act_high - self.act_low) - 1.0).astype(np.float32)

    @property
    def unit_actions(self) -> bool:
        """Whether the env's action bounds already are [-1, 1] (no rescaling needed)."""
        return bool(np.all(self.act_low == -1.0) and np.all(self.act_high == 1.0))


@functools.lru_cache(maxsize=None)
def env_spaces(env_id: str) -> EnvSpaces:
    """Observation/action shapes and action bounds of `env_id` (made once per process and cached).

    Only flat Box observation and action spaces are supported: the data layout stores one row per step.
    """
    import gymnasium as gym

    env = make_env(env_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise DataError(f"{env_id}: action space {act_space} is not a flat Box; only continuous actions are supported")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise DataError(f"{env_id}: observation space {obs_space} is not a flat Box")
    return EnvSpaces(
        env_id=env_id,
        obs_shape=tuple(obs_space.shape),
        act_shape=tuple(act_space.shape),
        act_low=np.asarray(act_space.low, np.float64),
        act_high=np.asarray(act_space.high, np.float64),
    )

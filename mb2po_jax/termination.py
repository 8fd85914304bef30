"""Per-environment termination rules for imagined transitions (paper: "trajectories stop at predicted
termination"; SPEC section 3 for the correct rules).

Every rule has the signature `fn(obs [B, o], act [B, a], next_obs [B, o]) -> done [B] bool` and looks only
at `next_obs`, in Gymnasium v5's default observation layout (`exclude_current_positions_from_observation=
True`): obs = [qpos[1:], clip(qvel, -10, 10)], so obs[0] is the torso height z = qpos[1] and obs[1] the torso
angle = qpos[2]. D4RL's gym v2 datasets (Hopper-v3 / Walker2d-v3) use the same layout.

Differences from Gymnasium's own `is_healthy` (checked against the real envs in tests/test_termination.py):
- Hopper-v5 applies the |x| < 100 state range to `state_vector()[2:]`, i.e. qpos[2:] and the UNCLIPPED
  qvel, whereas observations carry qvel clipped to [-10, 10]. On observations the velocity part of the range
  can therefore never fire; a real Hopper whose joint speed exceeds 100 would terminate where this rule does
  not. Nothing in an observation reveals that, and it does not happen in normal play.
- Hopper: we also require every entry of next_obs to be finite (SPEC); Gymnasium gets the same effect for z
  and angle because comparisons with NaN are False. Walker2d's rule is likewise False-on-NaN, so non-finite
  predictions terminate there too. HalfCheetah never terminates (the rollout engine separately invalidates
  non-finite predictions, so they never reach a buffer).
- Bounds are strict as in the code (`min < x < max`); the v5 docs say "closed interval".

MOPO's `static_fns/hopper.py` writes `np.abs(next_obs[:, 1:] < 100)`: the parenthesis makes `abs` act on
the boolean, so only the upper bound s[1:] < 100 is checked and a predicted s[i] = -150 stays "healthy"
(SPEC section 3 calls it the misplaced parenthesis). Here the whole |s[1:]| < 100 range is checked.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

TerminationFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def hopper_termination(obs: jax.Array, act: jax.Array, next_obs: jax.Array) -> jax.Array:
    """Hopper-v5 defaults: healthy iff finite, |s[1:]| < 100, z = s[0] > 0.7, |angle = s[1]| < 0.2."""
    del obs, act
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (
        jnp.all(jnp.isfinite(next_obs), axis=-1)
        & jnp.all(jnp.abs(next_obs[:, 1:]) < 100.0, axis=-1)
        & (z > 0.7)
        & (jnp.abs(angle) < 0.2)
    )
    return ~healthy


def walker2d_termination(obs: jax.Array, act: jax.Array, next_obs: jax.Array) -> jax.Array:
    """Walker2d-v5 defaults: healthy iff 0.8 < z = s[0] < 2.0 and -1 < angle = s[1] < 1."""
    del obs, act
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~healthy


def never_terminate(obs: jax.Array, act: jax.Array, next_obs: jax.Array) -> jax.Array:
    """HalfCheetah (and unknown environments): no terminal states."""
    del obs, act
    return jnp.zeros(next_obs.shape[:1], dtype=bool)


halfcheetah_termination = never_terminate

_RULES: tuple[tuple[str, TerminationFn], ...] = (
    ("halfcheetah", halfcheetah_termination),
    ("hopper", hopper_termination),
    ("walker2d", walker2d_termination),
)


def termination_fn_for(env: str | TerminationFn) -> TerminationFn:
    """Rule for a Gymnasium id ("Hopper-v5"), a D4RL/Minari/local dataset name ("hopper-medium-replay-v2",
    "mujoco/walker2d/medium-v0") or a bare name ("walker2d"). A callable is returned unchanged, so users can
    pass their own rule. Unknown names never terminate, with a warning."""
    if callable(env):
        return env
    key = re.sub(r"[^a-z0-9]", "", str(env).lower())  # "Half_Cheetah-v5" -> "halfcheetahv5"
    for name, fn in _RULES:
        if name in key:
            return fn
    if "walker" in key:
        return walker2d_termination
    if "cheetah" in key:
        return halfcheetah_termination
    warnings.warn(
        f"termination_fn_for: no termination rule known for {env!r}; imagined rollouts will never "
        "terminate. Pass your own fn(obs, act, next_obs) -> done [B] bool if the environment has terminal "
        "states.",
        stacklevel=2,
    )
    return never_terminate

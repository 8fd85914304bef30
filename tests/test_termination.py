"""Termination rules: hand-made states, name lookup, and agreement with Gymnasium's own flags."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import termination as T


def _done(fn, next_obs):
    next_obs = jnp.asarray(np.asarray(next_obs, np.float32))
    obs = jnp.zeros_like(next_obs)
    act = jnp.zeros((next_obs.shape[0], 3))
    return np.asarray(fn(obs, act, next_obs))


def _hopper(z=1.25, angle=0.0, **entries):
    s = np.zeros(11, np.float32)
    s[0], s[1] = z, angle
    for i, v in entries.items():
        s[int(i[1:])] = v
    return s


def test_hopper_rule_each_condition():
    cases = {
        "healthy": (_hopper(), False),
        "low height, angle ok (too low)": (_hopper(z=0.69), True),
        "height at bound is unhealthy (strict)": (_hopper(z=0.7), True),
        "tall is fine (no upper bound)": (_hopper(z=5.0), False),
        "angle too positive": (_hopper(angle=0.21), True),
        "angle too negative": (_hopper(angle=-0.21), True),
        # MOPO's np.abs(s[:, 1:] < 100) only checks the upper bound: these two would survive there.
        "state below -100 (MOPO misses it)": (_hopper(s5=-150.0), True),
        "joint below -100 (MOPO misses it)": (_hopper(s3=-101.0), True),
        "state above 100": (_hopper(s7=150.0), True),
        "NaN velocity": (_hopper(s8=np.nan), True),
        "inf height": (_hopper(z=np.inf), True),
    }
    states = np.stack([s for s, _ in cases.values()])
    expected = np.array([d for _, d in cases.values()])
    got = _done(T.hopper_termination, states)
    for name, e, g in zip(cases, expected, got):
        assert e == g, name


def test_walker2d_rule_each_condition():
    def w(z, angle):
        s = np.zeros(17, np.float32)
        s[0], s[1] = z, angle
        return s

    cases = [
        (w(1.2, 0.0), False), (w(0.79, 0.0), True), (w(2.01, 0.0), True), (w(1.2, 1.01), True),
        (w(1.2, -1.01), True), (w(1.2, 0.99), False), (w(np.nan, 0.0), True), (w(0.8, 0.0), True),
    ]
    got = _done(T.walker2d_termination, np.stack([c for c, _ in cases]))
    np.testing.assert_array_equal(got, [d for _, d in cases])


def test_halfcheetah_never_terminates():
    s = np.full((4, 17), 1e3, np.float32)
    assert not _done(T.halfcheetah_termination, s).any()


def test_lookup_by_names_and_callables():
    assert T.termination_fn_for("Hopper-v5") is T.hopper_termination
    assert T.termination_fn_for("hopper-medium-replay-v2") is T.hopper_termination
    assert T.termination_fn_for("mujoco/walker2d/medium-v0") is T.walker2d_termination
    assert T.termination_fn_for("Walker2d-v5") is T.walker2d_termination
    assert T.termination_fn_for("halfcheetah-random-v2") is T.halfcheetah_termination
    assert T.termination_fn_for("HalfCheetah-v5") is T.halfcheetah_termination
    mine = lambda o, a, n: jnp.ones(n.shape[0], bool)
    assert T.termination_fn_for(mine) is mine
    with pytest.warns(UserWarning, match="no termination rule"):
        fn = T.termination_fn_for("Ant-v5")
    assert not _done(fn, np.zeros((2, 27))).any()


@pytest.mark.parametrize(
    "env_id, fn", [("Hopper-v5", T.hopper_termination), ("Walker2d-v5", T.walker2d_termination)]
)
def test_agrees_with_gymnasium_terminated_flag(env_id, fn):
    gym = pytest.importorskip("gymnasium")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_id)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    next_obs, flags = [], []
    for _ in range(600):
        # Random actions, sometimes saturated, so episodes fall over in many different ways.
        act = np.clip(rng.normal(0.0, 1.0, env.action_space.shape), -1, 1)
        obs, _, terminated, truncated, _ = env.step(act)
        # Layout check: obs[0] is the torso height qpos[1], obs[1] the torso angle qpos[2].
        qpos = env.unwrapped.data.qpos
        assert obs[0] == qpos[1] and obs[1] == qpos[2]
        next_obs.append(obs)
        flags.append(terminated)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    flags = np.array(flags)
    assert 5 < flags.sum() < len(flags) - 100, "the check needs both outcomes"
    got = _done(fn, np.stack(next_obs))
    np.testing.assert_array_equal(got, flags)


@pytest.mark.parametrize(
    "env_id, fn, z_range, angle_range",
    [
        ("Hopper-v5", T.hopper_termination, (0.5, 0.9), (-0.3, 0.3)),
        ("Walker2d-v5", T.walker2d_termination, (0.6, 2.2), (-1.3, 1.3)),
    ],
)
def test_agrees_with_gymnasium_is_healthy_near_every_bound(env_id, fn, z_range, angle_range):
    """Random steps rarely reach some bounds (e.g. hopper height), so also set states around each bound
    and compare with the env's own `is_healthy` on its own observation."""
    gym = pytest.importorskip("gymnasium")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    obs, healthy = [], []
    for i in range(400):
        qpos = env.init_qpos + rng.uniform(-0.1, 0.1, env.model.nq)
        qpos[1] = rng.uniform(*z_range)
        qpos[2] = rng.uniform(*angle_range)
        if i % 4 == 0:  # joint angles beyond the +-100 state range, both signs
            qpos[3 + i % 3] = rng.choice([-1.0, 1.0]) * rng.uniform(90.0, 110.0)
        qvel = rng.uniform(-5.0, 5.0, env.model.nv)  # |qvel| < 10: observation clipping is a no-op
        env.set_state(qpos, qvel)
        obs.append(env._get_obs())
        healthy.append(bool(env.is_healthy))
    env.close()
    healthy = np.array(healthy)
    assert 50 < healthy.sum() < 350
    np.testing.assert_array_equal(_done(fn, np.stack(obs)), ~healthy)

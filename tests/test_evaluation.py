"""evaluate(): reproducible real-environment returns with one batched policy call per step."""

import gymnasium as gym
import numpy as np
import pytest

from mb2po_jax.evaluation import EvalResult, evaluate


class DampingPolicy:
    """Pendulum controller a = -gain_s * theta_dot, a different gain per training seed s."""

    def __init__(self, gains):
        self.gains = np.asarray(gains, np.float32)  # [S]
        self.calls = 0

    def __call__(self, obs):  # obs: [S, N, 3]
        assert obs.dtype == np.float32 and obs.shape[0] == len(self.gains)
        self.calls += 1
        return -self.gains[:, None, None] * obs[..., 2:3]


def test_pendulum_reproducible_one_call_per_step():
    policy = DampingPolicy([0.5, 2.0])
    res = evaluate(policy, "Pendulum-v1", num_seeds=2, num_episodes=3, seed=0, max_episode_steps=200)
    assert isinstance(res, EvalResult)
    assert res.returns.shape == (2, 3) and res.lengths.shape == (2, 3)
    assert policy.calls == 200  # one call per step for all 6 episodes together
    np.testing.assert_array_equal(res.lengths, 200)
    assert np.all(res.returns < 0)
    assert len(np.unique(res.returns)) == 6  # different start states and different policies
    np.testing.assert_allclose(res.mean_return(), res.returns.mean(1))
    np.testing.assert_allclose(res.std_return(), res.returns.std(1))

    again = evaluate(DampingPolicy([0.5, 2.0]), "Pendulum-v1", num_seeds=2, num_episodes=3, seed=0,
                     max_episode_steps=200)
    np.testing.assert_array_equal(again.returns, res.returns)
    other = evaluate(DampingPolicy([0.5, 2.0]), "Pendulum-v1", num_seeds=2, num_episodes=3, seed=1,
                     max_episode_steps=200)
    assert not np.any(other.returns == res.returns)

    # Seed row s is the same as evaluating that policy alone with seed + 1000 * s.
    alone = evaluate(DampingPolicy([2.0]), "Pendulum-v1", num_seeds=1, num_episodes=3, seed=1000,
                     max_episode_steps=200)
    np.testing.assert_array_equal(alone.returns[0], res.returns[1])


def test_actions_clipped_to_bounds():
    kw = dict(num_seeds=1, num_episodes=2, seed=3, max_episode_steps=30)
    big = evaluate(lambda o: np.full(o.shape[:2] + (1,), 50.0), "Pendulum-v1", **kw)
    at_bound = evaluate(lambda o: np.full(o.shape[:2] + (1,), 2.0), "Pendulum-v1", **kw)
    np.testing.assert_array_equal(big.returns, at_bound.returns)


def test_early_termination_matches_manual_rollout():
    calls = []

    def zero_policy(obs):
        calls.append(obs.shape)
        return np.zeros(obs.shape[:2] + (1,), np.float32)

    res = evaluate(zero_policy, "InvertedPendulum-v5", num_seeds=2, num_episodes=2, seed=7,
                   max_episode_steps=1000)
    assert np.all(res.lengths < 1000) and np.all(res.lengths > 0)
    assert len(calls) == res.lengths.max()
    for s in range(2):
        for j in range(2):
            env = gym.make("InvertedPendulum-v5", max_episode_steps=1000)
            env.reset(seed=7 + 1000 * s + j)
            total, steps, done = 0.0, 0, False
            while not done:
                _, r, term, trunc, _ = env.step(np.zeros(1, np.float32))
                total, steps, done = total + r, steps + 1, term or trunc
            env.close()
            assert res.lengths[s, j] == steps
            assert res.returns[s, j] == pytest.approx(total, rel=0, abs=1e-12)


def test_bad_act_fn_output_is_reported():
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda o: np.zeros((1, 1)), "Pendulum-v1", num_seeds=1, num_episodes=1, seed=0,
                 max_episode_steps=5)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(lambda o: np.full(o.shape[:2] + (1,), np.nan), "Pendulum-v1", num_seeds=1,
                 num_episodes=1, seed=0, max_episode_steps=5)

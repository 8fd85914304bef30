"""Rollout engine on hand-built ensembles whose every output is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.rollout import init_tanh_gaussian_policy, tanh_gaussian_policy_fn
from mb2po_jax import dynamics as dyn
from mb2po_jax import rollout as ro
from mb2po_jax.termination import never_terminate

OBS, ACT = 2, 1
D = OBS + 1


def hand_state(means, raw_logvar, elites, min_logvar=-10.0, max_logvar=0.5):
    """Ensemble whose member e outputs mean[e] (delta_obs, r) and raw log-variance raw_logvar[e] for every
    input: all weights zero, so only the last layer's bias matters (swish(0) = 0)."""
    means, raw_logvar = np.asarray(means, np.float32), np.asarray(raw_logvar, np.float32)
    e, h = means.shape[0], 8
    cfg = dyn.DynamicsConfig(num_members=e, num_elites=len(elites), hidden_dims=(h,), weight_decay=(0.0, 0.0))
    params = {
        "layers": [
            {"w": np.zeros((e, OBS + ACT, h), np.float32), "b": np.zeros((e, 1, h), np.float32)},
            {"w": np.zeros((e, h, 2 * D), np.float32),
             "b": np.concatenate([means, raw_logvar], -1)[:, None, :]},
        ],
        "max_logvar": np.full((e, 1, D), max_logvar, np.float32),
        "min_logvar": np.broadcast_to(np.asarray(min_logvar, np.float32), (e, 1, D)).copy(),
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return dyn.DynamicsState(
        params=params, opt_state=None, input_mean=jnp.zeros(OBS + ACT), input_std=jnp.ones(OBS + ACT),
        best_params=params, best_holdout_mse=jnp.zeros(e), elites=jnp.asarray(elites, jnp.int32),
        epoch=jnp.int32(0), step=jnp.int32(0), epochs_since_improvement=jnp.int32(0),
        obs_dim=OBS, act_dim=ACT, config=cfg,
    )


def zero_policy(params, key, obs):
    return jnp.zeros((obs.shape[0], ACT))


def np_var(raw, mx=0.5, mn=-10.0):
    """MBPO's soft clamp written out independently (two softplus), then exp."""
    softplus = lambda z: np.logaddexp(z, 0.0)
    lv = mx - softplus(mx - raw)
    lv = mn + softplus(lv - mn)
    return np.exp(lv)


RAW = np.array([[-2.0, 0.3, -1.0], [3.0, 3.0, 3.0], [-0.5, -4.0, 1.0], [-8.0, -8.0, -8.0]])
MEANS = np.array([[0.1, -0.2, 1.0], [0.9, 0.9, 1.0], [-0.3, 0.4, 1.0], [0.0, 0.05, 1.0]])
ELITES = [2, 0, 3]  # member 1 (largest std, farthest mean) is not an elite


@pytest.mark.parametrize("members", ["elites", "all"])
@pytest.mark.parametrize("penalty", ["max_std", "max_aleatoric", "ensemble_disagreement"])
def test_penalty_equals_hand_computed_value(penalty, members):
    raw = RAW.copy()
    raw[:, OBS] = -200.0  # reward variance at the floor: the drawn reward is its mean (1.0)
    min_lv = np.array([-10.0, -10.0, -60.0])
    state = hand_state(MEANS, raw, ELITES, min_logvar=min_lv)
    var = np.exp(min_lv) + np.exp(0.5) / (1 + np.exp(0.5 - raw))  # = np_var with the per-dim floor
    np.testing.assert_allclose(var[:, :OBS], np_var(raw[:, :OBS]), rtol=1e-6)
    penalised = ELITES if members == "elites" else list(range(len(RAW)))  # the paper: all N members
    if penalty == "max_std":
        u = np.sqrt(var[penalised].sum(-1)).max()
    elif penalty == "max_aleatoric":  # MOPO: over all members, elites or not
        u = np.sqrt(var.sum(-1)).max()
    else:
        mu = MEANS[penalised, :OBS]
        u = np.linalg.norm(mu - mu.mean(0), axis=-1).max()
    lam = 2.5
    cfg = ro.RolloutConfig(horizon=2, penalty_coef=lam, penalty=penalty, rollout_members=members, chunk_size=64)
    batch, _, metrics = ro.make_rollout_fn(zero_policy, never_terminate, cfg)(
        jax.random.PRNGKey(1), None, state, jnp.zeros((16, OBS))
    )
    np.testing.assert_allclose(float(metrics["mean_uncertainty"]), u, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.rewards), 1.0 - lam * u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["mean_penalty"]), lam * u, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mean_raw_reward"]), 1.0, rtol=1e-5)


def test_trajectory_terminating_at_step_k_yields_k_valid_rows():
    # Every member moves x by +1 per step (no noise); terminate once x > 0. Start x0 = 0.5 - k stops at
    # step k exactly. B = 13 with chunks of 5 also exercises the padded last chunk.
    raw = np.full((2, D), -200.0)
    state = hand_state([[1.0, 0.0, 0.5], [1.0, 0.0, 0.5]], raw, [0, 1], min_logvar=-60.0)
    h = 4
    k = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 4, 3, 2])
    b = len(k)
    start = np.stack([0.5 - k, np.arange(b)], axis=1).astype(np.float32)
    stop_at_positive_x = lambda obs, act, next_obs: next_obs[:, 0] > 0
    cfg = ro.RolloutConfig(horizon=h, penalty_coef=0.0, chunk_size=5)
    batch, valid, metrics = ro.make_rollout_fn(zero_policy, stop_at_positive_x, cfg)(
        jax.random.PRNGKey(0), None, state, jnp.asarray(start)
    )
    assert batch.observations.shape == (h * b, OBS) and valid.shape == (h * b,)
    valid = np.asarray(valid).reshape(h, b)  # row t * B + b
    done = np.asarray(batch.terminals).reshape(h, b)
    obs = np.asarray(batch.observations).reshape(h, b, OBS)
    next_obs = np.asarray(batch.next_observations).reshape(h, b, OBS)
    np.testing.assert_array_equal(valid.sum(0), np.minimum(k, h))
    for j in range(b):
        np.testing.assert_array_equal(valid[:, j], np.arange(h) < k[j])  # a prefix, then nothing
        expected_done = np.zeros(h, bool)
        if k[j] <= h:
            expected_done[k[j] - 1] = True  # the terminating transition itself is valid, done=1
        np.testing.assert_array_equal(done[:, j], expected_done)
        n = min(k[j], h)
        np.testing.assert_allclose(obs[:n, j, 1], j)  # rows belong to trajectory j
        np.testing.assert_allclose(next_obs[: n - 1, j], obs[1:n, j])  # s'_t = s_{t+1}
    assert int(metrics["num_valid"]) == np.minimum(k, h).sum()
    np.testing.assert_allclose(float(metrics["fraction_terminated"]), np.mean(k <= h))


@pytest.mark.parametrize("penalty, members", [("max_std", "elites"), ("max_aleatoric", "elites"),
                                              ("max_std", "all")])
def test_member_choice_is_uniform_over_the_member_set(penalty, members):
    e = 5
    means = np.zeros((e, D))
    means[:, 0] = np.arange(e)  # member i moves x by exactly i
    state = hand_state(means, np.full((e, D), -200.0), [4, 0, 2], min_logvar=-60.0)
    b = 6000
    cfg = ro.RolloutConfig(horizon=1, penalty=penalty, rollout_members=members, chunk_size=1024)
    batch, valid, _ = ro.make_rollout_fn(zero_policy, never_terminate, cfg)(
        jax.random.PRNGKey(3), None, state, jnp.zeros((b, OBS))
    )
    assert valid.shape == (b,) and bool(valid.all())
    chosen = np.rint(np.asarray(batch.next_observations[:, 0])).astype(int)
    allowed = [0, 2, 4] if members == "elites" else list(range(e))
    counts = np.bincount(chosen, minlength=e)
    assert set(np.flatnonzero(counts)) == set(allowed)
    expected = b / len(allowed)
    chi2 = np.sum((counts[allowed] - expected) ** 2 / expected)
    assert chi2 < {2: 13.8, 4: 18.5}[len(allowed) - 1]  # p = 0.001


def test_non_finite_predictions_never_become_valid_rows():
    means = np.array([[0.1, 0.0, 1.0], [np.inf, 0.0, 1.0]])  # member 1 blows up
    state = hand_state(means, np.full((2, D), -3.0), [0, 1])
    h, b = 5, 200
    cfg = ro.RolloutConfig(horizon=h, chunk_size=64)
    batch, rows, metrics = ro.make_rollout_fn(zero_policy, never_terminate, cfg)(
        jax.random.PRNGKey(0), None, state, jnp.zeros((b, OBS))
    )
    valid = np.asarray(rows).reshape(h, b)
    assert 0 < valid.sum() < h * b
    assert np.all(np.cumprod(valid, axis=0) == valid)  # once stopped, stopped
    assert np.isfinite(np.asarray(batch.next_observations)[np.asarray(rows)]).all()
    assert np.isfinite(np.asarray(batch.rewards)[np.asarray(rows)]).all()
    assert int(metrics["num_nonfinite"]) == b - valid[-1].sum()


def test_real_networks_and_policy_shapes_and_counts():
    """Random 2-layer ensemble + tanh-Gaussian policy: exact row count, actions in [-1, 1], and the whole
    run is deterministic given the key."""
    cfg = dyn.DynamicsConfig(num_members=3, num_elites=2, hidden_dims=(16, 16), weight_decay=(0.0,) * 3)
    state = dyn.init_dynamics(jax.random.PRNGKey(0), OBS, ACT, cfg, jax.random.normal(jax.random.PRNGKey(1),
                                                                                     (64, OBS + ACT)))
    policy = init_tanh_gaussian_policy(jax.random.PRNGKey(2), OBS, ACT, hidden=(16,))
    start = jax.random.normal(jax.random.PRNGKey(3), (50, OBS))
    cfg = ro.RolloutConfig(horizon=3, chunk_size=16)
    fn = ro.make_rollout_fn(tanh_gaussian_policy_fn, never_terminate, cfg)
    batch, _, metrics = fn(jax.random.PRNGKey(4), policy, state, start)
    again, _, _ = fn(jax.random.PRNGKey(4), policy, state, start)
    assert len(batch) == 150 and int(metrics["num_valid"]) == 150
    np.testing.assert_array_equal(np.asarray(batch.observations[:50]), np.asarray(start))
    assert np.all(np.abs(np.asarray(batch.actions)) <= 1.0)
    np.testing.assert_array_equal(np.asarray(batch.rewards), np.asarray(again.rewards))
    assert batch.rewards.dtype == jnp.float32 and batch.terminals.dtype == jnp.float32


@pytest.mark.parametrize("members", ["all", "elites"])
def test_chunk_equals_the_plain_model_step_with_the_same_draws(members):
    """The scan over a chunk (pre-drawn members and noise, members picked by a sum of selects) gives the
    rows of the plain form: `model_step` with a gather, step by step, with the same draws."""
    cfg = dyn.DynamicsConfig(num_members=4, num_elites=3, hidden_dims=(16, 16), weight_decay=(0.0,) * 3)
    state = dyn.init_dynamics(jax.random.PRNGKey(0), OBS, ACT, cfg, jax.random.normal(jax.random.PRNGKey(1),
                                                                                     (64, OBS + ACT)))
    state = state.replace(elites=jnp.asarray([3, 0, 1], jnp.int32))
    policy = init_tanh_gaussian_policy(jax.random.PRNGKey(2), OBS, ACT, hidden=(16,))
    h, b, lam = 4, 24, 0.7
    start = jax.random.normal(jax.random.PRNGKey(3), (b, OBS))
    rcfg = ro.RolloutConfig(horizon=h, penalty_coef=lam, rollout_members=members, chunk_size=b)  # one chunk
    key = jax.random.PRNGKey(4)
    batch, valid, _ = ro.make_rollout_fn(tanh_gaussian_policy_fn, never_terminate, rcfg)(key, policy, state, start)

    evaluated, draw_pos = ro.member_sets(state, rcfg)
    params = dyn.take_members(state.params, evaluated)
    (chunk_key,) = jax.random.split(key, 1)  # `rollout` splits its key over the chunks
    policy_keys, drawn, noise = ro.draw_chunk(chunk_key, draw_pos, h, b, OBS + 1, jnp.float32)
    obs = start
    for t in range(h):
        act = tanh_gaussian_policy_fn(policy, policy_keys[t], obs)
        next_obs, reward, u = ro.model_step(obs, act, state, params, drawn[t], noise[t], penalty=rcfg.penalty)
        rows = slice(t * b, (t + 1) * b)
        np.testing.assert_allclose(np.asarray(batch.actions[rows]), np.asarray(act), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(batch.next_observations[rows]), np.asarray(next_obs), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(batch.rewards[rows]), np.asarray(ro.penalised_reward(reward, u, lam)),
                                   rtol=1e-4, atol=1e-5)
        obs = next_obs
    assert bool(np.asarray(valid).all())
    # Every drawn member was one the rollout may draw from.
    assert set(np.unique(np.asarray(evaluated)[np.asarray(drawn)])) <= set(
        np.asarray(state.elites if members == "elites" else evaluated).tolist())


@pytest.mark.parametrize("members", ["all", "elites"])
def test_dataset_uncertainty_is_the_rollouts_u_on_the_datas_pairs(members):
    """`dataset_uncertainty` is the mean of the u(s, a) `model_step` gives a rollout, on the data's own
    (s, a) pairs (every k-th row of the data), with a random ensemble whose u varies with the input."""
    cfg = dyn.DynamicsConfig(num_members=4, num_elites=3, hidden_dims=(16, 16), weight_decay=(0.0,) * 3)
    state = dyn.init_dynamics(jax.random.PRNGKey(0), OBS, ACT, cfg, jax.random.normal(jax.random.PRNGKey(1),
                                                                                     (64, OBS + ACT)))
    state = state.replace(elites=jnp.asarray([3, 0, 1], jnp.int32))
    obs = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (100, OBS))
    act = jnp.tanh(jax.random.normal(jax.random.PRNGKey(3), (100, ACT)))
    rcfg = ro.RolloutConfig(rollout_members=members)
    evaluated, _ = ro.member_sets(state, rcfg)
    params = dyn.take_members(state.params, evaluated)
    drawn, eps = jnp.zeros(25, jnp.int32), jnp.zeros((OBS + 1, 25))
    _, _, u = ro.model_step(obs[::4], act[::4], state, params, drawn, eps, penalty=rcfg.penalty)
    assert float(jnp.std(u)) > 0.002 * float(jnp.mean(u))  # a u that depends on (s, a)
    np.testing.assert_allclose(float(ro.dataset_uncertainty(state, obs, act, rcfg, max_rows=25)),
                               float(jnp.mean(u)), rtol=1e-5)
    _, _, u_all = ro.model_step(obs, act, state, params, jnp.zeros(100, jnp.int32), jnp.zeros((OBS + 1, 100)),
                                penalty=rcfg.penalty)
    np.testing.assert_allclose(float(ro.dataset_uncertainty(state, obs, act, rcfg)), float(jnp.mean(u_all)),
                               rtol=1e-5)


def test_dataset_uncertainty_grows_with_the_members_variance():
    obs, act = jnp.asarray(np.random.default_rng(0).normal(size=(50, OBS)), jnp.float32), jnp.zeros((50, ACT))
    cfg = ro.RolloutConfig(rollout_members="all")
    wide = ro.dataset_uncertainty(hand_state(MEANS, RAW, ELITES), obs, act, cfg)
    narrow = ro.dataset_uncertainty(hand_state(MEANS, RAW - 3.0, ELITES), obs, act, cfg)
    assert float(wide) > float(narrow) * 1.4


def test_capped_penalty_coef_binds_only_above_the_share():
    """lambda_eff = min(lambda, rho * mean|r| / mean u): the task's lambda while lambda * u takes at most
    rho of the mean reward on the data, else exactly rho of it; rho = 0 keeps lambda; per seed."""
    lam = np.asarray(ro.capped_penalty_coef(1.0, 0.5, 2.0, jnp.asarray([0.5, 1.0, 4.0, 40.0])))
    np.testing.assert_allclose(lam, [1.0, 1.0, 0.25, 0.025], rtol=1e-6)
    np.testing.assert_allclose(lam[2:] * np.array([4.0, 40.0]) / 2.0, 0.5, rtol=1e-6)  # share == rho
    np.testing.assert_allclose(np.asarray(ro.capped_penalty_coef(1.0, 0.0, 2.0, jnp.asarray([40.0]))), [1.0])


def test_penalty_share_sets_lambda_from_the_data_up_or_down():
    """share = rho_s: lambda = rho_s * mean|r| / mean u per seed, whatever the given lambda, raised for a
    certain ensemble and lowered for an uncertain one; the cap still bounds it."""
    u = jnp.asarray([0.1, 1.0, 10.0])
    lam = np.asarray(ro.capped_penalty_coef(1.0, 0.0, 2.0, u, share=0.5))
    np.testing.assert_allclose(lam, [10.0, 1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(lam * np.asarray(u) / 2.0, 0.5, rtol=1e-6)  # exactly the share, each seed
    np.testing.assert_allclose(np.asarray(ro.capped_penalty_coef(1e6, 0.0, 2.0, u, share=0.5)), lam, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ro.capped_penalty_coef(1.0, 0.25, 2.0, u, share=0.5)), lam / 2,
                               rtol=1e-6)  # a cap below the share binds


def test_rollout_uses_the_given_lambda_over_the_configs():
    """A traced lambda replaces config.penalty_coef: same draws, rewards differ by (5 - 0.5) * u."""
    state = hand_state(MEANS, RAW, ELITES)
    cfg = ro.RolloutConfig(horizon=2, penalty_coef=5.0, chunk_size=64)
    key, start = jax.random.PRNGKey(3), jnp.zeros((16, OBS))
    plain = ro.rollout(key, None, state, start, policy_fn=zero_policy, termination_fn=never_terminate, config=cfg)
    given = jax.jit(lambda lam: ro.rollout(key, None, state, start, policy_fn=zero_policy,
                                           termination_fn=never_terminate, config=cfg, penalty_coef=lam))(0.5)
    u = float(plain[2]["mean_uncertainty"])
    gap = np.asarray(given[0].rewards) - np.asarray(plain[0].rewards)
    np.testing.assert_allclose(gap.mean() / 4.5, u, rtol=1e-5)
    np.testing.assert_allclose(float(given[2]["mean_penalty"]), 0.5 * u, rtol=1e-5)
    np.testing.assert_allclose(float(plain[2]["mean_penalty"]), 5.0 * u, rtol=1e-5)

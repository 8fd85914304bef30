"""Dynamics ensemble: learns a known stochastic linear system, stays diverse, early-stops per member."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import dynamics as dyn
from mb2po_jax.rollout import uncertainty

OBS, ACT = 3, 2
NOISE_STD = np.array([0.05, 0.1, 0.2, 0.1])  # [delta_obs..., reward]
SMALL = dict(hidden_dims=(64, 64), weight_decay=(2.5e-5, 5e-5, 1e-4), batch_size=64)


class LinearSystem:
    """s' = s + A s + B a + eps_s, r = c.s + d.a + eps_r, eps ~ N(0, NOISE_STD^2)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(0, 0.3, (OBS, OBS))
        self.B = rng.normal(0, 0.3, (ACT, OBS))
        self.c = rng.normal(0, 1, OBS)
        self.d = rng.normal(0, 1, ACT)
        self.rng = rng

    def inputs(self, n, scale=1.0):
        s = self.rng.uniform(-1, 1, (n, OBS)) * scale
        a = self.rng.uniform(-1, 1, (n, ACT)) * scale
        return s.astype(np.float32), a.astype(np.float32)

    def mean(self, s, a):
        """[n, OBS + 1]: true E[s'], E[r]."""
        return np.concatenate([s + s @ self.A + a @ self.B, (s @ self.c + a @ self.d)[:, None]], axis=1)

    def data(self, n):
        s, a = self.inputs(n)
        y = self.mean(s, a) + self.rng.normal(0, 1, (n, OBS + 1)) * NOISE_STD
        return {
            "observations": s,
            "actions": a,
            "rewards": y[:, OBS].astype(np.float32),
            "next_observations": y[:, :OBS].astype(np.float32),
        }


@pytest.fixture(scope="module")
def trained():
    system = LinearSystem()
    cfg = dyn.DynamicsConfig(num_members=4, num_elites=2, learning_rate=3e-3, **SMALL)
    state, history = dyn.fit_dynamics(jax.random.PRNGKey(0), system.data(4000), cfg, max_epochs=20)
    return system, state, history


def test_recovers_mean_map_and_noise_std(trained):
    system, state, history = trained
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    s, a = system.inputs(2000)
    mean, std = dyn.predict(state, jnp.asarray(s), jnp.asarray(a))  # [E, n, 4]
    assert mean.shape == std.shape == (4, 2000, OBS + 1)
    true = system.mean(s, a)
    rmse = np.sqrt(np.mean((np.asarray(mean) - true) ** 2, axis=1))  # [E, 4]
    # R^2 > 0.99 per dimension, and below the noise the map is learned through.
    assert np.all(rmse < 0.1 * true.std(axis=0)) and np.all(rmse < 0.04), rmse
    predicted_std = np.asarray(std).mean(axis=1)  # [E, 4]
    np.testing.assert_allclose(predicted_std, np.broadcast_to(NOISE_STD, predicted_std.shape), rtol=0.3)


def test_disagreement_grows_far_from_the_data(trained):
    system, state, _ = trained
    rows = []
    for scale in (1.0, 5.0):
        s, a = system.inputs(1000, scale)
        mean, std = dyn.predict(state, jnp.asarray(s), jnp.asarray(a))
        spread = np.asarray(mean)[..., :OBS].std(axis=0).mean()  # std of the members' means
        # The rollout engine's ensemble-disagreement penalty on the same predictions.
        penalty = float(jnp.mean(uncertainty(mean, jnp.square(std), OBS, "ensemble_disagreement")))
        rows.append((spread, penalty))
    # Not asserted: the "max_std" penalty (largest predicted aleatoric std). On this homoscedastic system
    # the learned std SHRINKS away from the data (~0.28 inside, ~0.06 at 5x the range): nothing in the
    # NLL makes a variance head grow out of distribution.
    (spread_in, pen_in), (spread_out, pen_out) = rows
    assert spread_out > 3 * spread_in and pen_out > 3 * pen_in, rows


def test_elites_are_the_lowest_holdout_errors(trained):
    _, state, history = trained
    best = np.asarray(state.best_holdout_mse)
    np.testing.assert_array_equal(np.asarray(state.elites), np.argsort(best)[:2])
    assert history[-1]["elites"] == np.asarray(state.elites).tolist()
    # And directly: re-ranking after an evaluation picks the smallest.
    state = state.replace(best_holdout_mse=jnp.full((4,), jnp.inf))
    state, _ = dyn.update_snapshots(state, jnp.array([0.5, 0.1, 0.3, 0.2]))
    np.testing.assert_array_equal(np.asarray(state.elites), [1, 3])


def _tiny_state(num_members=3, seed=0):
    cfg = dyn.DynamicsConfig(num_members=num_members, num_elites=1, **SMALL)
    inputs = jax.random.normal(jax.random.PRNGKey(seed), (100, OBS + ACT))
    return dyn.init_dynamics(jax.random.PRNGKey(seed), OBS, ACT, cfg, inputs)


def test_snapshot_kept_when_holdout_loss_rises_and_restored():
    update_snapshots = jax.jit(dyn.update_snapshots)
    state = _tiny_state()
    state, improved = update_snapshots(state, jnp.array([1.0, 1.0, 1.0]))
    assert np.all(np.asarray(improved))
    snapshot = state.params
    # Training moves every member; member 1 gets worse on holdout, members 0 and 2 better.
    moved = jax.jit(lambda t: jax.tree_util.tree_map(lambda p: p + 1.0, t))(state.params)
    state = state.replace(params=moved)
    state, improved = update_snapshots(state, jnp.array([0.5, 2.0, 0.995]))  # 0.995: < 1% better
    np.testing.assert_array_equal(np.asarray(improved), [True, False, False])
    assert int(state.epochs_since_improvement) == 0
    restored = dyn.restore_best(state).params
    for got, new, old in zip(*(jax.tree_util.tree_leaves(t) for t in (restored, moved, snapshot))):
        np.testing.assert_array_equal(got[0], new[0])  # improved: the new params
        np.testing.assert_array_equal(got[1], old[1])  # got worse: its best snapshot
        np.testing.assert_array_equal(got[2], old[2])  # not enough better: the snapshot
    np.testing.assert_allclose(np.asarray(state.best_holdout_mse), [0.5, 1.0, 1.0])
    state, _ = update_snapshots(state, jnp.array([0.6, 2.0, 2.0]))
    assert int(state.epochs_since_improvement) == 1


def test_fit_stops_when_no_member_improves_and_returns_best():
    system = LinearSystem(1)
    # Only a 99 % drop of the holdout MSE counts as an improvement: the first epoch always improves (inf ->
    # value), the next two train on but improve no member, so the fit stops after them with its params
    # moved past the snapshot of epoch 1 and must hand back that snapshot.
    cfg = dyn.DynamicsConfig(num_members=2, num_elites=1, improvement_threshold=0.99,
                             max_epochs_since_improvement=2, **SMALL)
    state, history = dyn.fit_dynamics(jax.random.PRNGKey(0), system.data(600), cfg, max_epochs=50)
    assert len(history) == 3
    assert [h["epochs_since_improvement"] for h in history] == [0, 1, 2]
    assert history[2]["holdout_mse"] != history[0]["holdout_mse"]  # the params moved after the snapshot
    assert history[2]["best_holdout_mse"] == history[0]["holdout_mse"]
    for p, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state.best_params)):
        np.testing.assert_array_equal(p, b)


def test_max_steps_budget_is_exact():
    system = LinearSystem(2)
    cfg = dyn.DynamicsConfig(num_members=2, num_elites=1, **SMALL)
    # 600 rows - 60 holdout = 540 train -> 8 updates per epoch; 19 = 8 + 8 + 3.
    state, history = dyn.fit_dynamics(
        jax.random.PRNGKey(0), system.data(600), cfg, max_steps=19, early_stopping=False
    )
    assert int(state.step) == 19 and [h["step"] for h in history] == [8, 16, 19]


def test_members_train_on_different_bootstrap_data():
    system = LinearSystem(3)
    cfg = dyn.DynamicsConfig(num_members=2, num_elites=1, **SMALL)  # as above: compiled once
    inputs, targets = dyn.transitions_to_arrays(system.data(600))
    train, holdout = dyn.split_holdout(jax.random.PRNGKey(0), inputs, targets, cfg)
    state = dyn.init_dynamics(jax.random.PRNGKey(1), OBS, ACT, cfg, train["inputs"])
    data = dyn.make_epoch_data(jax.random.PRNGKey(2), state, train, holdout)
    boot = np.asarray(data["bootstrap"])
    assert boot.shape == (2, train["inputs"].shape[0])
    assert sorted(boot[0]) != sorted(boot[1])  # different resamples
    assert all(len(np.unique(r)) < len(r) for r in boot)  # with replacement
    # Behaviour: identical members stay identical only if they see identical minibatches.
    same = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p[:1], p.shape), state.params)
    state = state.replace(params=same, opt_state=dyn.make_optimizer(cfg).init(same))
    state, _ = dyn.make_train_epoch(cfg)(state, data, jax.random.PRNGKey(3), jnp.int32(100))
    w = np.asarray(state.params["layers"][0]["w"])
    assert not np.allclose(w[0], w[1])


def test_next_valid_rows_are_not_targets():
    system = LinearSystem(4)
    data = system.data(10)
    data["next_valid"] = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], np.float32)
    inputs, targets = dyn.transitions_to_arrays(data)
    assert inputs.shape == (8, OBS + ACT) and targets.shape == (8, OBS + 1)
    np.testing.assert_allclose(targets[2, :OBS], data["next_observations"][3] - data["observations"][3])


def test_soft_clamped_variance_matches_mbpo_formula_and_bounds():
    raw = jnp.linspace(-40.0, 40.0, 101)
    mx, mn = 0.5, -10.0
    lv = mx - jax.nn.softplus(mx - raw)
    lv = mn + jax.nn.softplus(lv - mn)
    np.testing.assert_allclose(np.log(np.asarray(dyn.bounded_var(raw, mx, mn))), np.asarray(lv), atol=1e-5)
    state = _tiny_state()
    loss, aux = dyn.ensemble_loss(
        state.params, jnp.zeros((3, 4, OBS + ACT)), jnp.zeros((3, 4, OBS + 1)), state.config
    )
    # Bound term: 0.01 * (sum max_logvar - sum min_logvar) over 3 members x 4 dims.
    np.testing.assert_allclose(float(aux["logvar_bound_loss"]), 0.01 * 3 * 4 * (0.5 + 10.0), rtol=1e-6)


def test_ensemble_forms_compute_the_same_members():
    state = _tiny_state(num_members=3)
    x = jax.random.normal(jax.random.PRNGKey(5), (7, OBS + ACT))
    fn = jax.jit(dyn.ensemble_mean_var)
    ref_mean, ref_var = fn(state.params, x)
    assert ref_mean.shape == ref_var.shape == (3, 7, OBS + 1)
    # The shared-input first layer (one [E*H, in] matmul) equals per-member inputs (the training path).
    per_member = fn(state.params, jnp.broadcast_to(x, (3,) + x.shape))
    np.testing.assert_allclose(np.asarray(per_member[0]), np.asarray(ref_mean), rtol=1e-5, atol=1e-6)
    # The rollout's feature-major [E, d, B] output is the same numbers.
    fm_mean, fm_var = jax.jit(functools.partial(dyn.ensemble_mean_var, feature_major=True))(state.params, x)
    np.testing.assert_array_equal(np.asarray(fm_mean), np.swapaxes(np.asarray(ref_mean), 1, 2))
    np.testing.assert_array_equal(np.asarray(fm_var), np.swapaxes(np.asarray(ref_var), 1, 2))
    # Member e of the batched form is member e's own network.
    one = dyn.take_members(state.params, jnp.array([1]))
    np.testing.assert_allclose(np.asarray(fn(one, x)[0][0]), np.asarray(ref_mean[1]), rtol=1e-5, atol=1e-6)


def test_state_round_trips_through_a_checkpoint(trained, tmp_path):
    from mb2po_jax.checkpoint import load_pytree, save_pytree

    _, state, _ = trained
    save_pytree(tmp_path / "dyn", state)
    template = dyn.init_dynamics(jax.random.PRNGKey(9), OBS, ACT, state.config, jnp.ones((8, OBS + ACT)))
    restored, _ = load_pytree(tmp_path / "dyn", template)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.zeros((2, OBS)), jnp.zeros((2, ACT))
    np.testing.assert_array_equal(np.asarray(dyn.predict(state, *x)[0]), np.asarray(dyn.predict(restored, *x)[0]))

"""Model-buffer ring: keeps exactly the last n iterations, samples only valid filled rows, exact omega."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import buffer as mb
from mb2po_jax.errors import ConfigError
from mb2po_jax.data.transitions import Transitions

OBS, ACT, ROWS = 2, 1, 10


def marked_batch(iteration, valid):
    """Rows whose observation says (iteration, row index); invalid rows carry a poison value."""
    rows = np.arange(ROWS)
    obs = np.stack([np.full(ROWS, iteration), rows], axis=1).astype(np.float32)
    obs[~valid] = -999.0
    return Transitions(
        observations=jnp.asarray(obs),
        actions=jnp.full((ROWS, ACT), iteration, jnp.float32),
        rewards=jnp.asarray(rows + 100.0 * iteration, jnp.float32),
        next_observations=jnp.asarray(obs + 0.5),
        terminals=jnp.asarray(rows % 3 == 0, jnp.float32),
    ), jnp.asarray(valid)


def fill(num_slots, num_iterations, seed=0):
    rng = np.random.default_rng(seed)
    cfg = mb.BufferConfig(obs_dim=OBS, act_dim=ACT, num_slots=num_slots, rows_per_slot=ROWS)
    buf = mb.init_buffer(cfg)
    add = jax.jit(mb.add_rollout, donate_argnums=0)
    masks = {}
    for it in range(num_iterations):
        valid = rng.random(ROWS) < 0.6
        valid[it % ROWS] = True  # never empty
        masks[it] = valid
        buf = add(buf, *marked_batch(it, valid))
    return buf, masks


def test_ring_keeps_exactly_the_last_n_iterations():
    n, m = 3, 4
    buf, masks = fill(n, n + m)
    assert int(buf.num_written) == n + m and int(buf.write_index) == (n + m) % n
    counts = np.asarray(buf.counts)
    stored = {int(x) for slot in range(n) for x in np.asarray(buf.observations[slot, : counts[slot], 0])}
    assert stored == {4, 5, 6}
    assert int(mb.num_valid(buf)) == sum(masks[it].sum() for it in (4, 5, 6))
    # Each slot holds its iteration's valid rows compacted to the front, zeros after.
    for slot in range(n):
        it = int(buf.observations[slot, 0, 0])
        count = int(buf.counts[slot])
        rows = np.asarray(buf.observations[slot, :count, 1])
        np.testing.assert_array_equal(rows, np.flatnonzero(masks[it]))
        assert not np.asarray(buf.observations[slot, count:]).any()


def test_sampling_is_uniform_over_valid_filled_rows_only():
    buf, masks = fill(4, 2)  # two of four slots filled
    s = jax.jit(mb.sample, static_argnums=2)(buf, jax.random.PRNGKey(0), 20000)
    it = np.asarray(s.observations[:, 0]).astype(int)
    row = np.asarray(s.observations[:, 1]).astype(int)
    assert set(it) <= {0, 1} and (s.observations >= 0).all()  # no unfilled slot, no poison row
    assert all(masks[i][r] for i, r in zip(it, row))  # only rows that were valid
    # The fields of a sampled row stay together.
    np.testing.assert_allclose(np.asarray(s.rewards), row + 100.0 * it)
    np.testing.assert_allclose(np.asarray(s.next_observations), np.asarray(s.observations) + 0.5)
    np.testing.assert_array_equal(np.asarray(s.terminals), (row % 3 == 0).astype(np.float32))
    # Uniform over the individual valid rows (not over slots): chi-square over every valid row.
    keys = it * ROWS + row
    valid_keys = [i * ROWS + r for i in (0, 1) for r in np.flatnonzero(masks[i])]
    counts = np.array([np.sum(keys == k) for k in valid_keys])
    expected = len(keys) / len(valid_keys)
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < len(valid_keys) + 5 * np.sqrt(2 * len(valid_keys)), chi2


def test_mixed_batch_takes_exactly_omega_from_the_dataset():
    buf, _ = fill(2, 2)
    dataset = Transitions(
        observations=-np.ones((50, OBS), np.float32) * 7,
        actions=np.zeros((50, ACT), np.float32),
        rewards=np.zeros(50, np.float32),
        next_observations=np.zeros((50, OBS), np.float32),
        terminals=np.zeros(50, np.float32),
    )
    dataset = jax.tree_util.tree_map(jnp.asarray, dataset)
    for batch_size, omega in [(256, 0.05), (7, 0.3), (10, 0.0)]:
        mixed = jax.jit(mb.mixed_batch, static_argnums=(3, 4))(
            jax.random.PRNGKey(1), dataset, buf, batch_size, omega
        )
        from_data = int(np.sum(np.asarray(mixed.observations[:, 0]) == -7))
        assert from_data == round(omega * batch_size)
        assert mixed.observations.shape == (batch_size, OBS) and mixed.rewards.shape == (batch_size,)
    assert [mb.num_real(256, w) for w in (0.05, 0.0, 1.0, 0.5)] == [13, 0, 256, 128]
    with pytest.raises(ConfigError):
        mb.num_real(256, 1.5)


def test_footprint():
    from mb2po_jax import mb2po, parallel

    cfg = mb2po.MB2POConfig(imagined_steps=1_000_000, num_slots=100)
    assert parallel.ring_bytes(cfg, 11, 3) == 100 * 1_000_000 * ((2 * 11 + 3 + 1) * 4 + 1) + 4 * 100 + 8
    assert parallel.ring_bytes(cfg, 11, 3, num_seeds=3) == 3 * parallel.ring_bytes(cfg, 11, 3)
    half = mb2po.MB2POConfig(imagined_steps=1_000_000, num_slots=100, buffer_dtype="bfloat16")
    assert parallel.ring_bytes(half, 11, 3) < 0.6 * parallel.ring_bytes(cfg, 11, 3)


def test_imagined_rollouts_fill_the_ring_with_their_valid_rows():
    from mb2po_jax import dynamics as dyn
    from mb2po_jax import rollout as ro

    obs_dim, act_dim, horizon, starts = 3, 2, 3, 40
    cfg = dyn.DynamicsConfig(num_members=3, num_elites=2, hidden_dims=(8,), weight_decay=(0.0, 0.0))
    dataset_obs = jax.random.normal(jax.random.PRNGKey(0), (100, obs_dim))
    state = dyn.init_dynamics(jax.random.PRNGKey(1), obs_dim, act_dim, cfg, jnp.ones((10, obs_dim + act_dim)))
    policy_fn = lambda params, key, obs: jnp.tanh(obs[:, :act_dim])
    stop_low = lambda obs, act, next_obs: next_obs[:, 0] < -1.0  # some trajectories stop, some do not

    @jax.jit
    def collect(key, buf):
        batch, valid, metrics = ro.imagine(key, None, state, dataset_obs, starts, policy_fn=policy_fn,
                                           termination_fn=stop_low, config=ro.RolloutConfig(horizon=horizon))
        return mb.add_rollout(buf, batch, valid), metrics

    buf = mb.init_buffer(mb.BufferConfig(obs_dim, act_dim, num_slots=2, rows_per_slot=horizon * starts))
    totals = []
    for i in range(3):
        buf, metrics = collect(jax.random.PRNGKey(10 + i), buf)
        totals.append(int(metrics["num_valid"]))
    assert int(buf.num_written) == 3 and np.asarray(buf.counts).tolist() == [totals[2], totals[1]]
    assert 0 < totals[0] < horizon * starts

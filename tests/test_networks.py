"""The AWAC policy distribution (networks.tanh_gmm and friends): a proper density over (-1, 1) with the
tanh change of variables, samples inside the open box, boundary dataset actions usable (SPEC section 1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import networks


def _random_mixture(rng: np.random.Generator, batch: tuple, k: int, a: int, mean_scale: float = 2.0):
    """logits [*batch, K], means / log_stds [*batch, K, A]; component 0 is always sharply peaked."""
    logits = rng.normal(0.0, 2.0, (*batch, k))
    means = rng.uniform(-mean_scale, mean_scale, (*batch, k, a))
    log_stds = rng.uniform(-5.0, 0.3, (*batch, k, a))
    log_stds[..., 0, :] = -5.0  # GMMParams' smallest std (e^-5): a spike of width ~0.007
    return tuple(jnp.asarray(x, jnp.float32) for x in (logits, means, log_stds))


def _reference_log_prob(logits, means, log_stds, actions):
    """log sum_k w_k prod_d N(atanh a_d; mu_kd, s_kd) - sum_d log(1 - a_d^2), in float64 numpy."""
    logits, means, log_stds, actions = (np.asarray(x, np.float64) for x in (logits, means, log_stds, actions))
    x = np.arctanh(actions)[..., None, :]  # [..., 1, A]
    stds = np.exp(log_stds)
    comp = (-0.5 * ((x - means) / stds) ** 2 - log_stds - 0.5 * np.log(2 * np.pi)).sum(-1)  # [..., K]
    log_w = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return np.logaddexp.reduce(log_w + comp, axis=-1) - np.log1p(-actions**2).sum(-1)


def test_tanh_gmm_density_integrates_to_one_over_the_open_interval():
    # 1-D actions, several random 5-component mixtures, each with one sharp spike. The grid is uniform in
    # pre-tanh space (so spikes and the piled-up mass near +-1 are resolved), but the integral is taken in
    # action space, over the numerical spacing of a = tanh(x): the Jacobian is the code's, not the test's.
    rng = np.random.default_rng(0)
    num_mixtures = 8
    logits, means, log_stds = _random_mixture(rng, (num_mixtures,), k=5, a=1)
    x = np.linspace(-6.0, 6.0, 24001)  # tanh(6) = 1 - 1.2e-5, still inside the ACTION_EPS clip
    a = np.tanh(x)
    log_p = jax.jit(jax.vmap(
        lambda lg, mu, ls: networks.tanh_gmm(lg, mu, ls).log_prob(jnp.asarray(a, jnp.float32)[:, None])
    ))(logits, means, log_stds)  # [M, G]; the mixture parameters broadcast over the grid
    p = np.exp(np.asarray(log_p, np.float64))
    assert np.isfinite(p).all()
    integrals = np.trapezoid(p, a, axis=1)
    # Mass outside |x| < 6 is < 0.2% for |mu| <= 2, std <= e^0.3 (these draws: all within 4e-6 of 1).
    np.testing.assert_allclose(integrals, 1.0, atol=1e-4)


def test_tanh_gmm_log_prob_matches_change_of_variables_formula():
    rng = np.random.default_rng(1)
    batch, k, a = (64,), 5, 3
    logits, means, log_stds = _random_mixture(rng, batch, k, a, mean_scale=1.5)
    actions = rng.uniform(-0.995, 0.995, (*batch, a))
    # Actions drawn close to the components make the mixture's own terms (not just the Jacobian) matter.
    comp = rng.integers(0, k, batch)
    near = np.tanh(np.asarray(means)[np.arange(batch[0]), comp] + 0.05 * rng.normal(size=(*batch, a)))
    actions[::2] = np.clip(near[::2], -0.995, 0.995)
    actions = jnp.asarray(actions, jnp.float32)

    expected = _reference_log_prob(logits, means, log_stds, actions)
    got, got_clipped = jax.jit(
        lambda *p: (networks.tanh_gmm(*p).log_prob(actions), networks.tanh_gmm_log_prob(*p, actions))
    )(logits, means, log_stds)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-3)
    # The clipping helper is the identity on interior actions.
    np.testing.assert_allclose(np.asarray(got_clipped), expected, rtol=1e-4, atol=2e-3)


@jax.jit
def _sample_and_log_prob(key, logits, means, log_stds):
    dist = networks.tanh_gmm(logits, means, log_stds)
    samples = dist.sample(seed=key, sample_shape=(20000,))
    return samples, dist.log_prob(samples)


@pytest.mark.parametrize("mean", [0.0, 8.0, 30.0])
def test_tanh_gmm_samples_stay_strictly_inside(mean):
    # float32 tanh(x) is exactly 1.0 for x > ~9; with GMMParams' largest std (e^2) that is common. A sample
    # on the boundary has log-prob atanh(1) = inf and is an action no (clipped) dataset action ever is.
    k, a = 5, 2
    logits = jnp.zeros((k,))
    means = jnp.full((k, a), mean).at[1].set(-mean)
    log_stds = jnp.full((k, a), 2.0)
    samples, log_prob = _sample_and_log_prob(jax.random.PRNGKey(0), logits, means, log_stds)
    assert samples.shape == (20000, a)
    assert bool(jnp.all(jnp.abs(samples) < 1.0))
    assert bool(jnp.all(jnp.isfinite(log_prob)))


def test_boundary_actions_have_finite_log_prob_and_gradients():
    rng = np.random.default_rng(2)
    logits, means, log_stds = _random_mixture(rng, (4,), k=5, a=3)
    actions = jnp.array([[1.0, -1.0, 0.3], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 1.0, -0.5]])

    def total_log_prob(logits, means, log_stds):
        return networks.tanh_gmm_log_prob(logits, means, log_stds, actions).sum()

    log_prob = jax.jit(networks.tanh_gmm_log_prob)(logits, means, log_stds, actions)
    assert bool(jnp.all(jnp.isfinite(log_prob)))
    grads = jax.jit(jax.grad(total_log_prob, argnums=(0, 1, 2)))(logits, means, log_stds)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(grads[1]).sum()) > 0.0  # still a learning signal towards the boundary
    # Boundary actions are treated as the nearest action ACTION_EPS inside.
    inside = jnp.clip(actions, -1 + networks.ACTION_EPS, 1 - networks.ACTION_EPS)
    np.testing.assert_allclose(
        np.asarray(log_prob), _reference_log_prob(logits, means, log_stds, inside), rtol=1e-4, atol=1e-2
    )


def test_tanh_gmm_mode_is_tanh_of_the_most_probable_components_mean():
    rng = np.random.default_rng(3)
    batch, k, a = (6, 4), 5, 2
    logits, means, log_stds = _random_mixture(rng, batch, k, a)
    best = np.asarray(jnp.argmax(logits, -1))
    expected = np.tanh(np.take_along_axis(np.asarray(means), best[..., None, None], axis=-2)[..., 0, :])
    mode = jax.jit(networks.tanh_gmm_mode)(logits, means, log_stds)
    assert mode.shape == (*batch, a)
    np.testing.assert_allclose(np.asarray(mode), expected, rtol=1e-6, atol=1e-6)

    # The heaviest component wins even when another is far sharper (higher peak density) or wider.
    logits = jnp.log(jnp.array([0.1, 0.6, 0.3]))
    means = jnp.array([[-1.0], [0.5], [2.0]])
    log_stds = jnp.array([[-5.0], [1.0], [0.0]])
    mode = networks.tanh_gmm_mode(logits, means, log_stds)
    np.testing.assert_allclose(np.asarray(mode), np.tanh([0.5]), rtol=1e-6)

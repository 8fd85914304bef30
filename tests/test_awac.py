"""AWAC core (mb2po_jax.awac): it learns a real task from a scripted controller's data, it beats behaviour
cloning when two thirds of the data is harmful, seeds and scan chunks compose exactly (the basis of multi-seed
training and of resume), the critic fits its targets, and the advantage weights are exp(A / alpha) clamped.

Compilation dominates the cost on a CPU (XLA compiles the threefry-heavy init and the fused update for
several seconds each), so tests share configs, datasets of one shape and the compiled `make_train_steps`
functions, and never pass a state they still need (the training call donates its input).
"""
from __future__ import annotations

import dataclasses
import functools

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from gymnasium.envs.classic_control.pendulum import PendulumEnv
from gymnasium.wrappers import RescaleAction

from mb2po_jax import awac
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.behavior.generation import rollout
from mb2po_jax.evaluation import evaluate


def _copy(state):
    """A fresh copy, for handing to the donating training call while keeping the original."""
    return jax.tree.map(jnp.copy, state)


def _leaves_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------------------------------------
# Small synthetic problems: one tiny config and one data shape, so the compiled programs are shared.

OBS_DIM, ACT_DIM, NUM_ROWS, NUM_SEEDS, CHUNK = 3, 2, 512, 3, 20
TINY = awac.AWACConfig(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=64)


def _transitions(arrays) -> Transitions:
    """Device transitions (float32) from a mapping holding the five fields (others are ignored)."""
    fields = ("observations", "actions", "rewards", "next_observations", "terminals")
    return Transitions(**{k: jnp.asarray(arrays[k], jnp.float32) for k in fields})


def _synthetic(seed: int = 0, terminal_frac: float = 0.5, actions=None) -> Transitions:
    """Random states; actions a noisy function of the state (something for the actor to fit); a learnable
    reward r = 1 + a . tanh(s[:2]) (mean ~1.6, std ~0.4)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(NUM_ROWS, OBS_DIM))
    if actions is None:
        actions = np.clip(0.8 * np.tanh(obs[:, :ACT_DIM]) + 0.1 * rng.normal(size=(NUM_ROWS, ACT_DIM)), -1, 1)
    return _transitions({
        "observations": obs,
        "actions": actions,
        "rewards": 1.0 + (actions * np.tanh(obs[:, :ACT_DIM])).sum(1),
        "next_observations": rng.normal(size=(NUM_ROWS, OBS_DIM)),
        "terminals": rng.uniform(size=NUM_ROWS) < terminal_frac,
    })


@functools.lru_cache(maxsize=None)
def _train(num_steps: int):
    """One compiled training function per chunk length, shared by every test in this module."""
    return awac.make_train_steps(num_steps)


# awac.init for a single seed, compiled once (init_seeds builds a new jit, hence a new compile, per call).
_init_one = jax.jit(awac.init, static_argnums=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_keys():
    return jax.random.split(jax.random.PRNGKey(42), NUM_SEEDS)  # raw uint32 keys [S, 2]


@pytest.fixture(scope="module")
def tiny_states(tiny_keys):
    """Freshly initialised S-seed state; tests train on copies."""
    return awac.init_seeds(tiny_keys, OBS_DIM, ACT_DIM, TINY)


def test_seed_axis_equals_separate_single_seed_runs(tiny_keys, tiny_states):
    """S seeds trained in one program are S independent runs: each seed's initial state equals `init` of its
    key alone, and its parameters, optimiser state, key and metrics after training equal those of that seed
    trained alone. Anything coupling the seeds (a key or a gradient shared across the seed axis, a
    reduction over it) breaks this."""
    data = _synthetic()
    together, metrics = _train(CHUNK)(_copy(tiny_states), data)
    for s in range(NUM_SEEDS):
        single = jax.tree.map(lambda x: x[None], _init_one(tiny_keys[s], OBS_DIM, ACT_DIM, TINY))
        _leaves_close(jax.tree.map(lambda x: x[s], tiny_states), jax.tree.map(lambda x: x[0], single),
                      1e-6, 1e-7)
        alone, alone_metrics = _train(CHUNK)(single, data)
        _leaves_close(jax.tree.map(lambda x: x[s], together), jax.tree.map(lambda x: x[0], alone), 1e-5, 1e-6)
        _leaves_close({k: v[s] for k, v in metrics.items()}, {k: v[0] for k, v in alone_metrics.items()},
                      1e-5, 1e-6)
    # ...and the seeds did not all do the same thing.
    leaf = np.asarray(jax.tree.leaves(together.actor_params)[0])
    assert not np.allclose(leaf[0], leaf[1])


def test_two_chunks_equal_one_call_of_twice_the_steps(tiny_states):
    """Resume relies on this: N steps, then N more from the returned state, equals 2N steps at once."""
    data = _synthetic()
    chunked, m1 = _train(CHUNK)(_copy(tiny_states), data)
    chunked, m2 = _train(CHUNK)(chunked, data)
    straight, m12 = _train(2 * CHUNK)(_copy(tiny_states), data)
    assert int(chunked.step[0]) == int(straight.step[0]) == 2 * CHUNK
    _leaves_close(chunked, straight, 1e-6, 1e-7)
    _leaves_close({k: (m1[k] + m2[k]) / 2 for k in m12}, m12, 1e-5, 1e-6)


def test_critic_fits_targets_and_actor_fits_data(tiny_states):
    """With every transition terminal the critic's target is the reward itself: in 1000 steps the critic
    loss falls tenfold and Q(s, a) settles on the mean reward. Without terminals Q bootstraps above it. The
    actor's log-likelihood of the dataset actions rises."""
    def run(data, chunks=50):
        state, history = _copy(tiny_states), []
        for _ in range(chunks):
            state, m = _train(CHUNK)(state, data)
            history.append(jax.tree.map(np.asarray, m))
        return {k: np.stack([h[k] for h in history]) for k in history[0]}  # [chunks, S]

    terminal = _synthetic(seed=1, terminal_frac=1.0)
    h = run(terminal)
    first, last = h["critic_loss"][0], h["critic_loss"][-1]
    assert np.all(last < 0.1 * first), (first, last)
    mean_reward = float(terminal.rewards.mean())
    np.testing.assert_allclose(h["q_data"][-1], mean_reward, atol=0.15)
    assert np.all(h["log_prob"][-1] > h["log_prob"][0] + 1.0), h["log_prob"][[0, -1]]

    # The same data with no terminal: the target adds gamma * Q', so Q climbs above the reward.
    continuing = terminal.replace(terminals=jnp.zeros_like(terminal.terminals))
    h = run(continuing)
    assert np.all(h["q_data"][-1] > mean_reward + 0.5), h["q_data"][-1]


def test_boundary_dataset_actions_train_to_finite_parameters(tiny_states):
    """Dataset actions exactly at +-1 (common in D4RL: clipped policies) have atanh = inf; they must be
    clipped inside before the log-prob, or the first update turns the actor into NaNs."""
    rng = np.random.default_rng(2)
    data = _synthetic(seed=2, actions=rng.choice([-1.0, 1.0], size=(NUM_ROWS, ACT_DIM)))
    state, m = _train(CHUNK)(_copy(tiny_states), data)
    assert all(np.isfinite(np.asarray(v)).all() for v in m.values()), m
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert np.all(np.asarray(m["log_prob"]) > -100.0)  # the clipped boundary action, not -inf or -1e30


# ----------------------------------------------------------------------------------------------------------
# Advantage weights, on a hand-built critic with a known advantage.

PI_ACTION = 0.5  # the hand-built actor's (nearly deterministic) action, first dimension


def _set(params, values: dict):
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, value in values.items():
        assert path in flat and flat[path].shape == value.shape, (path, {k: v.shape for k, v in flat.items()})
        flat[path] = jnp.asarray(value, flat[path].dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def _known_advantage_state(state: awac.AWACState, c: float) -> awac.AWACState:
    """Twin critics Q_1 = c a_0 and Q_2 = 2c a_0 (so min_j Q_j = c a_0 for a_0 > 0, 2c a_0 below), target
    critics zero; an actor whose every component is N(atanh 0.5, e^-5): a_pi ~ 0.5 +- 0.005."""
    h1, h2 = TINY.critic_hidden_dims
    k1 = np.zeros((2, OBS_DIM + ACT_DIM, h1))
    k1[:, OBS_DIM, 0], k1[:, OBS_DIM, 1] = 1.0, -1.0  # relu(a_0), relu(-a_0)
    k2 = np.zeros((2, h1, h2))
    k2[:, 0, 0] = k2[:, 1, 1] = 1.0
    kf = np.zeros((2, h2, 1))
    kf[:, 0, 0], kf[:, 1, 0] = [c, 2 * c], [-c, -2 * c]  # c_j (relu(a) - relu(-a)) = c_j a
    base = "params/VmapCritic_0/"
    critic = _set(state.critic_params, {
        base + "MLP_0/Dense_0/kernel": k1, base + "MLP_0/Dense_0/bias": np.zeros((2, h1)),
        base + "MLP_0/Dense_1/kernel": k2, base + "MLP_0/Dense_1/bias": np.zeros((2, h2)),
        base + "Dense_0/kernel": kf, base + "Dense_0/bias": np.zeros((2, 1)),
    })
    k, a, h = TINY.num_components, ACT_DIM, TINY.actor_hidden_dims[-1]
    actor = _set(state.actor_params, {  # GMMParams heads: Dense_0 logits, Dense_1 means, Dense_2 log-stds
        "params/Dense_0/kernel": np.zeros((h, k)), "params/Dense_0/bias": np.zeros(k),
        "params/Dense_1/kernel": np.zeros((h, k * a)),
        "params/Dense_1/bias": np.full(k * a, np.arctanh(PI_ACTION)),
        "params/Dense_2/kernel": np.zeros((h, k * a)), "params/Dense_2/bias": np.full(k * a, -5.0),
    })
    return state.replace(critic_params=critic, actor_params=actor,
                         target_critic_params=jax.tree.map(jnp.zeros_like, critic))


_update = jax.jit(awac.update)  # one compile per config: temperature and max_weight are static


def test_advantage_weights_are_clamped_exponentiated_advantages():
    """AWAC's actor weights are min(exp(A / alpha), max_weight) with A = min_j Q_j(s, a) - min_j Q_j(s, a_pi)
    from the online critic, checked on hand-built networks whose advantage is known in closed form."""
    rng = np.random.default_rng(3)
    n = 300
    # First action dimension from three bands, none within 0.1 of where the advantage changes sign.
    a0 = np.concatenate(
        [rng.uniform(-1.0, -0.1, n // 3), rng.uniform(0.1, 0.4, n // 3), rng.uniform(0.6, 1.0, n // 3)]
    )
    actions = np.stack([a0, rng.uniform(-1, 1, n)], 1)
    batch = _transitions({
        "observations": rng.normal(size=(n, OBS_DIM)), "actions": actions, "rewards": np.zeros(n),
        "next_observations": rng.normal(size=(n, OBS_DIM)), "terminals": np.zeros(n),
    })
    base = _init_one(jax.random.PRNGKey(0), OBS_DIM, ACT_DIM, TINY)

    def q_min(a, c):
        return np.minimum(c * a, 2 * c * a)

    def update(c, **config):
        state = _known_advantage_state(base, c).replace(config=dataclasses.replace(TINY, **config))
        new_state, m = _update(state, batch, jax.random.PRNGKey(1))
        return new_state, {k: float(v) for k, v in m.items()}

    # The advantage is Q(s, a) - Q(s, a_pi) with the online critic's min over the twins.
    _, m = update(1.0)
    np.testing.assert_allclose(m["advantage"], (q_min(a0, 1.0) - q_min(PI_ACTION, 1.0)).mean(), atol=0.01)

    # Huge advantages: every action above a_pi is clamped at max_weight, every one below is ~0 (and the
    # unclamped exp(A) would overflow float32 here, so the actor update stays finite only through the clamp).
    above = (a0 > PI_ACTION).mean()
    new_state, m = update(200.0)
    assert m["weight_clipped_frac"] == pytest.approx(above, abs=1e-6)
    assert m["weight_mean"] == pytest.approx(TINY.max_weight * above, rel=1e-4)
    assert np.isfinite(m["actor_loss"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new_state.actor_params))

    # Moderate advantages, no clamping: the weights are exp(A / alpha) for each temperature alpha (each
    # temperature is another compile, hence only two).
    advantage = q_min(a0, 1.0) - q_min(PI_ACTION, 1.0)  # in [-2.5, 0.5]
    for temperature in (1.0, 0.25):
        _, m = update(1.0, temperature=temperature)
        # a_pi's spread (+-0.005) moves every weight by a factor exp(+-0.005 / alpha).
        assert m["weight_mean"] == pytest.approx(np.exp(advantage / temperature).mean(), rel=0.03)
        assert m["weight_clipped_frac"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# Learning a real task: Pendulum-v1 with actions rescaled to AWAC's [-1, 1].

PENDULUM = "mb2po_test/UnitPendulum-v0"
EPISODE_STEPS = 200


def _unit_pendulum(**kwargs):
    """Pendulum-v1 (torque bound 2) taking actions in [-1, 1]: the same scaling for data and evaluation."""
    bound = np.ones(1, np.float32)
    return RescaleAction(PendulumEnv(**kwargs), -bound, bound)


if PENDULUM not in gym.registry:
    gym.register(PENDULUM, entry_point=_unit_pendulum)


def _controller(obs: np.ndarray) -> np.ndarray:
    """Energy-pumping swing-up, PD balance near the top. obs [..., 3] (cos th, sin th, th_dot) -> [..., 1].

    Dynamics th'' = 15 sin th + 3 * torque and torque = 2 u, so E = th'^2 / 2 + 15 (cos th - 1) (0 upright
    at rest) has dE/dt = 6 u th': pump with u ~ sign(th') * (-E) until near the top, then PD,
    u = -(10 th + 2 th') / 2.
    Scores about -150 on 200-step episodes (uniform random actions: about -1200)."""
    c, s, w = obs[..., 0], obs[..., 1], obs[..., 2]
    energy = 0.5 * w**2 + 15.0 * (c - 1.0)
    pump = np.clip(-0.5 * energy * np.sign(w + 1e-6), -1.0, 1.0)
    balance = np.clip(-(10.0 * np.arctan2(s, c) + 2.0 * w) / 2.0, -1.0, 1.0)
    return np.where(c > 0.85, balance, pump)[..., None]


def _controller_data(size: int, seed: int, noise: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)

    def policy(obs):
        action = np.clip(_controller(obs) + noise * rng.normal(size=1), -1.0, 1.0).astype(np.float32)
        return action, 0.0

    return rollout(PENDULUM, policy, size, seed, max_episode_steps=EPISODE_STEPS)


def _with_adversarial_actions(data: dict, copies: int, seed: int) -> dict:
    """`copies` extra transitions from every state of `data`, with the controller's action negated (plus a
    little noise), stepped in the real environment from that state. Two thirds of the data then push the
    wrong way, concentrated enough to be the behaviour policy's mode."""
    env = gym.make(PENDULUM, disable_env_checker=True)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    obs = np.repeat(data["observations"], copies, 0)
    actions = np.clip(-_controller(obs) + 0.1 * rng.normal(size=(len(obs), 1)), -1, 1).astype(np.float32)
    next_obs, rewards = np.empty_like(obs), np.empty(len(obs), np.float32)
    for i in range(len(obs)):
        env.unwrapped.state = np.array([np.arctan2(obs[i, 1], obs[i, 0]), obs[i, 2]])  # Pendulum's (th, th')
        next_obs[i], rewards[i], *_ = env.step(actions[i])
    env.close()
    extra = {"observations": obs, "actions": actions, "rewards": rewards, "next_observations": next_obs,
             "terminals": np.zeros(len(obs), bool)}
    return {k: np.concatenate([data[k], v]) for k, v in extra.items()}


# Small nets and a higher learning rate than the paper's defaults, so a few thousand steps suffice.
PENDULUM_CONFIG = awac.AWACConfig(
    actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), actor_lr=1e-3, critic_lr=1e-3, batch_size=64
)
PENDULUM_SEEDS = 2
PENDULUM_CHUNK = 500
PENDULUM_ROWS = 15_000  # both datasets have this many rows, so they share one compiled program per config


def _evaluate(act_fn, num_seeds=PENDULUM_SEEDS):
    return evaluate(act_fn, PENDULUM, num_seeds=num_seeds, num_episodes=10, seed=10_000,
                    max_episode_steps=EPISODE_STEPS).mean_return()


@pytest.fixture(scope="module")
def pendulum_references():
    """(controller return, uniform-random return) on the evaluation episodes."""
    rng = np.random.default_rng(0)
    controller = _evaluate(lambda o: _controller(o), num_seeds=1)[0]
    random = _evaluate(lambda o: rng.uniform(-1, 1, (*o.shape[:-1], 1)), num_seeds=1)[0]
    assert controller > -250 and random < -900, (controller, random)  # the task and controller are sane
    return controller, random


@jax.jit  # S seeds, compiled once for all three Pendulum runs
def _pendulum_init(keys, normalizer):
    return jax.vmap(lambda k: awac.init(k, 3, 1, PENDULUM_CONFIG, normalizer))(keys)


def _train_pendulum(data: dict, num_steps: int, config: awac.AWACConfig = PENDULUM_CONFIG):
    """S seeds on `data`, `num_steps` updates each: (each seed's deterministic evaluation return, the last
    chunk's metrics)."""
    batch = _transitions(data)
    assert len(batch) == PENDULUM_ROWS
    keys = jax.random.split(jax.random.PRNGKey(7), PENDULUM_SEEDS)
    state = _pendulum_init(keys, awac.Normalizer.fit(batch.observations))
    state = state.replace(config=config)  # init does not depend on the loss settings
    for _ in range(num_steps // PENDULUM_CHUNK):
        state, metrics = _train(PENDULUM_CHUNK)(state, batch)
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
    state = state.replace(config=PENDULUM_CONFIG)  # acting does not depend on the loss settings: no recompile
    return _evaluate(lambda o: np.asarray(awac.act_seeds(state, jnp.asarray(o)))), metrics


def test_awac_learns_pendulum_swing_up_from_noisy_controller_data(pendulum_references):
    """75 episodes of the controller with N(0, 0.3) action noise; 1500 AWAC steps recover most of the
    controller's return with the deterministic (mode) action."""
    controller, random = pendulum_references
    returns, _ = _train_pendulum(_controller_data(PENDULUM_ROWS, seed=0), num_steps=1500)
    normalized = (returns - random) / (controller - random)
    assert normalized.mean() > 0.75 and normalized.min() > 0.6, (returns, controller, random)


def test_awac_beats_behaviour_cloning_on_mixed_data(pendulum_references):
    """A third controller actions, two thirds their negation at the same states. Behaviour cloning (AWAC
    with every weight exp(A / 1e9) = 1) imitates the majority and fails; AWAC's advantage weights pick out
    the good third and swing up."""
    controller, random = pendulum_references
    data = _with_adversarial_actions(_controller_data(PENDULUM_ROWS // 3, seed=1), copies=2, seed=2)
    awac_returns, awac_metrics = _train_pendulum(data, num_steps=2500)
    bc_config = dataclasses.replace(PENDULUM_CONFIG, temperature=1e9)
    bc_returns, bc_metrics = _train_pendulum(data, num_steps=2500, config=bc_config)
    np.testing.assert_array_equal(bc_metrics["weight_mean"], 1.0)  # exp(A / 1e9) == 1 in float32: plain BC
    assert np.all(awac_metrics["weight_mean"] != 1.0)
    gap = awac_returns.mean() - bc_returns.mean()
    assert gap > 0.4 * (controller - random), (awac_returns, bc_returns, controller, random)
    assert awac_returns.min() > bc_returns.max(), (awac_returns, bc_returns)


# --- The critic options of the paper's section 2.1: quantile regression and the value transform. ---


def test_value_transform_round_trips_over_a_wide_range():
    x = np.concatenate([-np.logspace(5, -4, 200), [0.0], np.logspace(-4, 5, 200)]).astype(np.float32)
    for eps in (1e-2, 1e-3):
        h = awac.value_transform(jnp.asarray(x), eps)
        x64 = x.astype(np.float64)
        textbook = np.sign(x64) * (np.sqrt(np.abs(x64) + 1.0) - 1.0) + eps * x64
        np.testing.assert_allclose(np.asarray(h), textbook, rtol=1e-6)
        back = np.asarray(awac.inverse_value_transform(h, eps))
        np.testing.assert_allclose(back, x, rtol=2e-6, atol=0)
        assert np.all(np.diff(np.asarray(h)) > 0)  # monotone, so it maps quantiles to quantiles
        assert abs(float(h[-1])) < 0.05 * abs(float(x[-1]))  # and it compresses large returns


def test_critic_target_under_the_transform_is_h_of_the_backup():
    eps = 1e-2
    r, d, q_raw = jnp.array([1.0, -2.0, 3.0]), jnp.array([0.0, 0.0, 1.0]), jnp.array([50.0, -10.0, 7.0])
    y = awac.critic_target(r, d, awac.value_transform(q_raw, eps), 0.99, eps)
    np.testing.assert_allclose(np.asarray(awac.inverse_value_transform(y, eps)),
                               np.asarray(r + 0.99 * (1 - d) * q_raw), rtol=1e-5)


def test_quantile_critic_learns_the_quantiles_of_a_fixed_target_distribution():
    """Rewards ~ Exponential(scale 10) at a terminal state: the critic's K quantiles must reach the
    distribution's quantiles -10 ln(1 - tau_k) (within the bias of the Huber loss's kappa = 1)."""
    k = 8
    cfg = awac.AWACConfig(actor_hidden_dims=(32,), critic_hidden_dims=(64, 64), batch_size=256,
                          critic="quantile", num_quantiles=k, critic_lr=1e-2)
    n = 4096
    rewards = np.random.default_rng(0).exponential(10.0, size=n)
    data = _transitions(dict(
        observations=np.ones((n, 2)), actions=np.full((n, 1), 0.5), rewards=rewards,
        next_observations=np.ones((n, 2)), terminals=np.ones(n)))
    state = awac.init_seeds(jax.random.split(jax.random.PRNGKey(0), 1), 2, 1, cfg)
    state, metrics = awac.make_train_steps(3000)(state, data)
    params = jax.tree.map(lambda x: x[0], state.critic_params)
    quantiles = np.asarray(awac.critic_network(cfg).apply(params, jnp.ones((1, 2)), jnp.full((1, 1), 0.5)))[:, 0]
    taus = (np.arange(k) + 0.5) / k
    for twin in quantiles:
        np.testing.assert_allclose(twin, -10.0 * np.log(1.0 - taus), rtol=0.08, atol=0.8)
    np.testing.assert_allclose(float(metrics["q_data"][0]), rewards.mean(), rtol=0.1)  # the actor's value


def test_twin_critic_numbers_are_unchanged_by_the_critic_options():
    """10 fused updates of the default (twin) critic give the numbers the code gave before the quantile
    critic and the value transform were added (recorded from commit a6c758c on the Intel dev CPU)."""
    cfg = awac.AWACConfig(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=64)
    rng = np.random.default_rng(0)
    n = 512
    data = _transitions(dict(
        observations=rng.normal(size=(n, 3)), actions=np.tanh(rng.normal(size=(n, 2))),
        rewards=rng.normal(size=n), next_observations=rng.normal(size=(n, 3)),
        terminals=(rng.random(n) < 0.1).astype(np.float32)))
    state = awac.init_seeds(jax.random.split(jax.random.PRNGKey(0), 1), 3, 2, cfg)
    state, metrics = awac.make_train_steps(10)(state, data)
    recorded = {"actor_loss": 1.313844919204712, "critic_loss": 2.3977017402648926,
                "q_data": -0.13063453137874603, "advantage": -0.008011867292225361}
    for name, value in recorded.items():
        np.testing.assert_allclose(float(metrics[name][0]), value, rtol=1e-4, atol=1e-6, err_msg=name)
    critic_sum = float(sum(jnp.sum(x) for x in jax.tree.leaves(state.critic_params)))
    np.testing.assert_allclose(critic_sum, -21.39212417602539, rtol=1e-4)


@pytest.mark.parametrize("critic, transform", [("twin", True), ("quantile", False), ("quantile", True)])
def test_every_critic_option_trains_to_finite_numbers_per_seed(critic, transform):
    cfg = awac.AWACConfig(actor_hidden_dims=(16,), critic_hidden_dims=(16,), batch_size=32, critic=critic,
                          num_quantiles=4, value_transform=transform)
    rng = np.random.default_rng(1)
    n = 128
    data = _transitions(dict(
        observations=rng.normal(size=(n, 3)), actions=np.tanh(rng.normal(size=(n, 2))),
        rewards=100 * rng.normal(size=n), next_observations=rng.normal(size=(n, 3)), terminals=np.zeros(n)))
    state = awac.init_seeds(jax.random.split(jax.random.PRNGKey(0), 2), 3, 2, cfg)
    state, metrics = awac.make_train_steps(20)(state, data)
    assert all(np.isfinite(np.asarray(v)).all() and v.shape == (2,) for v in metrics.values())
    assert not np.allclose(metrics["critic_loss"][0], metrics["critic_loss"][1])  # seeds differ


def test_critic_options_are_validated():
    with pytest.raises(awac.ConfigError, match="--critic"):
        awac.AWACConfig(critic="triple")
    with pytest.raises(awac.ConfigError, match="--num_quantiles"):
        awac.AWACConfig(num_quantiles=0)


@pytest.mark.parametrize("transform", [False, True], ids=["plain", "value_transform"])
def test_actor_update_through_the_vjp_equals_the_plain_loss_gradient(transform):
    """`update` takes the actor's gradient through a VJP of one forward (shared with the baseline's action
    sample); it must equal jax.grad of the plain AWAC loss E[-log pi(a|s) w(s, a)] followed by Adam. Under
    the value transform the critics output h(Q), and the advantage is taken in return units, on h^-1."""
    import optax
    from mb2po_jax import networks

    config = dataclasses.replace(TINY, value_transform=transform)
    data = _synthetic()
    state = awac.init(jax.random.PRNGKey(0), OBS_DIM, ACT_DIM, config, awac.Normalizer.fit(data.observations))
    batch = jax.tree.map(lambda x: x[:64], data)
    key = jax.random.PRNGKey(1)
    new_state, _ = jax.jit(awac.update)(state, batch, key)

    actor, critic = awac.actor_network(config, ACT_DIM), awac.critic_network(config)
    obs = state.normalizer(batch.observations)
    actions = jnp.clip(batch.actions, -1.0 + networks.ACTION_EPS, 1.0 - networks.ACTION_EPS)
    _, pi_key = jax.random.split(key)

    def plain_loss(actor_params):
        dist = networks.tanh_gmm(*actor.apply(actor_params, obs))
        pi_actions = jax.lax.stop_gradient(dist.sample(seed=pi_key))
        q, q_pi = (critic.apply(state.critic_params, obs, a).min(0) for a in (actions, pi_actions))
        if transform:  # h^-1 by hand (awac.critic_values applies it in update)
            q, q_pi = (awac.inverse_value_transform(x, config.value_transform_eps) for x in (q, q_pi))
        weights = jax.lax.stop_gradient(awac.advantage_weights(q - q_pi, config.temperature, config.max_weight))
        return awac.actor_loss(dist.log_prob(actions), weights)

    grads = jax.grad(plain_loss)(state.actor_params)
    updates, _ = optax.adam(config.actor_lr).update(grads, state.actor_opt_state)
    expected = optax.apply_updates(state.actor_params, updates)
    for a, b in zip(jax.tree.leaves(new_state.actor_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # and the update moved the actor (the comparison is not between two unchanged copies)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state.actor_params),
                                                     jax.tree.leaves(state.actor_params)))

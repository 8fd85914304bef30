"""AWAC (Nair et al. 2020; CRR-exp), the paper's stage 1 and its policy optimiser in MB2PO (section 4.2).

  critic:  L_Q  = sum_j E[(Q_j(s,a) - y)^2],  y = r + gamma (1 - done) min_j Q'_j(s', a'),  a' ~ pi(.|s')
  actor:   L_pi = E[-log pi(a|s) * min(exp(A(s,a) / alpha), 20)],  A(s,a) = Q(s,a) - E_{a'~pi}[Q(s,a')]
  Q = min over the twin critics, Q' the Polyak-averaged targets, alpha fixed (no partition function).

The paper's section 2.1 says its Q-learning also uses distributional RL (quantile regression, Dabney et
al. 2018) and the invertible value transform of Pohlen et al. 2018; both are options here, with no
settings in the paper (README, "Fidelity to the paper"):
  critic="quantile": each twin critic predicts K quantiles theta_k(s, a) at tau_k = (2k - 1) / 2K, trained
    with the quantile Huber loss against the K target quantiles y_k = r + gamma (1 - done) min_j theta'_jk;
    the value used by the actor is the quantiles' mean (min over the twins).
  value_transform: the critics predict h(Q), h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x, with targets
    h(r + gamma (1 - done) h^-1(Q')); the actor's advantage is taken on h^-1 of the prediction.

Everything here is pure: `update(state, batch, key) -> (state, metrics)` for one seed, `make_train_steps`
fuses K updates with batches sampled on the device into one `lax.scan`, vmapped over a leading seed axis.

Both losses are taken at the same parameters (a simultaneous update): the actor's advantage uses the
critic before this step's critic update. That lets one critic forward over [(s, a); (s, a_pi)] serve the
critic loss, Q(s, a) and the baseline E[Q(s, a_pi)], and one actor forward over s serve log pi(a|s) and
the baseline's action sample. CORL updates the critic first and re-evaluates it; the fixed point is the same.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from mb2po_jax import networks
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError

CRITICS = ("twin", "quantile")


@dataclasses.dataclass(frozen=True)
class AWACConfig:
    """Defaults follow the paper where it speaks (5-component tanh-GMM, alpha = 1, clamp 20) and CORL's
    AWAC otherwise (3x256 ReLU networks, Adam 3e-4, batch 256, gamma 0.99, tau 0.005)."""

    actor_hidden_dims: tuple[int, ...] = (256, 256, 256)
    critic_hidden_dims: tuple[int, ...] = (256, 256, 256)
    num_components: int = 5
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    temperature: float = 1.0  # the paper's alpha in exp(A / alpha)
    max_weight: float = 20.0  # the paper's clamp of the exponentiated advantage
    normalize_observations: bool = True
    critic: str = "twin"  # "twin" (clipped double-Q) or "quantile" (twin distributional critics)
    num_quantiles: int = 32  # K, with critic="quantile"
    value_transform: bool = False  # Pohlen et al.'s h on the critics' outputs
    value_transform_eps: float = 1e-2  # the eps of h (Pohlen et al.'s value)

    def __post_init__(self):
        if self.critic not in CRITICS:
            raise ConfigError(f"--critic must be one of {', '.join(CRITICS)}, got {self.critic!r}")
        # `not (x > 0)` rather than `x <= 0`: a NaN fails it too.
        checks = [
            ("actor_lr", math.isfinite(self.actor_lr) and self.actor_lr >= 0, "a number >= 0"),
            ("critic_lr", math.isfinite(self.critic_lr) and self.critic_lr >= 0, "a number >= 0"),
            ("gamma", 0 <= self.gamma < 1, "in [0, 1)"),
            ("tau", 0 < self.tau <= 1, "in (0, 1]"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "positive"),
            ("max_weight", self.max_weight > 0, "positive"),
            ("num_components", self.num_components >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("num_quantiles", self.num_quantiles >= 1, ">= 1"),
            ("value_transform_eps", math.isfinite(self.value_transform_eps) and self.value_transform_eps > 0,
             "positive"),
            ("actor_hidden_dims", all(w >= 1 for w in self.actor_hidden_dims), "widths >= 1"),
            ("critic_hidden_dims", all(w >= 1 for w in self.critic_hidden_dims), "widths >= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"--{name} must be {what}, got {getattr(self, name)}")

    @property
    def transform_eps(self) -> float | None:
        """eps of the value transform h, or None when the critics predict Q itself."""
        return self.value_transform_eps if self.value_transform else None


class Normalizer(struct.PyTreeNode):
    """Observation standardisation fixed from the offline dataset (kept for model-generated states too)."""

    mean: jax.Array  # [obs_dim]
    std: jax.Array  # [obs_dim]

    def __call__(self, obs: jax.Array) -> jax.Array:
        return (obs - self.mean) / self.std

    @classmethod
    def identity(cls, obs_dim: int) -> "Normalizer":
        return cls(jnp.zeros((obs_dim,), jnp.float32), jnp.ones((obs_dim,), jnp.float32))

    @classmethod
    def fit(cls, observations: jax.Array, eps: float = 1e-3) -> "Normalizer":
        observations = jnp.asarray(observations, jnp.float32)
        return cls(observations.mean(0), observations.std(0) + eps)


class AWACState(struct.PyTreeNode):
    """Full training state of one seed (or S seeds, with every leaf carrying a leading [S] axis)."""

    actor_params: Any
    critic_params: Any
    target_critic_params: Any
    actor_opt_state: Any
    critic_opt_state: Any
    normalizer: Normalizer
    key: jax.Array  # raw uint32 PRNG key, so checkpoints hold plain arrays
    step: jax.Array  # int32 number of updates done
    config: AWACConfig = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)


def actor_network(config: AWACConfig, action_dim: int) -> networks.GMMParams:
    return networks.GMMParams(config.actor_hidden_dims, action_dim, config.num_components)


def critic_network(config: AWACConfig) -> networks.EnsembleCritic:
    num_outputs = config.num_quantiles if config.critic == "quantile" else None
    return networks.EnsembleCritic(config.critic_hidden_dims, num_qs=2, num_outputs=num_outputs)


def value_transform(x: jax.Array, eps: float) -> jax.Array:
    """Pohlen et al.'s h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x: compresses large values, invertible.
    sqrt(|x| + 1) - 1 is computed as |x| / (sqrt(|x| + 1) + 1), which keeps float precision near 0."""
    return jnp.sign(x) * jnp.abs(x) / (jnp.sqrt(jnp.abs(x) + 1.0) + 1.0) + eps * x


def inverse_value_transform(y: jax.Array, eps: float) -> jax.Array:
    """h^-1(y) = sign(y)((s)^2 - 1), s = sqrt(|x| + 1) the positive root of eps s^2 + s - (1 + eps + |y|) = 0.
    Computed as (s - 1)(s + 1) with s - 1 = 2|y| / (sqrt((1 + 2 eps)^2 + 4 eps |y|) + 1 + 2 eps), the same
    root without the cancellation near 0."""
    a = jnp.abs(y)
    s_minus_1 = 2.0 * a / (jnp.sqrt((1.0 + 2.0 * eps) ** 2 + 4.0 * eps * a) + 1.0 + 2.0 * eps)
    return jnp.sign(y) * s_minus_1 * (s_minus_1 + 2.0)


def critic_target(rewards: jax.Array, terminals: jax.Array, next_q: jax.Array, gamma: float,
                  transform_eps: float | None) -> jax.Array:
    """The Bellman target y = r + gamma (1 - done) Q'(s', a'), or h(r + gamma (1 - done) h^-1(Q')) under
    the value transform. rewards/terminals [B]; next_q [B] (already the min over the target twins) or
    [B, K] quantiles, mapped one by one (h is monotone, so quantiles stay quantiles)."""
    if next_q.ndim == 2:
        rewards, terminals = rewards[:, None], terminals[:, None]
    if transform_eps is None:
        return rewards + gamma * (1.0 - terminals) * next_q
    backup = rewards + gamma * (1.0 - terminals) * inverse_value_transform(next_q, transform_eps)
    return value_transform(backup, transform_eps)


def bellman_target(state: AWACState, next_obs: jax.Array, rewards: jax.Array, terminals: jax.Array,
                   key: jax.Array) -> jax.Array:
    """The critics' regression target for a batch (single seed): `critic_target` with
    Q'(s', a') = min_j Q'_j(s', a'), a' ~ pi(.|s') from `key`, the min over the target twins taken quantile by
    quantile for the quantile critic. next_obs: normalised [B, o]; returns [B] (or [B, K])."""
    config = state.config
    actor, critic = actor_network(config, state.action_dim), critic_network(config)
    next_actions = networks.tanh_gmm(*actor.apply(state.actor_params, next_obs)).sample(seed=key)
    next_q = critic.apply(state.target_critic_params, next_obs, next_actions).min(0)
    return critic_target(rewards, terminals, next_q, config.gamma, config.transform_eps)


def quantile_huber_loss(quantiles: jax.Array, targets: jax.Array, kappa: float = 1.0) -> jax.Array:
    """Quantile regression loss of QR-DQN (Dabney et al. 2018, eq. 10): quantiles [..., K] predicted at
    tau_k = (2k - 1) / 2K, targets [..., M] samples of the target distribution -> [...]:
    sum_k mean_m |tau_k - 1{u < 0}| Huber_kappa(u) / kappa,  u = y_m - theta_k."""
    k = quantiles.shape[-1]
    taus = (jnp.arange(k, dtype=quantiles.dtype) + 0.5) / k
    u = targets[..., None, :] - quantiles[..., :, None]  # [..., K, M]
    huber = jnp.where(jnp.abs(u) <= kappa, 0.5 * u**2, kappa * (jnp.abs(u) - 0.5 * kappa))
    weight = jnp.abs(taus[:, None] - (u < 0).astype(u.dtype))
    return (weight * huber / kappa).mean(-1).sum(-1)


def critic_values(q: jax.Array, config: AWACConfig) -> jax.Array:
    """Q(s, a) in return units from the critics' outputs: h^-1 of the prediction under the value
    transform, and the mean over quantiles for the quantile critic. [2, B] or [2, B, K] -> [2, B]."""
    if config.transform_eps is not None:
        q = inverse_value_transform(q, config.transform_eps)
    return q.mean(-1) if config.critic == "quantile" else q


def advantage_weights(advantage: jax.Array, temperature: float, max_weight: float) -> jax.Array:
    """The paper's actor weights min(exp(A(s, a) / alpha), 20) (not differentiated)."""
    return jnp.minimum(jnp.exp(advantage / temperature), max_weight)


def actor_loss(log_prob: jax.Array, weights: jax.Array) -> jax.Array:
    """AWAC's actor loss L_pi = E[-log pi(a|s) * w(s, a)] for log pi(a|s) [B] and the weights [B]."""
    return -(log_prob * weights).mean()


def _optimizers(config: AWACConfig):
    return optax.adam(config.actor_lr), optax.adam(config.critic_lr)


def init(
    key: jax.Array,
    obs_dim: int,
    action_dim: int,
    config: AWACConfig = AWACConfig(),
    normalizer: Normalizer | None = None,
) -> AWACState:
    """AWAC state for one seed. `normalizer` defaults to identity (or pass `Normalizer.fit(dataset_obs)`)."""
    if normalizer is None or not config.normalize_observations:
        normalizer = Normalizer.identity(obs_dim)
    key, actor_key, critic_key = jax.random.split(key, 3)
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    act = jnp.zeros((1, action_dim), jnp.float32)
    actor_params = actor_network(config, action_dim).init(actor_key, obs)
    critic_params = critic_network(config).init(critic_key, obs, act)
    actor_tx, critic_tx = _optimizers(config)
    return AWACState(
        actor_params=actor_params,
        critic_params=critic_params,
        # A copy, not an alias: the training call donates the state, and XLA refuses one buffer twice.
        target_critic_params=jax.tree.map(jnp.copy, critic_params),
        actor_opt_state=actor_tx.init(actor_params),
        critic_opt_state=critic_tx.init(critic_params),
        normalizer=normalizer,
        key=key,
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=action_dim,
    )


def init_seeds(
    keys: jax.Array,
    obs_dim: int,
    action_dim: int,
    config: AWACConfig = AWACConfig(),
    normalizer: Normalizer | None = None,
) -> AWACState:
    """S independently initialised seeds, stacked on a leading axis. keys: [S, 2]."""
    return jax.jit(jax.vmap(lambda k: init(k, obs_dim, action_dim, config, normalizer)))(keys)


def policy_params(state: AWACState, obs: jax.Array):
    """(logits, means, log_stds) of the actor at raw (unnormalised) observations."""
    return actor_network(state.config, state.action_dim).apply(state.actor_params, state.normalizer(obs))


def act(state: AWACState, obs: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Action for observations [..., obs_dim]: a sample if `key` is given, else the deterministic
    evaluation action (tanh of the most probable component's mean)."""
    logits, means, log_stds = policy_params(state, obs)
    if key is None:
        return networks.tanh_gmm_mode(logits, means, log_stds)
    return networks.tanh_gmm(logits, means, log_stds).sample(seed=key)


def update(state: AWACState, batch: Transitions, key: jax.Array) -> tuple[AWACState, dict[str, jax.Array]]:
    """One AWAC gradient step on both networks (single seed)."""
    config = state.config
    chex.assert_rank([batch.observations, batch.actions, batch.rewards], [2, 2, 1])
    actor, critic = actor_network(config, state.action_dim), critic_network(config)
    actor_tx, critic_tx = _optimizers(config)
    obs, next_obs = state.normalizer(batch.observations), state.normalizer(batch.next_observations)
    actions = jnp.clip(batch.actions, -1.0 + networks.ACTION_EPS, 1.0 - networks.ACTION_EPS)
    next_key, pi_key = jax.random.split(key)
    batch_size = obs.shape[0]

    target = bellman_target(state, next_obs, batch.rewards, batch.terminals, next_key)

    # Actor forward over s, kept as a VJP: it gives log pi(a|s) (differentiated below, once the advantage
    # weights are known) and the baseline's action sample a_pi ~ pi(.|s) (not differentiated).
    def actor_forward(actor_params):
        dist = networks.tanh_gmm(*actor.apply(actor_params, obs))
        return dist.log_prob(actions), jax.lax.stop_gradient(dist.sample(seed=pi_key))

    log_prob, actor_vjp, pi_actions = jax.vjp(actor_forward, state.actor_params, has_aux=True)

    def critic_loss_fn(critic_params):
        # One forward over [(s, a); (s, a_pi)]: the first half is trained, the second is the baseline.
        q_all = critic.apply(
            critic_params,
            jnp.concatenate([obs, obs], 0),
            jnp.concatenate([actions, pi_actions], 0),
        )  # [2, 2B] (or [2, 2B, K] quantiles)
        if config.critic == "quantile":
            loss = quantile_huber_loss(q_all[:, :batch_size], target[None]).mean(1).sum()
        else:
            loss = ((q_all[:, :batch_size] - target[None]) ** 2).mean(1).sum()
        return loss, q_all

    (critic_loss, q_all), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
        state.critic_params
    )
    q_min = jax.lax.stop_gradient(critic_values(q_all, config).min(0))  # [2B]
    advantage = q_min[:batch_size] - q_min[batch_size:]  # A(s,a) = Q(s,a) - E_pi[Q(s,.)] (1 sample)
    weights = advantage_weights(advantage, config.temperature, config.max_weight)
    # The actor's gradient by the chain rule through the VJP kept above (one actor forward for both the
    # loss and the baseline's sample); `tests/test_awac.py` checks it equals jax.grad of the plain loss.
    pi_loss, dloss_dlogp = jax.value_and_grad(actor_loss)(log_prob, weights)
    (actor_grads,) = actor_vjp(dloss_dlogp)

    actor_updates, actor_opt_state = actor_tx.update(actor_grads, state.actor_opt_state)
    actor_params = optax.apply_updates(state.actor_params, actor_updates)
    critic_updates, critic_opt_state = critic_tx.update(critic_grads, state.critic_opt_state)
    critic_params = optax.apply_updates(state.critic_params, critic_updates)
    target_critic_params = optax.incremental_update(
        critic_params, state.target_critic_params, config.tau
    )
    metrics = {
        "critic_loss": critic_loss,
        "actor_loss": pi_loss,
        "q_data": q_min[:batch_size].mean(),
        "advantage": advantage.mean(),
        "weight_mean": weights.mean(),
        "weight_clipped_frac": (weights >= config.max_weight).mean(),
        "log_prob": log_prob.mean(),
    }
    new_state = state.replace(
        actor_params=actor_params,
        critic_params=critic_params,
        target_critic_params=target_critic_params,
        actor_opt_state=actor_opt_state,
        critic_opt_state=critic_opt_state,
        step=state.step + 1,
    )
    return new_state, metrics


def sample_uniform(data: Transitions, key: jax.Array, batch_size: int) -> Transitions:
    """A uniform minibatch (with replacement) from device-resident transitions."""
    idx = jax.random.randint(key, (batch_size,), 0, len(data))
    return jax.tree.map(lambda x: x[idx], data)


@functools.lru_cache(maxsize=16)  # one compilation per (num_steps, sample_fn) in a process
def make_train_steps(num_steps: int, sample_fn=None):
    """Compiled `(state [S], data) -> (state [S], metrics [S])` doing `num_steps` updates per seed.

    Batches are drawn inside the compiled scan by `sample_fn(data, key, batch_size) -> Transitions`
    (default: uniform over `data`, the whole dataset's `Transitions` on the device); `data` is shared by all
    seeds, while each seed draws from its own key, so seeds see different data orders. Metrics are means over the `num_steps`.
    The state's key advances inside, so K calls of N steps equal one call of K*N steps.
    """
    sample_fn = sample_fn or sample_uniform

    def train_one_seed(state: AWACState, data):
        return train_steps(state, data, num_steps, sample_fn)

    return jax.jit(jax.vmap(train_one_seed, in_axes=(0, None)), donate_argnums=0)


def train_steps(state: AWACState, data, num_steps: int, sample_fn=sample_uniform):
    """`num_steps` updates of ONE seed in a `lax.scan` (pure; the body of `make_train_steps`, and of an
    MB2PO iteration with a mixed-batch `sample_fn`). Returns (state, metrics averaged over the steps)."""

    def body(state, _):
        key, sample_key, update_key = jax.random.split(state.key, 3)
        batch = sample_fn(data, sample_key, state.config.batch_size)
        return update(state.replace(key=key), batch, update_key)

    state, metrics = jax.lax.scan(body, state, None, length=num_steps)
    return state, jax.tree.map(lambda m: m.mean(0), metrics)


@jax.jit
def act_seeds(state: AWACState, obs: jax.Array) -> jax.Array:
    """Deterministic actions for every seed: state [S], obs [S, N, obs_dim] -> [S, N, act_dim]."""
    return jax.vmap(act)(state, obs)

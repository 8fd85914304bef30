"""AWAC (Nair et al. 2020; CRR-exp), the paper's stage 1 and its policy optimiser in MB2PO (section 4.2).

  critic:  L_Q  = sum_j E[(Q_j(s,a) - y)^2],  y = r + gamma (1 - done) min_j Q'_j(s', a'),  a' ~ pi(.|s')
  actor:   L_pi = E[-log pi(a|s) * min(exp(A(s,a) / alpha), 20)],  A(s,a) = Q(s,a) - E_{a'~pi}[Q(s,a')]
  Q = min over the twin critics, Q' the Polyak-averaged targets, alpha fixed (no partition function).

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
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from mb2po_jax import networks


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


class Batch(struct.PyTreeNode):
    """Transitions on the device. obs/next_obs: [B, obs_dim], actions: [B, act_dim], rest [B]."""

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminals: jax.Array  # 1.0 on true termination only (timeouts bootstrap)

    def __len__(self) -> int:
        return self.observations.shape[0]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Batch":
        fields = ("observations", "actions", "rewards", "next_observations", "terminals")
        return cls(**{f: jnp.asarray(data[f], jnp.float32) for f in fields})


def _actor(config: AWACConfig, action_dim: int) -> networks.GMMParams:
    return networks.GMMParams(config.actor_hidden_dims, action_dim, config.num_components)


def _critic(config: AWACConfig) -> networks.EnsembleCritic:
    return networks.EnsembleCritic(config.critic_hidden_dims, num_qs=2)


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
    actor_params = _actor(config, action_dim).init(actor_key, obs)
    critic_params = _critic(config).init(critic_key, obs, act)
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
    return _actor(state.config, state.action_dim).apply(state.actor_params, state.normalizer(obs))


def act(state: AWACState, obs: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Action for observations [..., obs_dim]: a sample if `key` is given, else the deterministic
    evaluation action (tanh of the most probable component's mean)."""
    logits, means, log_stds = policy_params(state, obs)
    if key is None:
        return networks.tanh_gmm_mode(logits, means, log_stds)
    return networks.tanh_gmm(logits, means, log_stds).sample(seed=key)


def update(state: AWACState, batch: Batch, key: jax.Array) -> tuple[AWACState, dict[str, jax.Array]]:
    """One AWAC gradient step on both networks (single seed)."""
    config = state.config
    chex.assert_rank([batch.observations, batch.actions, batch.rewards], [2, 2, 1])
    actor, critic = _actor(config, state.action_dim), _critic(config)
    actor_tx, critic_tx = _optimizers(config)
    obs, next_obs = state.normalizer(batch.observations), state.normalizer(batch.next_observations)
    actions = jnp.clip(batch.actions, -1.0 + networks.ACTION_EPS, 1.0 - networks.ACTION_EPS)
    next_key, pi_key = jax.random.split(key)
    batch_size = obs.shape[0]

    # Target y = r + gamma (1 - done) min_j Q'_j(s', a'),  a' ~ pi(.|s').
    next_dist = networks.tanh_gmm(*actor.apply(state.actor_params, next_obs))
    next_actions = next_dist.sample(seed=next_key)
    next_q = critic.apply(state.target_critic_params, next_obs, next_actions).min(0)
    target = batch.rewards + config.gamma * (1.0 - batch.terminals) * next_q

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
        )  # [2, 2B]
        loss = ((q_all[:, :batch_size] - target[None]) ** 2).mean(1).sum()
        return loss, q_all

    (critic_loss, q_all), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
        state.critic_params
    )
    q_min = jax.lax.stop_gradient(q_all.min(0))  # [2B]
    advantage = q_min[:batch_size] - q_min[batch_size:]  # A(s,a) = Q(s,a) - E_pi[Q(s,.)] (1 sample)
    weights = jnp.minimum(jnp.exp(advantage / config.temperature), config.max_weight)
    actor_loss = -(log_prob * weights).mean()
    (actor_grads,) = actor_vjp(-weights / batch_size)

    actor_updates, actor_opt_state = actor_tx.update(actor_grads, state.actor_opt_state)
    actor_params = optax.apply_updates(state.actor_params, actor_updates)
    critic_updates, critic_opt_state = critic_tx.update(critic_grads, state.critic_opt_state)
    critic_params = optax.apply_updates(state.critic_params, critic_updates)
    target_critic_params = optax.incremental_update(
        critic_params, state.target_critic_params, config.tau
    )
    metrics = {
        "critic_loss": critic_loss,
        "actor_loss": actor_loss,
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


def sample_uniform(data: Batch, key: jax.Array, batch_size: int) -> Batch:
    """A uniform minibatch (with replacement) from device-resident transitions."""
    idx = jax.random.randint(key, (batch_size,), 0, len(data))
    return jax.tree.map(lambda x: x[idx], data)


@functools.lru_cache(maxsize=16)  # one compilation per (num_steps, sample_fn) in a process
def make_train_steps(num_steps: int, sample_fn=None):
    """Compiled `(state [S], data) -> (state [S], metrics [S])` doing `num_steps` updates per seed.

    Batches are drawn inside the compiled scan by `sample_fn(data, key, batch_size) -> Batch` (default:
    uniform over `data`, a `Batch` of the whole dataset); `data` is shared by all seeds, while each seed
    draws from its own key, so seeds see different data orders. Metrics are means over the `num_steps`.
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

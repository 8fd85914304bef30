"""Soft actor-critic (Haarnoja et al. 2018, "SAC: Algorithms and Applications" variant).

Online SAC trains the behaviour policies that the D4RL-style datasets are made from
(`mb2po_jax.behavior.train`), and its pure `update` is the policy optimiser a MOPO baseline reuses inside
the model-based engine. Parts:

- tanh-squashed diagonal Gaussian actor (`networks.TanhGaussianParams`), reparameterised samples;
- twin critics stacked on one axis (`networks.EnsembleCritic`), clipped double-Q with Polyak targets;
- learned temperature alpha = exp(log_alpha) driven towards the target entropy -act_dim.

Everything here is pure: `update(state, batch, key) -> (state, metrics)`; `update_steps` scans it over a
leading axis of pre-sampled batches; `make_online_step` fuses "insert the k newest transitions into the
device-resident replay buffer, then do k updates" into one compiled call, so the host env loop pays one
dispatch per k environment steps while keeping one update per environment step on average.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training.train_state import TrainState

from mb2po_jax.networks import EnsembleCritic, TanhGaussianParams, tanh_gaussian

Params = Any
Batch = Mapping[str, jax.Array]  # observations, actions, rewards, next_observations, terminals


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """SAC hyperparameters; defaults are the usual MuJoCo ones (Haarnoja et al. 2018b, jaxrl, CleanRL)."""

    hidden_dims: Sequence[int] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    temp_lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # Polyak rate of the target critics
    num_qs: int = 2
    init_temperature: float = 1.0
    target_entropy: float | None = None  # None: -act_dim
    backup_entropy: bool = True  # include -alpha * log pi(a'|s') in the critic target (soft backup)


class SACState(struct.PyTreeNode):
    actor: TrainState
    critic: TrainState
    target_critic_params: Params
    temp: TrainState  # params: {"log_alpha": scalar}
    step: jax.Array  # int32 scalar, number of updates done
    config: SACConfig = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)


# --------------------------------------------------------------------------------------------- policy
def actor_module(params: Params) -> TanhGaussianParams:
    """The actor network that `params` belong to, read off their shapes.

    Actor parameters are therefore self-describing: a snapshot file holding only them is enough to act.
    """
    mlp = params["MLP_0"]
    hidden = tuple(int(mlp[f"Dense_{i}"]["kernel"].shape[-1]) for i in range(len(mlp)))
    act_dim = int(params["Dense_0"]["kernel"].shape[-1])
    return TanhGaussianParams(hidden_dims=hidden, action_dim=act_dim)


def policy(params: Params, obs: jax.Array):
    """pi(.|s) as a distrax distribution over actions in (-1, 1). obs: [..., obs_dim]."""
    mean, log_std = actor_module(params).apply({"params": params}, obs)
    return tanh_gaussian(mean, log_std)


def sample_action(params: Params, key: jax.Array, obs: jax.Array) -> jax.Array:
    """Stochastic action a ~ pi(.|s) (exploration / behaviour data). obs [..., obs_dim] -> [..., act_dim]."""
    return policy(params, obs).sample(seed=key)


def sample_action_and_log_prob(params: Params, key: jax.Array, obs: jax.Array):
    """(a ~ pi(.|s), log pi(a|s)): [..., act_dim], [...]. Behaviour datasets record the log-probability."""
    return policy(params, obs).sample_and_log_prob(seed=key)


def deterministic_action(params: Params, obs: jax.Array) -> jax.Array:
    """Evaluation action tanh(mean). obs [..., obs_dim] -> [..., act_dim]."""
    mean, _ = actor_module(params).apply({"params": params}, obs)
    return jnp.tanh(mean)


# --------------------------------------------------------------------------------------------- init
def init_sac(key: jax.Array, obs_dim: int, act_dim: int, config: SACConfig = SACConfig()) -> SACState:
    k_actor, k_critic = jax.random.split(key)
    obs = jnp.zeros((1, obs_dim), jnp.float32)
    act = jnp.zeros((1, act_dim), jnp.float32)

    actor_def = TanhGaussianParams(hidden_dims=tuple(config.hidden_dims), action_dim=act_dim)
    actor = TrainState.create(
        apply_fn=actor_def.apply,
        params=actor_def.init(k_actor, obs)["params"],
        tx=optax.adam(config.actor_lr),
    )
    critic_def = EnsembleCritic(hidden_dims=tuple(config.hidden_dims), num_qs=config.num_qs)
    critic_params = critic_def.init(k_critic, obs, act)["params"]
    critic = TrainState.create(apply_fn=critic_def.apply, params=critic_params, tx=optax.adam(config.critic_lr))
    temp = TrainState.create(
        apply_fn=None,
        params={"log_alpha": jnp.asarray(jnp.log(config.init_temperature), jnp.float32)},
        tx=optax.adam(config.temp_lr),
    )
    target_entropy = -float(act_dim) if config.target_entropy is None else float(config.target_entropy)
    # TrainState counts steps with a python int until the first update; an int32 array from the start keeps
    # the pytree's types fixed (one compilation, checkpoints restore into a fresh state).
    actor, critic, temp = (ts.replace(step=jnp.zeros((), jnp.int32)) for ts in (actor, critic, temp))
    return SACState(
        actor=actor,
        critic=critic,
        # A copy: the state is donated to compiled updates, and one buffer must not be donated twice.
        target_critic_params=jax.tree.map(jnp.copy, critic_params),
        temp=temp,
        step=jnp.zeros((), jnp.int32),
        config=config,
        target_entropy=target_entropy,
    )


# --------------------------------------------------------------------------------------------- update
def update_critic(state: SACState, batch: Batch, key: jax.Array):
    """Soft Bellman backup: y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s')."""
    cfg = state.config
    alpha = jnp.exp(state.temp.params["log_alpha"])
    next_actions, next_log_pi = policy(state.actor.params, batch["next_observations"]).sample_and_log_prob(
        seed=key
    )
    next_q = state.critic.apply_fn(
        {"params": state.target_critic_params}, batch["next_observations"], next_actions
    ).min(axis=0)  # [B]
    if cfg.backup_entropy:
        next_q = next_q - alpha * next_log_pi
    # Terminals stop bootstrapping; time-limit truncations are not terminals (SPEC section 2).
    target = batch["rewards"] + cfg.discount * (1.0 - batch["terminals"]) * next_q
    target = jax.lax.stop_gradient(target)

    def loss_fn(params):
        q = state.critic.apply_fn({"params": params}, batch["observations"], batch["actions"])  # [num_qs, B]
        loss = ((q - target[None]) ** 2).mean(axis=1).sum()
        return loss, {"critic_loss": loss, "q": q.mean(), "target_q": target.mean()}

    grads, info = jax.grad(loss_fn, has_aux=True)(state.critic.params)
    critic = state.critic.apply_gradients(grads=grads)
    target_params = optax.incremental_update(critic.params, state.target_critic_params, cfg.tau)
    return state.replace(critic=critic, target_critic_params=target_params), info


def update_actor(state: SACState, batch: Batch, key: jax.Array):
    """Reparameterised policy loss E[alpha log pi(a|s) - min_j Q_j(s, a)], a = tanh(mu + sigma eps)."""
    alpha = jnp.exp(state.temp.params["log_alpha"])

    def loss_fn(params):
        actions, log_pi = policy(params, batch["observations"]).sample_and_log_prob(seed=key)
        q = state.critic.apply_fn({"params": state.critic.params}, batch["observations"], actions).min(axis=0)
        loss = (alpha * log_pi - q).mean()
        return loss, {"actor_loss": loss, "entropy": -log_pi.mean()}

    grads, info = jax.grad(loss_fn, has_aux=True)(state.actor.params)
    return state.replace(actor=state.actor.apply_gradients(grads=grads)), info


def update_temperature(state: SACState, entropy: jax.Array):
    """alpha loss: log_alpha * (H(pi) - target_entropy); alpha grows when the policy is below target entropy."""
    entropy = jax.lax.stop_gradient(entropy)

    def loss_fn(params):
        return params["log_alpha"] * (entropy - state.target_entropy)

    grads = jax.grad(loss_fn)(state.temp.params)
    temp = state.temp.apply_gradients(grads=grads)
    return state.replace(temp=temp), {"alpha": jnp.exp(temp.params["log_alpha"])}


def update(state: SACState, batch: Batch, key: jax.Array) -> tuple[SACState, dict[str, jax.Array]]:
    """One SAC gradient step: critic, then actor (against the new critic), then temperature."""
    chex.assert_rank(batch["rewards"], 1)
    chex.assert_equal_shape([batch["rewards"], batch["terminals"]])
    chex.assert_equal_shape([batch["observations"], batch["next_observations"]])
    k_critic, k_actor = jax.random.split(key)
    state, critic_info = update_critic(state, batch, k_critic)
    state, actor_info = update_actor(state, batch, k_actor)
    state, temp_info = update_temperature(state, actor_info["entropy"])
    return state.replace(step=state.step + 1), {**critic_info, **actor_info, **temp_info}


def update_steps(state: SACState, batches: Batch, key: jax.Array):
    """`update` scanned over the leading axis of `batches` ([k, B, ...]); metrics are per step, [k]."""
    num_steps = batches["rewards"].shape[0]

    def body(state, xs):
        batch, step_key = xs
        return update(state, batch, step_key)

    return jax.lax.scan(body, state, (batches, jax.random.split(key, num_steps)))


def make_update_steps(config: SACConfig):
    """Compiled `update_steps` (the state is donated: its buffers are reused in place)."""
    del config  # static hyperparameters travel inside SACState
    return jax.jit(update_steps, donate_argnums=0)


# --------------------------------------------------------------------------------------------- replay
class ReplayBuffer(struct.PyTreeNode):
    """Device-resident ring buffer: `data[name]` is [capacity, ...]; rows [0, size) are filled."""

    data: dict[str, jax.Array]
    ptr: jax.Array  # int32 scalar, next row to write
    size: jax.Array  # int32 scalar, number of filled rows

    @property
    def capacity(self) -> int:
        return self.data["rewards"].shape[0]


REPLAY_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


def replay_buffer_init(capacity: int, obs_dim: int, act_dim: int) -> ReplayBuffer:
    shapes = {
        "observations": (obs_dim,),
        "actions": (act_dim,),
        "rewards": (),
        "next_observations": (obs_dim,),
        "terminals": (),
    }
    data = {k: jnp.zeros((capacity, *s), jnp.float32) for k, s in shapes.items()}
    return ReplayBuffer(data=data, ptr=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def replay_buffer_add(buffer: ReplayBuffer, rows: Batch) -> ReplayBuffer:
    """Write k rows ([k, ...]) at the write index, wrapping around; only the k rows are touched."""
    k = rows["rewards"].shape[0]
    idx = (buffer.ptr + jnp.arange(k)) % buffer.capacity
    data = {name: buffer.data[name].at[idx].set(rows[name].astype(jnp.float32)) for name in buffer.data}
    return ReplayBuffer(
        data=data,
        ptr=(buffer.ptr + k) % buffer.capacity,
        size=jnp.minimum(buffer.size + k, buffer.capacity),
    )


def replay_buffer_sample(buffer: ReplayBuffer, key: jax.Array, shape: tuple[int, ...]) -> Batch:
    """Uniform draw (with replacement) from the filled rows only; result fields are [*shape, ...]."""
    idx = jax.random.randint(key, shape, 0, buffer.size)
    return {name: jnp.take(x, idx, axis=0) for name, x in buffer.data.items()}


def sample_and_update(state: SACState, buffer: ReplayBuffer, key: jax.Array, num_updates: int):
    """`num_updates` SAC steps on fresh uniform batches from the filled part of `buffer` (one scan)."""
    k_sample, k_update = jax.random.split(key)
    batches = replay_buffer_sample(buffer, k_sample, (num_updates, state.config.batch_size))
    state, metrics = update_steps(state, batches, k_update)
    return state, jax.tree.map(jnp.mean, metrics)


def make_online_step(config: SACConfig):
    """`(state, buffer, rows [k, ...], key) -> (state, buffer, metrics)`: insert the k newest transitions, then
    do k updates (1 update per env step on average) in one scan.

    The acting policy that produced `rows` is up to k updates stale; that is the price of one dispatch per k
    environment steps (k small: see `mb2po_jax.behavior.train`). Insert and updates are two compiled calls:
    fused into one, XLA on CPU copied whole [capacity, obs_dim] buffer arrays on every call (30 ms per call
    at 1M rows) although they were donated; apart, the insert is in place and the update only reads.
    """
    del config  # static hyperparameters travel inside SACState
    add = jax.jit(replay_buffer_add, donate_argnums=0)
    learn = jax.jit(sample_and_update, donate_argnums=0, static_argnums=3)

    def online_step(state: SACState, buffer: ReplayBuffer, rows: Batch, key: jax.Array):
        buffer = add(buffer, rows)
        state, metrics = learn(state, buffer, key, rows["rewards"].shape[0])
        return state, buffer, metrics

    return online_step


replay_buffer_add_jit = jax.jit(replay_buffer_add, donate_argnums=0)

"""Offline-to-online fine-tuning (issue 22): AWAC continued in the real environment.

The compiled core is pure and per seed (vmapped over a leading seed axis [S], as everywhere else):

  `OnlineBuffer`   a fixed-capacity, device-resident ring of `Transitions` (write index + fill count; only
                   filled rows are sampled), one per seed.
  `add`            writes one vector step's E transitions of a seed.
  `mixed_batch`    a batch of exactly `online_rows(B, ratio)` rows from the online ring (first) and the rest
                   from the offline dataset; the count may be a traced value, so an annealed ratio stays exact.
  `ratio_at`       the online ratio at an environment step (constant, or annealed linearly from
                   `ratio_start` to `ratio` over `ratio_anneal_steps`).
  `update`         one vector step's learning: add the E transitions, then `utd * E` AWAC updates
                   (`awac.train_steps`) on mixed batches. With `learn=False` (the warm-up) only the add.
  `act`            the exploration action: a sample of the current policy, keyed by (seed's online key,
                   environment step), so it is a pure function of the state and needs no key in the state
                   to advance (what makes a resumed run act exactly as an uninterrupted one).

Model arm (`model=True`): `imagine` rolls the policy out in the seed's ensemble from online states into an
MB2PO model ring once per host call, batches take `model_ratio` of their rows from that ring, and
`refit_models` trains the ensembles on offline + online data every `model_refit_every` environment steps.

The environments are stepped on the host (`EnvBatch`: S x E Gymnasium environments, like `evaluation.py`);
`pipeline.Run.run_online` drives the stage. Environment steps are counted per seed over all of its E
environments (one vector step = E environment steps), and `utd` is AWAC updates per environment step.

Timeouts are not terminals: a transition is stored with done = `terminated`; on a truncation the stored next
observation is the step's true final observation (a single Gymnasium env does not autoreset), then the
environment is reset.

`collapse_figures` computes the policy-collapse measures of `results.json` from a seed's evaluation curve.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mb2po_jax import awac
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """The online stage's settings. Schedule fields (`steps`, `steps_per_call`, `eval_every`,
    `checkpoint_every`) may change between reruns of a workdir; the others define its checkpoints."""

    steps: int = 250_000  # environment steps per seed (over its `envs` environments)
    envs: int = 1  # environments per seed, stepped side by side
    ratio: float = 0.5  # fraction of each AWAC batch from the online buffer (RLPD / balanced replay: 0.5)
    utd: int = 1  # AWAC updates per environment step
    buffer_size: int = 1_000_000  # online ring capacity per seed (transitions)
    warmup_steps: int = 0  # (b) environment steps of the pretrained policy stored before any update
    ratio_start: float = 0.0  # (c) online ratio at step 0 when annealing
    ratio_anneal_steps: int = 0  # (c) steps over which the ratio goes linearly from ratio_start to ratio
    model: bool = False  # MB2PO arm: imagined rollouts from online states, ensemble refits on offline + online
    model_ratio: float = 0.25  # with `model`: fraction of each batch from the model ring
    model_refit_every: int = 10_000  # with `model`: environment steps between ensemble refits
    model_refit_epochs: int = 5  # with `model`: epochs over offline + online data per refit
    steps_per_call: int = 1000  # environment steps per host call (between log lines)
    eval_every: int = 10_000  # environment steps between evaluations
    checkpoint_every: int = 10_000  # environment steps between checkpoints

    def __post_init__(self):
        for name in ("steps", "envs", "utd", "buffer_size", "steps_per_call", "eval_every", "checkpoint_every",
                     "model_refit_every", "model_refit_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ratio_anneal_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("ratio", "ratio_start", "model_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"--{flag(name)} (fraction of each batch from the online buffer) must be in "
                                  f"[0, 1], got {value}")
        for name in ("steps_per_call", "warmup_steps"):
            if getattr(self, name) % self.envs:
                raise ConfigError(f"--{flag(name)}={getattr(self, name)} must be a multiple of "
                                  f"--online_envs={self.envs} (each vector step is one step of every env)")
        if self.model and max(self.ratio, self.ratio_start) + self.model_ratio > 1.0:
            raise ConfigError(f"--online_ratio ({max(self.ratio, self.ratio_start)}) + --model_ratio "
                              f"({self.model_ratio}) must not exceed 1 (the rest of each batch is offline data)")
        for name in ("steps", "eval_every", "checkpoint_every", "model_refit_every"):
            if getattr(self, name) % self.steps_per_call:
                raise ConfigError(f"--{flag(name)}={getattr(self, name)} must be a multiple of "
                                  f"--online_steps_per_call={self.steps_per_call}")

    @property
    def vector_steps_per_call(self) -> int:
        return self.steps_per_call // self.envs


# Flag name -> OnlineConfig field (config.py's table of this section).
FLAGS = {
    "online_steps": "steps", "online_envs": "envs", "online_ratio": "ratio", "utd": "utd",
    "online_buffer_size": "buffer_size", "online_warmup_steps": "warmup_steps",
    "online_ratio_start": "ratio_start", "online_ratio_anneal_steps": "ratio_anneal_steps",
    "online_model": "model", "online_steps_per_call": "steps_per_call", "online_eval_every": "eval_every",
    "online_checkpoint_every": "checkpoint_every", "model_ratio": "model_ratio",
    "model_refit_every": "model_refit_every", "model_refit_epochs": "model_refit_epochs",
}
SCHEDULE = ("steps", "steps_per_call", "eval_every", "checkpoint_every")  # may change between reruns


def flag(field: str) -> str:
    return {v: k for k, v in FLAGS.items()}[field]


# ------------------------------------------------------------------------------------------ the ring
class OnlineBuffer(struct.PyTreeNode):
    """A ring of the last `capacity` online transitions of ONE seed (a leading [S] axis for all seeds)."""

    observations: jax.Array  # [C, o]
    actions: jax.Array  # [C, a], the policy's [-1, 1] scale
    rewards: jax.Array  # [C]
    next_observations: jax.Array  # [C, o]
    terminals: jax.Array  # [C] float32, 1.0 only where the environment terminated
    size: jax.Array  # int32, filled rows (sampled: [0, size))
    index: jax.Array  # int32, the row the next transition goes to

    @property
    def capacity(self) -> int:
        return self.rewards.shape[-1]


def init_buffer(capacity: int, obs_dim: int, act_dim: int) -> OnlineBuffer:
    f32 = jnp.float32
    return OnlineBuffer(observations=jnp.zeros((capacity, obs_dim), f32), actions=jnp.zeros((capacity, act_dim), f32),
                        rewards=jnp.zeros((capacity,), f32), next_observations=jnp.zeros((capacity, obs_dim), f32),
                        terminals=jnp.zeros((capacity,), f32), size=jnp.zeros((), jnp.int32),
                        index=jnp.zeros((), jnp.int32))


def add(buffer: OnlineBuffer, rows: Transitions) -> OnlineBuffer:
    """Writes E transitions ([E, ...] rows) at the write index, wrapping around (pure; donate the buffer)."""
    n, c = rows.rewards.shape[0], buffer.capacity
    pos = (buffer.index + jnp.arange(n, dtype=jnp.int32)) % c
    put = lambda store, x: store.at[pos].set(jnp.asarray(x, store.dtype))
    return buffer.replace(
        observations=put(buffer.observations, rows.observations), actions=put(buffer.actions, rows.actions),
        rewards=put(buffer.rewards, rows.rewards),
        next_observations=put(buffer.next_observations, rows.next_observations),
        terminals=put(buffer.terminals, rows.terminals),
        size=jnp.minimum(buffer.size + n, c), index=(buffer.index + n) % c)


def sample(buffer: OnlineBuffer, key: jax.Array, batch_size: int) -> Transitions:
    """Uniform rows (with replacement) among the filled ones (the zero rows of an empty buffer)."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return Transitions(observations=buffer.observations[idx], actions=buffer.actions[idx],
                       rewards=buffer.rewards[idx], next_observations=buffer.next_observations[idx],
                       terminals=buffer.terminals[idx])


def online_rows(batch_size: int, ratio) -> Any:
    """Rows of a batch from the online buffer: exactly round(ratio * batch_size) (half to even, as Python's
    `round`), a Python int for a Python ratio, an int32 array for a traced one."""
    if isinstance(ratio, (int, float)):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"online ratio must be in [0, 1], got {ratio}")
        return int(round(ratio * batch_size))
    return jnp.round(jnp.asarray(ratio, jnp.float32) * batch_size).astype(jnp.int32)


def mixed_batch(key: jax.Array, dataset: Transitions, buffer: OnlineBuffer, batch_size: int, n_online,
                model_ring=None, n_model: int = 0) -> Transitions:
    """`n_online` rows (int, or a traced int32) from the online ring first, the other rows from the offline
    dataset. Both sources are drawn at full size and selected row by row, so the split is exact whether
    or not the count is known at compile time. With `model_ring` (a `buffer.ModelBuffer`), the first
    `n_model` rows come from it, then the online rows, then the offline ones."""
    k_online, k_offline, k_model = jax.random.split(key, 3)
    online = sample(buffer, k_online, batch_size)
    idx = jax.random.randint(k_offline, (batch_size,), 0, dataset.rewards.shape[0])
    offline = Transitions(observations=dataset.observations[idx], actions=dataset.actions[idx],
                          rewards=dataset.rewards[idx], next_observations=dataset.next_observations[idx],
                          terminals=jnp.asarray(dataset.terminals[idx], jnp.float32))
    take_online = jnp.arange(batch_size) < n_online

    def pick(mask, a, b):
        mask = mask.reshape((batch_size,) + (1,) * (a.ndim - 1))
        return jnp.where(mask, a, jnp.asarray(b, a.dtype))

    if model_ring is None:
        return jax.tree.map(lambda a, b: pick(take_online, a, b), online, offline)
    from mb2po_jax import buffer as buf

    model = buf.sample(model_ring, k_model, batch_size)
    rows = jnp.arange(batch_size)
    batch = jax.tree.map(lambda a, b: pick(rows < n_model + n_online, a, b), online, offline)
    return jax.tree.map(lambda a, b: pick(rows < n_model, a, b), model, batch)


def ratio_at(config: OnlineConfig, env_step) -> Any:
    """The online ratio at `env_step` (a traced int): `ratio`, or annealed linearly from `ratio_start` to
    `ratio` over the first `ratio_anneal_steps` environment steps."""
    if config.ratio_anneal_steps <= 0:
        return jnp.float32(config.ratio)
    frac = jnp.minimum(jnp.asarray(env_step, jnp.float32) / config.ratio_anneal_steps, 1.0)
    return jnp.float32(config.ratio_start) + (config.ratio - config.ratio_start) * frac


# ------------------------------------------------------------------------------------------ the state
class OnlineState(struct.PyTreeNode):
    """One seed's online stage (a leading [S] axis for all seeds)."""

    agent: awac.AWACState
    buffer: OnlineBuffer
    act_key: jax.Array  # raw uint32 key; the action of env step t is keyed by fold_in(act_key, t)
    env_steps: jax.Array  # int32, environment steps taken (over the seed's E environments)
    updates: jax.Array  # int32, AWAC updates done in this stage
    models: Any = None  # with the model arm: the seed's dynamics ensemble (`dynamics.DynamicsState`)
    ring: Any = None  # with the model arm: the seed's model ring (`buffer.ModelBuffer`)


def init_seeds(agents: awac.AWACState, config: OnlineConfig, obs_dim: int, act_dim: int, models=None,
               model_config=None) -> OnlineState:
    """agents [S] (the finished earlier stage's) -> OnlineState [S] with empty rings. With the model arm,
    `models` [S] (the finished dynamics stage's ensembles) and `model_config` (an `MB2POConfig`: horizon,
    penalty, imagined steps per call, ring slots) give each seed its ensemble and an empty model ring."""
    s = agents.step.shape[0]
    tile = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (s,) + x.shape).copy(), tree)
    act_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0x0411))(agents.key)
    ring = None
    if config.model:
        from mb2po_jax import buffer as buf

        if models is None or model_config is None:
            raise ConfigError("online: the model arm needs the dynamics ensembles and the MB2PO settings")
        ring = tile(buf.init_buffer(model_config.buffer_config(obs_dim, act_dim)))
        # Copies: a restored ensemble's params and best_params are the same buffers, which a donating
        # call must not receive twice.
        models = jax.tree.map(jnp.copy, models)
    return OnlineState(agent=agents, buffer=tile(init_buffer(config.buffer_size, obs_dim, act_dim)),
                       act_key=act_keys, env_steps=jnp.zeros((s,), jnp.int32), updates=jnp.zeros((s,), jnp.int32),
                       models=models if config.model else None, ring=ring)


def act(state: OnlineState, obs: jax.Array) -> jax.Array:
    """Exploration actions of one seed for its E observations [E, o] -> [E, a] (policy scale)."""
    return awac.act(state.agent, obs, jax.random.fold_in(state.act_key, state.env_steps))


def update(state: OnlineState, rows: Transitions, dataset: Transitions, *, config: OnlineConfig,
           learn: bool) -> tuple[OnlineState, dict[str, jax.Array]]:
    """One vector step of one seed (pure): store its E transitions, then (if `learn`) `utd * E` AWAC updates
    on batches with exactly `online_rows(B, ratio_at(env step))` online rows. Metrics are the updates'
    means (zeros without updates) and the step's online ratio."""
    e = rows.rewards.shape[0]
    buffer = add(state.buffer, rows)
    ratio = ratio_at(config, state.env_steps)
    agent, num_updates = state.agent, (config.utd * e if learn else 0)
    batch_size = agent.config.batch_size
    n_model = online_rows(batch_size, config.model_ratio) if state.ring is not None else 0
    n_online = jnp.minimum(online_rows(batch_size, ratio), batch_size - n_model)

    def sample_fn(data, key, batch_size):
        return mixed_batch(key, data[0], data[1], batch_size, n_online, state.ring, n_model)

    if num_updates:
        agent, metrics = awac.train_steps(agent, (dataset, buffer), num_updates, sample_fn)
    else:
        shapes = jax.eval_shape(lambda: awac.train_steps(agent, (dataset, buffer), 1, sample_fn)[1])
        metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    metrics = {**metrics, "online_ratio": ratio, "online_rows": jnp.asarray(n_online, jnp.int32)}
    return state.replace(agent=agent, buffer=buffer, env_steps=state.env_steps + e,
                         updates=state.updates + num_updates), metrics


def imagine(state: OnlineState, dataset_observations: jax.Array, penalty_coef: jax.Array, *, model_config,
            termination_fn):
    """The model arm's data for one host call of one seed (pure): `model_config.num_starts` start states
    drawn from the online ring's observations (from D_beta while it is empty), rolled out with the current
    policy in the seed's ensemble (the conservative MDP of MB2PO: rewards penalised with lambda =
    `penalty_coef`, the seed's scalar; predicted terminations), written into the next slot of the model
    ring. Keyed by the environment step."""
    from mb2po_jax import buffer as buf, mb2po, rollout as ro

    key = jax.random.fold_in(jax.random.fold_in(state.act_key, state.env_steps), 0x1A)
    k_online, k_offline, k_roll = jax.random.split(key, 3)
    n = model_config.num_starts
    idx_online = jax.random.randint(k_online, (n,), 0, jnp.maximum(state.buffer.size, 1))
    idx_offline = jax.random.randint(k_offline, (n,), 0, dataset_observations.shape[0])
    start = jnp.where(state.buffer.size > 0, state.buffer.observations[idx_online],
                      dataset_observations[idx_offline])
    batch, valid, metrics = ro.rollout(k_roll, state.agent, state.models, start, policy_fn=mb2po.policy_sample,
                                       termination_fn=termination_fn, config=model_config.rollout_config(),
                                       penalty_coef=penalty_coef)
    ring = buf.add_rollout(state.ring, batch, valid)
    metrics = {f"rollout_{k}": v for k, v in metrics.items()}
    return state.replace(ring=ring), {**metrics, "model_rows": buf.num_valid(ring)}


def make_imagine_fn(model_config, termination_fn):
    """Compiled (state [S], dataset observations, lambda [S]) -> (state [S], metrics [S]); the state is
    donated."""
    fn = lambda state, obs, lam: imagine(state, obs, lam, model_config=model_config, termination_fn=termination_fn)
    return jax.jit(jax.vmap(fn, in_axes=(0, None, 0)), donate_argnums=0)


def refit_models(models, offline: Transitions, online_rows_: Transitions, keys: np.ndarray, epochs: int):
    """The model arm's refit (host orchestration of the compiled dynamics epochs): every seed's ensemble
    [S] trained `epochs` more epochs on D_beta + that seed's online transitions (online_rows_ [S, n]).
    Per seed: a new holdout split and bootstrap sets of the combined data, and the input normaliser
    recomputed on the combined training inputs (the epoch data is standardised with it, so the state's
    normaliser is always the one its parameters were trained with); optimiser state continued; snapshots
    and elites re-ranked on the new holdout; each member's best snapshot restored at the end.
    Returns (models [S], metrics of the last epoch)."""
    from mb2po_jax import dynamics as dyn

    config = models.config
    states, datas = [], []
    offline_in, offline_t = dyn.transitions_to_arrays(offline)
    for s, key in enumerate(keys):
        k_split, k_boot = jax.random.split(jnp.asarray(key, jnp.uint32))
        mine = jax.tree.map(lambda x: np.asarray(x)[s], online_rows_)
        more_in, more_t = dyn.transitions_to_arrays(mine)
        inputs, targets = np.concatenate([offline_in, more_in]), np.concatenate([offline_t, more_t])
        train, holdout = dyn.split_holdout(k_split, inputs, targets, config)
        mean, std = normalizer_stats(train["inputs"])
        one = jax.tree.map(lambda x: x[s], models)
        one = one.replace(input_mean=jnp.asarray(mean), input_std=jnp.asarray(std), best_params=one.params,
                          best_holdout_mse=jnp.full_like(one.best_holdout_mse, jnp.inf),
                          epochs_since_improvement=jnp.zeros_like(one.epochs_since_improvement))
        datas.append(dyn.make_epoch_data(k_boot, one, train, holdout))
        states.append(one)
    stack = lambda *xs: jnp.stack(xs)
    state, data = jax.tree.map(stack, *states), jax.tree.map(stack, *datas)
    epoch_fn = dyn.make_train_epoch_seeds(config)
    epoch_keys = jnp.stack([jax.random.fold_in(jnp.asarray(k, jnp.uint32), 1) for k in keys])
    budget = jnp.full((len(keys),), np.iinfo(np.int32).max, jnp.int32)
    metrics = {}
    for i in range(epochs):
        state, metrics = epoch_fn(state, data, jax.vmap(jax.random.fold_in, in_axes=(0, None))(epoch_keys, i),
                                  budget)
    return jax.tree.map(jnp.copy, dyn.restore_best(state)), metrics  # distinct buffers (donated later)


def normalizer_stats(train_inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dynamics input normaliser of raw inputs [N, o + a], as `dynamics.init_dynamics` computes it."""
    x = jnp.asarray(train_inputs, jnp.float32)
    mean, std = jnp.mean(x, axis=0), jnp.std(x, axis=0)
    return np.asarray(mean), np.asarray(jnp.where(std < 1e-6, 1.0, std))


def make_act_fn():
    """Compiled (state [S], obs [S, E, o]) -> actions [S, E, a]."""
    return jax.jit(jax.vmap(act))


def make_update_fn(config: OnlineConfig, learn: bool):
    """Compiled (state [S], rows [S, E], dataset) -> (state [S], metrics [S]); the state is donated."""
    fn = lambda state, rows, dataset: update(state, rows, dataset, config=config, learn=learn)
    return jax.jit(jax.vmap(fn, in_axes=(0, 0, None)), donate_argnums=0)


# ------------------------------------------------------------------------------------ policy collapse
def collapse_figures(steps: Sequence[int], scores: Sequence[float], total_steps: int) -> dict[str, Any]:
    """Policy-collapse measures of ONE seed's evaluation curve (normalised scores at environment steps,
    the first at step 0):
      start_score      the score at step 0,
      collapse_depth   start score minus the lowest score evaluated in (0, 10 % of total_steps]; 0 if none
                       is lower; None if nothing was evaluated there (not measured, not "no collapse"),
      steps_to_recover the first evaluated step whose score exceeds the start score, after the collapse's
                       lowest point when there was a collapse (a seed that rose, then fell below its start
                       for good, has not recovered); None if none does."""
    pairs = sorted(zip((int(s) for s in steps), (float(x) for x in scores)))
    if not pairs or pairs[0][0] != 0:
        raise ValueError("collapse_figures: the curve needs its evaluation at step 0")
    start = pairs[0][1]
    early = [(x, s) for s, x in pairs[1:] if s <= 0.1 * total_steps]
    depth, low_step = None, 0
    if early:
        low, at = min(early)  # the lowest score, the earliest of equal ones
        depth = max(0.0, start - low)
        low_step = at if depth > 0 else 0
    recover = next((s for s, x in pairs[1:] if s > low_step and x > start), None)
    return {"start_score": start, "collapse_depth": depth, "steps_to_recover": recover}


# ------------------------------------------------------------------------------------ host environments
def reset_seed(seed: int, seed_index: int, env_index: int, episode: int) -> int:
    """The reset seed of episode `episode` of environment `env_index` of training seed `seed_index`."""
    return int(np.random.SeedSequence([seed, 22, seed_index, env_index, episode]).generate_state(1)[0])


def _mujoco(env):
    """(model, data) of a MuJoCo environment, else None."""
    base = getattr(env, "unwrapped", env)
    model, data = getattr(base, "model", None), getattr(base, "data", None)
    if model is None or data is None or type(model).__module__.split(".")[0] != "mujoco":
        return None
    return model, data


def _time_limit(env):
    import gymnasium as gym

    while env is not None:
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = getattr(env, "env", None)
    return None


class EnvBatch:
    """S x E host environments: seed s acts in its own E environments. Keeps each one's current
    observation, episode return/length and episode counter, resets with `reset_seed` at episode ends, and
    snapshots/restores everything (MuJoCo's full integration state included) as JSON for checkpoints."""

    def __init__(self, make_fn: Callable[[], Any], num_seeds: int, num_envs: int, seed: int):
        self.S, self.E, self.seed = num_seeds, num_envs, seed
        self.envs = [[make_fn() for _ in range(num_envs)] for _ in range(num_seeds)]
        space = self.envs[0][0].observation_space
        self.obs = np.zeros((num_seeds, num_envs, *space.shape), np.float32)
        self.episode = np.zeros((num_seeds, num_envs), np.int64)  # episodes started
        self.ep_return = np.zeros((num_seeds, num_envs), np.float64)
        self.ep_length = np.zeros((num_seeds, num_envs), np.int64)
        self.last_return = np.zeros(num_seeds, np.float64)  # mean return of the seed's last finished episodes
        self.episodes_done = np.zeros(num_seeds, np.int64)
        self.terminated_episodes = np.zeros(num_seeds, np.int64)
        for s in range(num_seeds):
            for e in range(num_envs):
                self._reset(s, e)

    def _reset(self, s: int, e: int) -> None:
        self.obs[s, e], _ = self.envs[s][e].reset(seed=reset_seed(self.seed, s, e, int(self.episode[s, e])))
        self.episode[s, e] += 1
        self.ep_return[s, e], self.ep_length[s, e] = 0.0, 0

    def step(self, actions: np.ndarray) -> Transitions:
        """Steps every environment with actions [S, E, a] (the env's scale, clipped to its bounds); returns
        the [S, E] transitions (s, a as given, r, s', done = terminated) and resets finished episodes."""
        obs = self.obs.copy()
        next_obs = np.zeros_like(obs)
        rewards = np.zeros((self.S, self.E), np.float32)
        terminals = np.zeros((self.S, self.E), np.float32)
        for s in range(self.S):
            finished = []
            for e in range(self.E):
                env = self.envs[s][e]
                a = np.clip(actions[s, e], env.action_space.low, env.action_space.high).astype(env.action_space.dtype)
                o, r, terminated, truncated, _ = env.step(a)
                next_obs[s, e], rewards[s, e], terminals[s, e] = o, r, float(terminated)
                self.ep_return[s, e] += float(r)
                self.ep_length[s, e] += 1
                self.obs[s, e] = o
                if terminated or truncated:  # the true final observation is stored; then a new episode
                    finished.append(self.ep_return[s, e])
                    self.terminated_episodes[s] += bool(terminated)
                    self._reset(s, e)
            if finished:
                self.last_return[s] = float(np.mean(finished))
                self.episodes_done[s] += len(finished)
        return Transitions(observations=obs, actions=np.asarray(actions, np.float32), rewards=rewards,
                           next_observations=next_obs, terminals=terminals)

    def snapshot(self) -> dict:
        """Everything needed to continue exactly, as plain JSON (floats round-trip exactly); `sim` is None
        for environments whose simulator state cannot be read (then `restore` restarts their episodes)."""
        sims = []
        for s in range(self.S):
            for e in range(self.E):
                env, mj = self.envs[s][e], _mujoco(self.envs[s][e])
                limit = _time_limit(env)
                if mj is None:
                    sims.append(None)
                    continue
                import mujoco

                model, data = mj
                spec = mujoco.mjtState.mjSTATE_INTEGRATION
                state = np.zeros(mujoco.mj_stateSize(model, spec), np.float64)
                mujoco.mj_getState(model, data, state, spec)
                sims.append({"state": state.tolist(),
                             "elapsed": None if limit is None else int(limit._elapsed_steps or 0)})
        return {"obs": self.obs.astype(np.float64).tolist(), "episode": self.episode.tolist(),
                "ep_return": self.ep_return.tolist(), "ep_length": self.ep_length.tolist(),
                "last_return": self.last_return.tolist(), "episodes_done": self.episodes_done.tolist(),
                "terminated_episodes": self.terminated_episodes.tolist(), "sim": sims}

    def restore(self, snap: dict) -> bool:
        """Continues from `snapshot()`'s output: returns True if every environment's episode continues
        exactly, False if the episodes were restarted (new episodes, the counters kept)."""
        self.episode[:] = np.asarray(snap["episode"], np.int64)
        self.last_return[:] = np.asarray(snap["last_return"], np.float64)
        self.episodes_done[:] = np.asarray(snap["episodes_done"], np.int64)
        self.terminated_episodes[:] = np.asarray(snap["terminated_episodes"], np.int64)
        sims = snap.get("sim") or [None] * (self.S * self.E)
        exact = all(x is not None for x in sims)
        if not exact:  # restart every episode cleanly (new reset seeds: the episode counters go on)
            for s in range(self.S):
                for e in range(self.E):
                    self._reset(s, e)
            return False
        import mujoco

        for i, sim in enumerate(sims):
            s, e = divmod(i, self.E)
            env = self.envs[s][e]
            env.reset(seed=0)  # wrappers' bookkeeping (order enforcing); the state is overwritten below
            model, data = _mujoco(env)
            mujoco.mj_setState(model, data, np.asarray(sim["state"], np.float64),
                               mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(model, data)
            limit = _time_limit(env)
            if limit is not None and sim["elapsed"] is not None:
                limit._elapsed_steps = sim["elapsed"]
        self.obs[:] = np.asarray(snap["obs"], np.float32)
        self.ep_return[:] = np.asarray(snap["ep_return"], np.float64)
        self.ep_length[:] = np.asarray(snap["ep_length"], np.int64)
        return True

    def close(self) -> None:
        for row in self.envs:
            for env in row:
                env.close()

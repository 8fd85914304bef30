"""MB2PO (paper section 4.3, Algorithm 1): AWAC fine-tuning inside the conservative model MDP.

One iteration k, for every seed at once, as ONE compiled call:
  1. sample `num_starts` start states s_1 from D_beta; roll the current policy out for h steps in the
     ensemble (a uniformly drawn member per trajectory and step, penalised reward r - lambda * u(s, a),
     trajectories stop at predicted termination)                                    -> rollout.rollout
  2. the iteration's valid transitions become D_k, slot k % n of the model ring    -> buffer.add_rollout
  3. `updates_per_iteration` AWAC steps on batches of exactly round(omega * B) rows of D_beta and the rest
     uniformly from the last n iterations' valid rows                              -> buffer.mixed_batch

The state is (AWAC state, model ring, iteration counter), every leaf with a leading seed axis [S]; the
dynamics ensembles ([S] too: each seed fine-tunes in its own model) and the dataset are inputs, not state.
The AWAC state carries its own PRNG key, so iteration k depends only on the state after iteration k - 1:
N calls of one iteration equal any other split of the same N iterations (what makes resume exact).

Devices (`sharding`): several seeds are split over a seed mesh by their leading axis (nothing mixes seeds).
One seed on several devices uses a batch mesh: the rollout's trajectories (constrained where the policy
sees them, inside the rollout's chunk loop), the ring's rows and the AWAC minibatch rows are split over
the devices, parameters replicated; the random draws are the same as on one device.

On a CPU with one seed or an odd number (`sharding.cpu_layout`, `mb2po-train --cpu_devices`), the
iteration is instead two compiled calls: `imagine` (step 1) with its trajectories split over 2 XLA host
devices, which overlap one another's small ops on the cores, then `learn` (steps 2 and 3) on the first
device, where everything else lives (data-parallel AWAC updates are slower there). Same numbers as the one
call in the same process, bit for bit; a one-device process rounds the last float bits differently
(XLA:CPU splits its threads otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mb2po_jax import awac, buffer as buf, dynamics as dyn, rollout as ro, sharding
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import TerminationFn


@dataclasses.dataclass(frozen=True)
class MB2POConfig:
    """Defaults are the paper's (section 5 and Algorithm 1); h and lambda are per task (MOPO's table,
    `mb2po_jax/configs/tasks.json`), omega = 0.05 as the earlier version of the paper and MOPO (SPEC section 1)."""

    iterations: int = 500
    imagined_steps: int = 1_000_000  # per iteration: horizon * num_starts (rounded down to a multiple)
    updates_per_iteration: int = 1000
    num_slots: int = 100  # n: iterations kept in the model ring
    omega: float = 0.05  # fraction of every AWAC batch drawn from D_beta
    horizon: int = 5
    penalty_coef: float = 1.0  # lambda
    penalty: str = "max_std"
    rollout_members: str = "all"  # the paper draws from and penalises over all N members; "elites": MOPO
    buffer_dtype: str = "float32"
    chunk_size: int | None = None  # None: rollout.default_chunk_size() for the backend

    def __post_init__(self):
        for name in ("iterations", "imagined_steps", "updates_per_iteration", "num_slots", "horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mb2po: {name} must be >= 1, got {getattr(self, name)}")
        if self.imagined_steps < self.horizon:
            raise ConfigError(
                f"mb2po: imagined_steps={self.imagined_steps} is less than one trajectory of "
                f"horizon={self.horizon}"
            )
        if not 0.0 <= self.omega <= 1.0:
            raise ConfigError(f"mb2po: omega (fraction of real data per batch) must be in [0, 1], got {self.omega}")
        if not (math.isfinite(self.penalty_coef) and self.penalty_coef >= 0):  # NaN fails too
            raise ConfigError(f"--penalty_coef must be a number >= 0 (a negative lambda would reward the "
                              f"models' uncertainty), got {self.penalty_coef}")
        self.rollout_config()  # validates penalty, chunk size
        buf.BufferConfig(1, 1, dtype=self.buffer_dtype)  # validates dtype

    @property
    def num_starts(self) -> int:
        return self.imagined_steps // self.horizon

    @property
    def rows_per_slot(self) -> int:
        return self.num_starts * self.horizon

    def rollout_config(self) -> ro.RolloutConfig:
        return ro.RolloutConfig(horizon=self.horizon, penalty_coef=self.penalty_coef, penalty=self.penalty,
                                members=self.rollout_members, chunk_size=self.chunk_size)

    def buffer_config(self, obs_dim: int, act_dim: int) -> buf.BufferConfig:
        return buf.BufferConfig(obs_dim, act_dim, num_slots=self.num_slots, rows_per_slot=self.rows_per_slot,
                                dtype=self.buffer_dtype)


class MB2POState(struct.PyTreeNode):
    agent: awac.AWACState
    buffer: buf.ModelBuffer
    iteration: jax.Array  # int32, iterations done


def init(agent: awac.AWACState, config: MB2POConfig, obs_dim: int, act_dim: int) -> MB2POState:
    """MB2PO state for ONE seed from its pretrained AWAC state, with an empty ring."""
    return MB2POState(agent=agent, buffer=buf.init_buffer(config.buffer_config(obs_dim, act_dim)),
                      iteration=jnp.zeros((), jnp.int32))


def init_seeds(agents: awac.AWACState, config: MB2POConfig, obs_dim: int, act_dim: int) -> MB2POState:
    """agents [S] -> MB2POState [S]; each seed gets its own empty ring (its own rollouts)."""
    empty = buf.init_buffer(config.buffer_config(obs_dim, act_dim))
    s = agents.step.shape[0]
    return MB2POState(agent=agents,
                      buffer=jax.tree.map(lambda x: jnp.broadcast_to(x, (s,) + x.shape).copy(), empty),
                      iteration=jnp.zeros((s,), jnp.int32))


def init_sharded(agents: awac.AWACState, config: MB2POConfig, obs_dim: int, act_dim: int,
                 mesh: Mesh | None) -> MB2POState:
    """`init_seeds` built directly in its layout on `mesh` (`state_shardings`): each device allocates only
    its part of the rings (on several processes, only this process's shards are made)."""
    build = lambda a: init_seeds(a, config, obs_dim, act_dim)
    if mesh is None:
        return build(agents)
    return jax.jit(build, out_shardings=state_shardings(jax.eval_shape(build, agents), mesh))(agents)


def state_shardings(state: MB2POState, mesh: Mesh):
    """Shardings of an MB2POState [S] on `mesh`: seed mesh: every leaf split along seeds; batch mesh: the
    ring's rows ([S, slots, R, ...], axis 2) split, everything else replicated."""
    # ndim 0 asks `split_axis_sharding` for "seeds split on a seed mesh, replicated on a batch mesh".
    return MB2POState(
        agent=jax.tree.map(lambda _: sharding.split_axis_sharding(0, mesh, 0), state.agent),
        buffer=jax.tree.map(lambda x: sharding.split_axis_sharding(len(x.shape), mesh, 2), state.buffer),
        iteration=sharding.split_axis_sharding(0, mesh, 0),
    )


def policy_sample(agent: awac.AWACState, key: jax.Array, obs: jax.Array) -> jax.Array:
    """The rollout's behaviour: a sample of the current AWAC policy (Algorithm 1: a_j ~ pi(s_j))."""
    return awac.act(agent, obs, key)


def imagine(
    agent: awac.AWACState,
    dyn_state: dyn.DynamicsState,
    observations: jax.Array,
    *,
    config: MB2POConfig,
    termination_fn: TerminationFn,
    mesh: Mesh | None = None,
) -> tuple[ro.RolloutBatch, dict[str, jax.Array]]:
    """Step 1 of an iteration for one seed (pure): start states from D_beta's `observations`, the rollout
    of the current policy. Reads the agent's key without advancing it (`learn` advances it)."""
    _, k_collect = jax.random.split(agent.key)
    policy = sharding.split_policy_rows(policy_sample, mesh)  # a rollout chunk's trajectories split
    return buf.rollout_from_dataset(k_collect, agent, dyn_state, observations, policy_fn=policy,
                                    termination_fn=termination_fn, rollout_config=config.rollout_config(),
                                    num_starts=config.num_starts)


def learn(
    state: MB2POState,
    batch: ro.RolloutBatch,
    rollout_metrics: dict[str, jax.Array],
    dataset: awac.Batch,
    *,
    config: MB2POConfig,
    mesh: Mesh | None = None,
) -> tuple[MB2POState, dict[str, jax.Array]]:
    """Steps 2 and 3 for one seed (pure): `imagine`'s batch into the ring, then the AWAC updates."""
    rows = lambda x, axis=0: sharding.constrain_rows(x, mesh, axis)
    key, _ = jax.random.split(state.agent.key)  # the split `imagine` made
    agent = state.agent.replace(key=key)
    ring = rows(buf.add_rollout(state.buffer, batch), 1)  # storage [slots, R, ...]: rows split

    def mixed(data, key, batch_size):  # Algorithm 1: omega from D_beta, the rest from {D_k-i}
        return awac.Batch.from_mapping(rows(buf.mixed_batch(key, data[0], data[1], batch_size, config.omega)))

    agent, train_metrics = awac.train_steps(agent, (dataset, ring), config.updates_per_iteration, mixed)
    metrics = {**train_metrics,
               **{f"rollout_{k}": v for k, v in rollout_metrics.items()},
               "buffer_rows": buf.num_valid(ring)}
    return MB2POState(agent=agent, buffer=ring, iteration=state.iteration + 1), metrics


def iteration(
    state: MB2POState,
    dyn_state: dyn.DynamicsState,
    dataset: awac.Batch,
    *,
    config: MB2POConfig,
    termination_fn: TerminationFn,
    mesh: Mesh | None = None,
) -> tuple[MB2POState, dict[str, jax.Array]]:
    """One MB2PO iteration for one seed (pure): `imagine` then `learn`. dataset: D_beta on the device
    (policy action scale). mesh: a batch mesh splits the trajectories, ring rows and minibatch rows over
    its devices (same numbers up to reduction order); None or a seed mesh changes nothing here."""
    batch, rollout_metrics = imagine(state.agent, dyn_state, dataset.observations, config=config,
                                     termination_fn=termination_fn, mesh=mesh)
    return learn(state, batch, rollout_metrics, dataset, config=config, mesh=mesh)


@functools.lru_cache(maxsize=8)  # one compilation per (config, rule, mesh) in a process (resumes, tests)
def make_iteration_fn(config: MB2POConfig, termination_fn: TerminationFn, mesh: Mesh | None = None,
                      rollout_mesh: Mesh | None = None):
    """Compiled `(state [S], dyn_state [S], dataset) -> (state [S], metrics [S])`: one iteration for every
    seed. The state is donated (the ring is updated in place); do not reuse the argument. With a batch
    mesh, place the state with `state_shardings` (or build it with `init_sharded`).

    rollout_mesh (CPU host devices, `sharding.cpu_layout`; `mesh` must be None): the iteration is two
    compiled calls, `imagine` with its trajectories split over this batch mesh, then `learn` on its first
    device, where the state, models and dataset live. The numbers are those of the one-call iteration."""

    def one_seed(state, dyn_state, dataset):
        return iteration(state, dyn_state, dataset, config=config, termination_fn=termination_fn, mesh=mesh)

    if rollout_mesh is None:
        return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None)), donate_argnums=0)
    if mesh is not None:
        raise ConfigError("mb2po: a rollout mesh runs everything but the rollout on one device; mesh must be None")
    imagine_fn = jax.jit(jax.vmap(functools.partial(imagine, config=config, termination_fn=termination_fn,
                                                    mesh=rollout_mesh), in_axes=(0, 0, None)))
    everywhere = NamedSharding(rollout_mesh, PartitionSpec())
    home = sharding.first_device_sharding(rollout_mesh)
    learn_fn = jax.jit(jax.vmap(functools.partial(learn, config=config), in_axes=(0, 0, 0, None)),
                       in_shardings=home, out_shardings=home, donate_argnums=0)  # one layout: no recompile

    def fn(state, dyn_state, dataset):
        on_mesh = jax.device_put((state.agent, dyn_state, dataset.observations), everywhere)  # device copies
        batch, rollout_metrics = jax.device_put(imagine_fn(*on_mesh), home)
        return learn_fn(state, batch, rollout_metrics, dataset)

    return fn


def state_bytes(config: MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int) -> int:
    """Device bytes of the model rings of all seeds (the dominant part of the MB2PO state)."""
    return num_seeds * buf.buffer_bytes(config.buffer_config(obs_dim, act_dim))


def rollout_bytes(config: MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int) -> int:
    """Peak bytes of one iteration's rollout output before compaction into the ring (all seeds, float32)."""
    floats_per_row = 2 * obs_dim + act_dim + 3
    return num_seeds * config.rows_per_slot * (floats_per_row * 4 + 2)


def check_fits(config: MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int,
               available_bytes: int | None, headroom: float = 0.8, share: float = 1.0) -> tuple[int, int]:
    """(ring bytes, rollout bytes) of all seeds; raises ConfigError, with what to change, if the `share` of
    them that lands in the memory `available_bytes` measures (1 / devices when a mesh splits the rings
    over devices with their own memory) cannot fit."""
    ring = state_bytes(config, obs_dim, act_dim, num_seeds)
    peak = rollout_bytes(config, obs_dim, act_dim, num_seeds)
    if available_bytes is not None and share * (ring + peak) > headroom * available_bytes:
        where = "" if share == 1.0 else f", of which {share:.3g} on one device"
        raise ConfigError(
            f"mb2po: the model rings need {ring / 2**30:.2f} GiB ({num_seeds} seed(s) x {config.num_slots} "
            f"iterations x {config.rows_per_slot:,} rows, obs_dim={obs_dim}, act_dim={act_dim}, "
            f"{config.buffer_dtype}) plus {peak / 2**30:.2f} GiB for one iteration's rollout{where}, but only "
            f"{headroom * available_bytes / 2**30:.2f} GiB of {available_bytes / 2**30:.2f} GiB may be used: "
            "lower --num_slots or --imagined_steps, use --buffer_dtype=bfloat16, or train fewer seeds"
        )
    return ring, peak


def available_device_bytes() -> int | None:
    """Free memory of this process's first device: accelerator stats when the backend has them, else host
    RAM."""
    device = jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


"""Device layouts of the MB2PO stage, at the edge of the algorithm: `mb2po.iteration` is written for one
seed on one device; this module compiles it for every seed of a run and for the run's devices, and says
how much memory that needs.

- One device, or a seed mesh (several seeds split over devices by their leading axis): one compiled,
  seed-vmapped call; XLA partitions it from the input shardings (`state_shardings`), and nothing in an
  iteration mixes seeds.
- A batch mesh (one seed on several devices): the same call, with the policy's observations and actions
  (inside the rollout's chunk loop, the one place the trajectory axis is visible), the ring's rows and the
  AWAC minibatch rows split over the devices (`sharding.split_policy_rows`, `sharding.constrain_rows`),
  passed to `mb2po.iteration` as its `policy_fn` and `split_rows`; parameters stay replicated. The random
  draws are the same as on one device.
- The CPU rollout mesh (`sharding.cpu_layout`, `mb2po-train --cpu_devices`: one seed or an odd number on
  a CPU): two compiled calls, `mb2po.imagine` with its trajectories split over 2 XLA host devices, which
  overlap one another's small ops on the cores, then `mb2po.learn` on the first device, where everything
  else lives. Same numbers as the one call in the same process, bit for bit.

Memory: the model rings dominate (`ring_bytes`), plus one iteration's rollout output before it is
compacted into the ring (`rollout_bytes`); `check_fits` refuses a run that cannot fit before anything is
allocated, and `init_sharded` builds the rings directly in their layout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mb2po_jax import awac, mb2po, sharding
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import TerminationFn


@functools.lru_cache(maxsize=8)  # one compilation per (config, rule, mesh) in a process (resumes, tests)
def make_iteration_fn(config: mb2po.MB2POConfig, termination_fn: TerminationFn, mesh: Mesh | None = None,
                      rollout_mesh: Mesh | None = None):
    """Compiled `(state [S], dyn_state [S], dataset, penalty_coef [S]) -> (state [S], metrics [S])`: one
    iteration for every seed, each with its own lambda (`penalty_coefs(config, S)` for the config's). The
    state is donated (the ring is updated in place); do not reuse the argument. With a batch mesh, place
    the state with `state_shardings` (or build it with `init_sharded`).

    rollout_mesh (CPU host devices; `mesh` must be None): the iteration is two compiled calls, `imagine`
    with its trajectories split over this batch mesh, then `learn` on its first device, where the state,
    models and dataset live."""
    if rollout_mesh is None:
        one_seed = functools.partial(
            mb2po.iteration, config=config, termination_fn=termination_fn,
            policy_fn=sharding.split_policy_rows(mb2po.policy_sample, mesh),
            split_rows=lambda tree, axis=0: sharding.constrain_rows(tree, mesh, axis))
        return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, 0)), donate_argnums=0)
    if mesh is not None:
        raise ConfigError("mb2po: a rollout mesh runs everything but the rollout on one device; mesh must be None")
    imagine = functools.partial(mb2po.imagine, config=config, termination_fn=termination_fn,
                                policy_fn=sharding.split_policy_rows(mb2po.policy_sample, rollout_mesh))
    imagine_fn = jax.jit(jax.vmap(imagine, in_axes=(0, 0, None, 0)))
    everywhere = NamedSharding(rollout_mesh, PartitionSpec())
    home = sharding.first_device_sharding(rollout_mesh)
    learn_fn = jax.jit(jax.vmap(functools.partial(mb2po.learn, config=config), in_axes=(0, 0, None)),
                       in_shardings=home, out_shardings=home, donate_argnums=0)  # one layout: no recompile

    def fn(state, dyn_state, dataset, penalty_coef):
        on_mesh = jax.device_put((state.agent, dyn_state, dataset.observations, penalty_coef),
                                 everywhere)  # device copies
        imagined = jax.device_put(imagine_fn(*on_mesh), home)
        return learn_fn(state, imagined, dataset)

    return fn


def penalty_coefs(config: mb2po.MB2POConfig, num_seeds: int) -> jax.Array:
    """[S] lambda: the config's for every seed (the uncapped one; a run's are `Run.penalty_coefs`')."""
    return jnp.full((num_seeds,), config.penalty_coef, jnp.float32)


def state_shardings(state: mb2po.MB2POState, mesh: Mesh):
    """Shardings of an MB2POState [S] on `mesh`: seed mesh: every leaf split along seeds; batch mesh: the
    ring's rows ([S, slots, R, ...], axis 2) split, everything else replicated."""
    # ndim 0 asks `split_axis_sharding` for "seeds split on a seed mesh, replicated on a batch mesh".
    return mb2po.MB2POState(
        agent=jax.tree.map(lambda _: sharding.split_axis_sharding(0, mesh, 0), state.agent),
        buffer=jax.tree.map(lambda x: sharding.split_axis_sharding(len(x.shape), mesh, 2), state.buffer),
        iteration=sharding.split_axis_sharding(0, mesh, 0),
    )


def init_sharded(agents: awac.AWACState, config: mb2po.MB2POConfig, obs_dim: int, act_dim: int,
                 mesh: Mesh | None) -> mb2po.MB2POState:
    """`mb2po.init_seeds` built directly in its layout on `mesh` (`state_shardings`): each device allocates
    only its part of the rings (on several processes, only this process's shards are made)."""
    build = lambda a: mb2po.init_seeds(a, config, obs_dim, act_dim)
    if mesh is None:
        return build(agents)
    return jax.jit(build, out_shardings=state_shardings(jax.eval_shape(build, agents), mesh))(agents)


# ------------------------------------------------------------------------------------------ memory
def ring_bytes(config: mb2po.MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int = 1) -> int:
    """Device bytes of the model rings of `num_seeds` seeds (storage plus counters)."""
    ring = config.buffer_config(obs_dim, act_dim)
    item = np.dtype(jnp.bfloat16 if ring.dtype == "bfloat16" else np.float32).itemsize
    per_row = (2 * obs_dim + act_dim + 1) * item + 1  # + bool terminal
    return num_seeds * (ring.num_slots * ring.rows_per_slot * per_row + 4 * ring.num_slots + 8)


def rollout_bytes(config: mb2po.MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int) -> int:
    """Peak bytes of one iteration's rollout output before compaction into the ring (all seeds, float32)."""
    floats_per_row = 2 * obs_dim + act_dim + 3
    return num_seeds * config.rows_per_slot * (floats_per_row * 4 + 2)


def check_fits(config: mb2po.MB2POConfig, obs_dim: int, act_dim: int, num_seeds: int,
               available_bytes: int | None, headroom: float = 0.8, share: float = 1.0) -> tuple[int, int]:
    """(ring bytes, rollout bytes) of all seeds; raises ConfigError, with what to change, if the `share` of
    them that lands in the memory `available_bytes` measures (1 / devices when a mesh splits the rings
    over devices with their own memory) cannot fit."""
    ring = ring_bytes(config, obs_dim, act_dim, num_seeds)
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


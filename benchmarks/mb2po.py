"""Seconds per full MB2PO iteration (`parallel.make_iteration_fn`): one rollout of `imagined_steps` imagined
steps into the model ring, then `updates_per_iteration` AWAC updates on omega-mixed batches, for every seed,
as the pipeline runs it (one compiled call; on a CPU, 2 host devices: the seeds split over them, or for
one seed the rollout split over them and then the updates, `--cpu_devices`). Paper size: 1M steps + 1000
updates.

Random-init networks (speed does not depend on the weights); the real AWAC policy (5-component tanh-GMM)
acts in the rollout. The ring has `num_slots` slots (default 2: sampling cost does not depend on the ring
length, only its memory does; the paper's 100 slots of 1M rows is 10 GB for hopper). FLOPs: the rollout's
per-step matmuls (evaluated members + the GMM actor's forward) plus `benchmarks.awac.update_flops` per update.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.awac import update_flops
from benchmarks.common import (bench_cpu_layout, bench_mesh, block, dense_flops, environment, matmul_flops_per_s,
                               time_call)
from benchmarks.rollout import random_dynamics_state
from mb2po_jax import awac, dynamics as dyn, mb2po, parallel, sharding
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import hopper_termination

# The paper's protocol: 500 iterations of 1M imagined steps + 1000 AWAC updates.
PAPER_ITERATIONS, PAPER_IMAGINED_STEPS, PAPER_UPDATES = 500, 1_000_000, 1000


def projected_paper_protocol_hours(seconds_per_iteration: float, imagined_steps: int, updates_per_iteration: int,
                                   rollout_fraction: float) -> float:
    """Hours of the paper protocol (PAPER_ITERATIONS iterations at paper size) from one iteration timed at
    `imagined_steps` + `updates_per_iteration`: the rollout's share of the time (`rollout_fraction`, the
    FLOP estimate) scaled by PAPER_IMAGINED_STEPS / imagined_steps, the updates' by PAPER_UPDATES /
    updates_per_iteration (a part of size 0 adds nothing). At paper size the scale is 1; at `mb2po-bench
    all --quick`'s sizes (100k steps + 100 updates) it is 10."""
    scale = 0.0
    if imagined_steps > 0:
        scale += rollout_fraction * PAPER_IMAGINED_STEPS / imagined_steps
    if updates_per_iteration > 0:
        scale += (1.0 - rollout_fraction) * PAPER_UPDATES / updates_per_iteration
    return PAPER_ITERATIONS * seconds_per_iteration * scale / 3600.0


def run(
    obs_dim: int = 11,
    act_dim: int = 3,
    imagined_steps: int = 1_000_000,
    updates_per_iteration: int = 1000,
    horizon: int = 5,
    num_slots: int = 2,
    num_seeds: int = 1,
    num_members: int = 7,
    num_elites: int = 5,
    members: str = "elites",
    dataset_size: int = 100_000,
    repeats: int = 2,
    min_time: float = 0.0,
    devices: int = 1,
    cpu_devices: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """One full MB2PO iteration, timed best-of `repeats` calls after a compile-and-warm-up call.
    `devices` > 1: the pipeline's mesh over that many devices (`sharding.run_mesh`: one seed on a batch
    mesh, several seeds split over a seed mesh); the reference rate is then the devices' aggregate.
    `cpu_devices` > 1: that many CPU host devices as `mb2po-train --cpu_devices` uses them (seeds split
    over them when they divide, else the rollout split and the rest on the first); 0 (default): the run's
    default, 2 on a CPU with 2+ cores when `devices` is 1, else none. `members`: whom rollouts draw from and
    penalise over, "elites" (MOPO's 5 of 7: the rollout benchmark's default and the setting every recorded
    figure ran) or "all" (`mb2po-train`'s default, the paper's; give `--num_members 5` for its ensemble)."""
    if devices > 1 and cpu_devices > 1:
        raise ConfigError("--devices and --cpu_devices: give one of them")
    # First: on CPU these set the host device count.
    if devices > 1:
        mesh, rollout_mesh = bench_mesh(devices, num_seeds), None
    else:
        mesh, rollout_mesh = bench_cpu_layout(num_seeds, cpu_devices)
    dcfg = dyn.DynamicsConfig(num_members=num_members, num_elites=num_elites)
    mcfg = mb2po.MB2POConfig(imagined_steps=imagined_steps, updates_per_iteration=updates_per_iteration,
                             horizon=horizon, num_slots=num_slots, rollout_members=members)
    acfg = awac.AWACConfig()
    k_dyn, k_agent, k_data = jax.random.split(jax.random.PRNGKey(seed), 3)
    models = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,) + x.shape),
                          random_dynamics_state(k_dyn, obs_dim, act_dim, dcfg).replace(opt_state=None,
                                                                                        best_params=None))
    obs = jax.random.normal(k_data, (dataset_size, obs_dim), jnp.float32)
    obs = obs.at[:, 0].set(1.25)  # a healthy hopper height, so trajectories do not all stop at once
    data = Transitions(observations=obs, actions=jnp.tanh(obs[:, :act_dim]), rewards=obs[:, 1],
                       next_observations=obs, terminals=jnp.zeros((dataset_size,)))
    agents = awac.init_seeds(jax.random.split(k_agent, num_seeds), obs_dim, act_dim, acfg)
    state = parallel.init_sharded(agents, mcfg, obs_dim, act_dim, mesh)
    models, data = sharding.shard_seeds(models, mesh), sharding.replicate(data, mesh)
    step = parallel.make_iteration_fn(mcfg, hopper_termination, mesh, rollout_mesh)
    lam = sharding.shard_seeds(parallel.penalty_coefs(mcfg, num_seeds), mesh)

    holder = [state]

    def call():
        holder[0], metrics = step(holder[0], models, data, lam)  # the state is donated: carry it forward
        return metrics

    t0 = time.perf_counter()
    block(call())
    compile_and_first_s = time.perf_counter() - t0
    # The higher of the run mesh's rate and the rollout mesh's aggregate, before and after.
    meshes = [mesh] if rollout_mesh is None else [mesh, rollout_mesh]
    reference = lambda: max(matmul_flops_per_s(mesh=m) for m in meshes)
    peak = reference()
    seconds = time_call(call, min_time=min_time, min_repeats=repeats)
    peak = max(peak, reference())

    sizes = dyn.layer_sizes(dcfg, obs_dim, act_dim)
    k = acfg.num_components
    actor = [obs_dim, *acfg.actor_hidden_dims, k + 2 * k * act_dim]
    evaluated = num_members if members == "all" else num_elites  # max_std: over the members drawn from
    rollout_flops = mcfg.rows_per_slot * (evaluated * dense_flops(1, sizes) + dense_flops(1, actor))
    train_flops = updates_per_iteration * sum(update_flops(obs_dim, act_dim, acfg).values())
    flops = num_seeds * (rollout_flops + train_flops)
    rollout_fraction = rollout_flops / (rollout_flops + train_flops)
    return {
        "benchmark": "mb2po",
        "seconds_per_iteration": seconds,
        "seconds_per_iteration_per_seed": seconds / num_seeds,
        "flops_per_iteration": flops,
        "rollout_flops_fraction": rollout_fraction,
        "matmul_flops_per_s": peak,
        "fraction_of_matmul_peak": flops / seconds / peak,
        # Scaled from this run's sizes to the paper's, this many seeds.
        "projected_paper_protocol_hours": projected_paper_protocol_hours(
            seconds, mcfg.rows_per_slot, updates_per_iteration, rollout_fraction),
        "imagined_steps": mcfg.rows_per_slot,
        "updates_per_iteration": updates_per_iteration,
        "num_seeds": num_seeds,
        "members_evaluated": evaluated,
        "compile_and_first_call_s": compile_and_first_s,
        **environment(),
        "devices": devices,
        "mesh": sharding.describe(mesh),
        "rollout_devices": 1 if rollout_mesh is None else rollout_mesh.size,
    }

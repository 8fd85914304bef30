"""Rollout-engine throughput: imagined steps per second of one MB2PO iteration (paper: 1M steps).

Random-init networks (speed does not depend on the weights). FLOPs counted honestly: per imagined step,
the forward matmuls of every ensemble member the engine actually evaluates (the elites with the default
"max_std" penalty; all members for "max_aleatoric" or members="all") plus the policy's forward. Elementwise
work (swish, soft clamps, sampling, termination) is not counted: it is the overhead the ratio exposes.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (bench_cpu_layout, bench_mesh, block, dense_flops, environment, matmul_flops_per_s,
                               require_torch, time_call)
from mb2po_jax import dynamics as dyn
from mb2po_jax import rollout as ro
from mb2po_jax import sharding
from mb2po_jax.termination import hopper_termination


def init_tanh_gaussian_policy(
    key: jax.Array, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256, 256)
) -> list[dict[str, jax.Array]]:
    """A stand-in for the agent's policy: MLP -> (mean, log_std) of a tanh-squashed Gaussian."""
    sizes = [obs_dim, *hidden, 2 * act_dim]
    shapes = list(zip(sizes[:-1], sizes[1:]))
    flat = jax.random.normal(key, (sum(i * o for i, o in shapes),), jnp.float32)  # one draw: one compile
    params, start = [], 0
    for i, o in shapes:
        w = flat[start : start + i * o].reshape(i, o) / np.sqrt(i)
        start += i * o
        params.append({"w": w, "b": jnp.zeros((o,), jnp.float32)})
    return params


def tanh_gaussian_policy_fn(params: list[dict[str, jax.Array]], key: jax.Array, obs: jax.Array) -> jax.Array:
    """(params, key, obs [B, o]) -> a ~ tanh(N(mu(s), sigma(s))) [B, a]."""
    h = obs
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    mean, log_std = jnp.split(h, 2, axis=-1)
    log_std = jnp.clip(log_std, -5.0, 2.0)
    return jnp.tanh(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype))


def random_dynamics_state(
    key: jax.Array, obs_dim: int, act_dim: int, config: dyn.DynamicsConfig
) -> dyn.DynamicsState:
    k_data, k_init = jax.random.split(key)
    inputs = jax.random.normal(k_data, (1024, obs_dim + act_dim), jnp.float32)
    state = dyn.init_dynamics(k_init, obs_dim, act_dim, config, inputs)
    # A trained ensemble's stds are small; random init gives O(1) means, harmless for timing.
    return state


def run(
    obs_dim: int = 11,
    act_dim: int = 3,
    steps: int = 1_000_000,
    num_members: int = 7,
    num_elites: int = 5,
    horizon: int = 5,
    chunk_size: int = 0,
    penalty: str = "max_std",
    members: str = "elites",
    policy_hidden: tuple[int, ...] = (256, 256, 256),
    min_time: float = 0.0,
    repeats: int = 2,
    compare_torch: bool = False,
    devices: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """One iteration of `steps` imagined steps (steps // horizon start states), timed best-of (at least
    `repeats` calls after a warm-up, and `min_time` seconds). Termination uses the hopper rule; with random
    weights most trajectories stop early but every step's matmuls still run (static shapes), so the work is the same.
    chunk_size 0 picks the backend's default (`rollout.default_chunk_size`). `compare_torch` also times an
    OfflineRL-Kit-style PyTorch rollout (`torch_rollout`: einsum ensemble, numpy round trip every step) on
    the same shapes, right after.
    `devices` > 1 splits every chunk's trajectories over that many devices, as one seed's MB2PO iteration
    does on a batch mesh or a CPU rollout mesh (same numbers as one device); the reference rate is then
    the devices' aggregate. 0 (default): as `mb2po-train` runs it, 2 CPU host devices on a CPU with 2+
    cores (`mb2po-train --cpu_devices`), 1 on an accelerator."""
    # First: on CPU these set the host device count.
    mesh = bench_cpu_layout(1, 0)[1] if devices == 0 else bench_mesh(devices)
    devices = 1 if mesh is None else mesh.size
    if compare_torch:
        require_torch()
    dcfg = dyn.DynamicsConfig(num_members=num_members, num_elites=num_elites)
    rcfg = ro.RolloutConfig(horizon=horizon, penalty=penalty, rollout_members=members, chunk_size=chunk_size or None)
    k_dyn, k_pi, k_obs, k_roll = jax.random.split(jax.random.PRNGKey(seed), 4)
    dyn_state = random_dynamics_state(k_dyn, obs_dim, act_dim, dcfg)
    policy_params = init_tanh_gaussian_policy(k_pi, obs_dim, act_dim, policy_hidden)
    num_starts = steps // horizon
    start_obs = jax.random.normal(k_obs, (num_starts, obs_dim), jnp.float32)
    policy_fn = sharding.split_policy_rows(tanh_gaussian_policy_fn, mesh)  # as parallel.make_iteration_fn does
    dyn_state, policy_params, start_obs = sharding.replicate((dyn_state, policy_params, start_obs), mesh)
    fn = ro.make_rollout_fn(policy_fn, hopper_termination, rcfg)

    t0 = time.perf_counter()
    block(fn(k_roll, policy_params, dyn_state, start_obs))
    compile_and_first_s = time.perf_counter() - t0
    # Reference rate before and after, the higher one kept: on a shared machine a peak measured during
    # someone else's burst would flatter the ratio.
    peak = matmul_flops_per_s(mesh=mesh)
    seconds = time_call(
        lambda: fn(k_roll, policy_params, dyn_state, start_obs), min_time=min_time, min_repeats=repeats
    )
    peak = max(peak, matmul_flops_per_s(mesh=mesh))

    members = num_members if (penalty == "max_aleatoric" or members == "all") else num_elites
    sizes = dyn.layer_sizes(dcfg, obs_dim, act_dim)
    flops_per_step = members * dense_flops(1, sizes) + dense_flops(1, [obs_dim, *policy_hidden, 2 * act_dim])
    imagined = num_starts * horizon
    rate = imagined / seconds
    extra: dict[str, Any] = {}
    if compare_torch:
        from benchmarks import torch_rollout

        ref = torch_rollout.imagined_steps_per_s(obs_dim, act_dim, steps, horizon, num_members, num_elites,
                                                 repeats=repeats, seed=seed)
        extra = {"torch_rows_per_s": ref["rows_computed_per_s"], "torch_threads": ref["torch_threads"],
                 "speedup_vs_torch": rate / ref["rows_computed_per_s"]}
    return {
        "benchmark": "rollout",
        "imagined_steps_per_s": rate,
        "flops_per_step": flops_per_step,
        "matmul_flops_per_s": peak,
        "fraction_of_matmul_peak": rate * flops_per_step / peak,
        "seconds_per_iteration": seconds * steps / imagined,
        "imagined_steps": imagined,
        "members_evaluated": members,
        "chunk_size": chunk_size or ro.default_chunk_size(),
        "horizon": horizon,
        "penalty": penalty,
        "compile_and_first_call_s": compile_and_first_s,
        **environment(),
        "devices": devices,
        **extra,
    }


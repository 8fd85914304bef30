"""Dynamics-ensemble training throughput: Adam minibatch updates per second (all members at once).

One update = every member's forward and backward on its own [batch_size, obs_dim + act_dim] bootstrap
minibatch. FLOPs per update count the matmuls the update runs: every member's forward, its weight
gradients, and its input gradients of every layer but the first (nothing asks for the gradient of the
data), i.e. just under 3 x the forward; `hlo_matmul_flops_per_update` recounts them from the dots of the
compiled loss-and-gradient program. Elementwise work (swish, NLL, Adam) is not counted.

Timed: one compiled epoch call (`dynamics.make_train_epoch`) of `num_updates` updates, which also includes
the per-member reshuffle of the bootstrap indices and a small holdout evaluation (< 1% of the work).
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import (
    backward_flops, block, dense_flops, environment, hlo_matmul_flops, matmul_flops_per_s, time_call,
)
from mb2po_jax import dynamics as dyn


def run(
    obs_dim: int = 11,
    act_dim: int = 3,
    num_members: int = 7,
    batch_size: int = 256,
    num_updates: int = 200,
    min_time: float = 2.0,
    seed: int = 0,
) -> dict[str, Any]:
    cfg = dyn.DynamicsConfig(num_members=num_members, num_elites=min(5, num_members), batch_size=batch_size)
    k_data, k_init, k_boot, k_epoch = jax.random.split(jax.random.PRNGKey(seed), 4)
    n_train, n_hold = num_updates * batch_size, 256
    x = jax.random.normal(k_data, (n_train + n_hold, obs_dim + act_dim), jnp.float32)
    y = jnp.tanh(x[:, : obs_dim + 1])  # any smooth target; speed does not depend on it
    train = {"inputs": x[:n_train], "targets": y[:n_train]}
    holdout = {"inputs": x[n_train:], "targets": y[n_train:]}
    state = dyn.init_dynamics(k_init, obs_dim, act_dim, cfg, train["inputs"])
    data = dyn.make_epoch_data(k_boot, state, train, holdout)
    epoch_fn = dyn.make_train_epoch(cfg)
    budget = jnp.int32(num_updates)

    t0 = time.perf_counter()
    block(epoch_fn(state, data, k_epoch, budget))
    compile_and_first_s = time.perf_counter() - t0
    peak = matmul_flops_per_s()  # before and after, the higher kept (shared machines)
    seconds = time_call(lambda: epoch_fn(state, data, k_epoch, budget), min_time=min_time)
    peak = max(peak, matmul_flops_per_s())

    sizes = dyn.layer_sizes(cfg, obs_dim, act_dim)
    flops_per_update = num_members * (dense_flops(batch_size, sizes) + backward_flops(batch_size, sizes))
    rate = num_updates / seconds
    # The same count read off the compiled gradient of one minibatch (shapes as in an epoch's update).
    grad_fn = jax.jit(jax.value_and_grad(dyn.ensemble_loss, has_aux=True), static_argnums=3)
    rows = data["bootstrap"][:, :batch_size]
    hlo_flops = hlo_matmul_flops(
        grad_fn.lower(state.params, data["inputs"][rows], data["targets"][rows], cfg).compile().as_text()
    )
    return {
        "benchmark": "dynamics",
        "minibatch_updates_per_s": rate,
        "flops_per_update": flops_per_update,
        "flops_note": "matmul FLOPs of all members: forward, weight gradients, input gradients but the first layer's",
        "hlo_matmul_flops_per_update": hlo_flops,
        "matmul_flops_per_s": peak,
        "fraction_of_matmul_peak": rate * flops_per_update / peak,
        "num_members": num_members,
        "batch_size": batch_size,
        "num_updates_timed": num_updates,
        "compile_and_first_call_s": compile_and_first_s,
        **environment(),
    }


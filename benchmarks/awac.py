"""AWAC update throughput: seed-updates per second of `awac.make_train_steps`, against the machine's matmul
rate and, optionally, a CORL-style PyTorch AWAC (`torch_reference`) timed in the same process.

FLOPs per update (`update_flops`) count the matmuls `awac.update` actually runs, multiply-add = 2 FLOPs,
B = batch size, actor widths [obs, *hidden, K + 2*K*act] (logits, means and log-stds heads of the K-component
GMM), critic widths [obs + act, *hidden, 1] (K quantiles instead of 1 with --critic quantile), twin critics:

  a' ~ pi(.|s')                   actor forward, B rows
  min_j Q'_j(s', a')              target twin critic forward, B rows
  log pi(a|s), a_pi ~ pi(.|s)     actor forward, B rows (one forward gives both)
  d log pi / d theta              actor backward, B rows
  Q_j on [(s, a); (s, a_pi)]      twin critic forward, 2B rows (one forward gives loss, Q(s,a), baseline)
  d L_Q / d phi                   twin critic backward, 2B rows

A backward is 2x its forward (grad wrt weights and wrt inputs of every layer) less the input-grad of the
first layer, whose inputs are data. The critic backward runs on all 2B rows although the loss only reads the
first B: the baseline half's cotangent is zero, but XLA does not split the matmuls (checked in the compiled
HLO). That half is real work the machine does, so it is counted; it is also the cheapest work to remove
(about a fifth of the total at the default sizes). Elementwise work (ReLU, GMM log-prob, sampling, Adam, the minibatch
gather) is not counted: it is the overhead the fraction of matmul peak exposes.

`common.hlo_matmul_flops` recounts the same quantity from the compiled program itself (every dot, loops multiplied
by their trip count), so a change to `awac.update` that adds or drops matmuls shows up as a mismatch.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    backward_flops, dense_flops, environment, hlo_matmul_flops, matmul_flops_per_s, require_torch, time_call,
)
from mb2po_jax import awac
from mb2po_jax.data.transitions import Transitions


def update_flops(obs_dim: int, act_dim: int, config: awac.AWACConfig) -> dict[str, float]:
    """Matmul FLOPs of one `awac.update` (one seed), by part; see the module docstring."""
    b, k = config.batch_size, config.num_components
    actor = [obs_dim, *config.actor_hidden_dims, k + 2 * k * act_dim]
    critic = [obs_dim + act_dim, *config.critic_hidden_dims,
              config.num_quantiles if config.critic == "quantile" else 1]
    return {
        "actor_forward_next_obs": dense_flops(b, actor),
        "target_critic_forward": 2 * dense_flops(b, critic),
        "actor_forward": dense_flops(b, actor),
        "actor_backward": backward_flops(b, actor),
        "critic_forward_2b": 2 * dense_flops(2 * b, critic),
        "critic_backward_2b": 2 * backward_flops(2 * b, critic),
    }


def torch_update_flops(obs_dim: int, act_dim: int, batch_size: int, hidden_dims: Sequence[int]) -> float:
    """Matmul FLOPs of one `torch_reference.TorchAWAC.update`: critic step (a' sample, target twin forward,
    twin forward + backward), actor step (twin forward on (s, a) and (s, a_pi), a_pi sample, actor forward +
    backward). Its Gaussian actor has act_dim outputs, so it does less work per update than our GMM."""
    b = batch_size
    actor = [obs_dim, *hidden_dims, act_dim]
    critic = [obs_dim + act_dim, *hidden_dims, 1]
    fa, fc = dense_flops(b, actor), dense_flops(b, critic)
    critic_step = fa + 2 * fc + 2 * fc + 2 * backward_flops(b, critic)
    actor_step = 4 * fc + fa + fa + backward_flops(b, actor)
    return critic_step + actor_step


# --- the benchmark ----------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[bench awac] {msg}", file=sys.stderr, flush=True)


def random_dataset(num: int, obs_dim: int, act_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random transitions with a D4RL dataset's shapes (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((num, obs_dim), np.float32),
        "actions": rng.uniform(-1.0, 1.0, (num, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(num, np.float32),
        "next_observations": rng.standard_normal((num, obs_dim), np.float32),
        "terminals": (rng.random(num) < 0.01).astype(np.float32),
    }


def run(
    obs_dim: int = 11,
    act_dim: int = 3,
    batch_size: int = 256,
    steps_per_call: int = 1000,
    num_seeds: int = 1,
    compare_torch: bool = False,
    min_time: float = 2.0,
    hidden_dims: tuple[int, ...] = (256, 256, 256),
    num_components: int = 5,
    dataset_size: int = 1_000_000,
    repeats: int = 1,
    torch_threads: int = 0,
    torch_steps_per_chunk: int = 0,
    critic: str = "twin",
    num_quantiles: int = 32,
    value_transform: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time `awac.make_train_steps(steps_per_call)` on `num_seeds` vmapped seeds: best-of calls (at least 3
    and `min_time` seconds) after the compile, on random data of `dataset_size` transitions held on the
    device. `repeats` > 1 measures again that many times, interleaved with the torch reference when
    `compare_torch` (torch, jax, matmul rate; torch, jax, ...) so both see the same machine load; reported
    figures are medians over repeats, with every repeat listed under `*_runs`.

    The torch reference is timed the same way (best-of chunks of `torch_steps_per_chunk` updates, by default
    `steps_per_call`) on the same data, one seed, with `torch_threads` intra-op threads (0: torch's
    default). `critic`, `num_quantiles` and `value_transform` pick the critic (`mb2po-train`'s flags)."""
    if compare_torch:
        require_torch()
    config = awac.AWACConfig(
        actor_hidden_dims=tuple(hidden_dims),
        critic_hidden_dims=tuple(hidden_dims),
        num_components=num_components,
        batch_size=batch_size,
        critic=critic,
        num_quantiles=num_quantiles,
        value_transform=value_transform,
    )
    arrays = random_dataset(dataset_size, obs_dim, act_dim, seed)
    data = jax.tree.map(jnp.asarray, Transitions.from_numpy(**arrays))
    state = awac.init_seeds(jax.random.split(jax.random.PRNGKey(seed), num_seeds), obs_dim, act_dim, config)
    train = awac.make_train_steps(steps_per_call)

    _log(f"compiling {steps_per_call} updates x {num_seeds} seed(s)")
    t0 = time.perf_counter()
    compiled = train.lower(state, data).compile()
    compile_seconds = time.perf_counter() - t0
    hlo_flops = hlo_matmul_flops(compiled.as_text())
    holder = {"state": state}
    cpu_seconds: list[float] = []

    def call():
        # The state is donated: each call consumes the previous call's output.
        c0 = time.process_time()
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics)
        cpu_seconds.append(time.process_time() - c0)
        return metrics

    measure_torch = None
    if compare_torch:
        measure_torch = _torch_rates_fn(arrays, obs_dim, act_dim, batch_size, min_time, hidden_dims,
                                        torch_steps_per_chunk or steps_per_call, torch_threads)
    runs = _timed_repeats(call, cpu_seconds, measure_torch, repeats, min_time, num_seeds * steps_per_call)

    breakdown = update_flops(obs_dim, act_dim, config)
    flops = sum(breakdown.values())
    fractions = [r * flops / p for r, p in zip(runs["updates_per_s"], runs["matmul_flops_per_s"])]
    result: dict[str, Any] = {
        "benchmark": "awac",
        "updates_per_s": statistics.median(runs["updates_per_s"]),
        "flops_per_update": flops,
        "matmul_flops_per_s": statistics.median(runs["matmul_flops_per_s"]),
        "fraction_of_matmul_peak": statistics.median(fractions),
        "seconds_per_call": statistics.median(runs["seconds_per_call"]),
        # Per second of process CPU time (all threads, spin-waits included): on a shared machine, a wall
        # rate far below this times the thread count means the process was waiting for a core.
        "cpu_updates_per_s": statistics.median(runs["cpu_updates_per_s"]),
        "compile_seconds": compile_seconds,
        "flops_per_update_breakdown": breakdown,
        "hlo_matmul_flops_per_update": None if hlo_flops is None else hlo_flops / (steps_per_call * num_seeds),
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "batch_size": batch_size,
        "steps_per_call": steps_per_call,
        "num_seeds": num_seeds,
        "dataset_size": dataset_size,
        "repeats": repeats,
        "min_time": min_time,
        "config": dataclasses.asdict(config),
        **environment(),
        "fraction_of_matmul_peak_runs": fractions,
        **{f"{k}_runs": v for k, v in runs.items()},
    }
    if compare_torch:
        import torch

        speedups = [j / t for j, t in zip(runs["updates_per_s"], runs["torch_updates_per_s"])]
        result.update(
            torch_updates_per_s=statistics.median(runs["torch_updates_per_s"]),
            torch_cpu_updates_per_s=statistics.median(runs["torch_cpu_updates_per_s"]),
            speedup_vs_torch=statistics.median(speedups),
            speedup_vs_torch_runs=speedups,
            torch_threads=torch.get_num_threads(),
            torch_steps_per_chunk=torch_steps_per_chunk or steps_per_call,
            torch_version=torch.__version__,
            torch_flops_per_update=torch_update_flops(obs_dim, act_dim, batch_size, hidden_dims),
        )
    return result


def _torch_rates_fn(arrays: dict[str, np.ndarray], obs_dim: int, act_dim: int, batch_size: int, min_time: float,
                    hidden_dims: Sequence[int], steps_per_chunk: int, threads: int) -> Callable[[], dict[str, float]]:
    """() -> the torch reference's rates on the same data (torch is optional: imported only here)."""
    import torch

    from benchmarks import torch_reference

    if threads > 0:
        torch.set_num_threads(threads)
    torch_data = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return lambda: torch_reference.timed_rates(obs_dim, act_dim, batch_size, min_time, hidden_dims=hidden_dims,
                                               steps_per_chunk=steps_per_chunk, data=torch_data)


def _timed_repeats(call: Callable[[], Any], cpu_seconds: list[float],
                   measure_torch: Callable[[], dict[str, float]] | None, repeats: int, min_time: float,
                   updates_per_call: int) -> dict[str, list[float]]:
    """`repeats` best-of timings of `call` (each after the torch reference's, when given, so both see the
    same machine load) and the matmul rate beside each: the lists `run` reports medians of."""
    runs: dict[str, list[float]] = {
        "updates_per_s": [], "cpu_updates_per_s": [], "seconds_per_call": [], "matmul_flops_per_s": []
    }
    if measure_torch is not None:
        runs.update(torch_updates_per_s=[], torch_cpu_updates_per_s=[])
    for rep in range(repeats):
        if measure_torch is not None:
            rates = measure_torch()
            runs["torch_updates_per_s"].append(rates["updates_per_s"])
            runs["torch_cpu_updates_per_s"].append(rates["cpu_updates_per_s"])
            _log(f"repeat {rep + 1}/{repeats}: torch {rates['updates_per_s']:.1f} updates/s")
        cpu_seconds.clear()
        seconds = time_call(call, min_time=min_time)
        runs["seconds_per_call"].append(seconds)
        runs["updates_per_s"].append(updates_per_call / seconds)
        runs["cpu_updates_per_s"].append(updates_per_call / min(cpu_seconds[1:]))
        runs["matmul_flops_per_s"].append(matmul_flops_per_s())
        _log(f"repeat {rep + 1}/{repeats}: jax {runs['updates_per_s'][-1]:.1f} seed-updates/s, "
             f"matmul {runs['matmul_flops_per_s'][-1] / 1e9:.1f} GFLOP/s")
    return runs

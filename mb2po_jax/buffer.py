"""Model buffer: a device-resident ring of the last n iterations' imagined rollouts (paper section 4.3:
"sample ... uniformly from the last 100 policy iterates", Algorithm 1's {D_{k-i}}_{i=0}^{99}).

Storage is [n_slots, rows_per_slot, ...]; iteration k is written into slot k % n_slots (SPEC section 3: a
real ring with a write index and a fill count, not `concatenate([old[:-n], new[:n]])`). On write, the
rollout's valid rows are compacted to the front of the slot and the slot's count is recorded; the tail is
zeroed and never sampled. Uniform sampling over every valid stored row is then exact and cheap: draw a
global index in [0, total_valid) and map it to (slot, row) through the cumulative counts. Unfilled slots
have count 0, so they are never sampled.

Memory: 100 slots x 1M rows x ((2 * obs_dim + act_dim + 1) floats + 1 byte), i.e. 10.5 GB for hopper
and 16.5 GB for walker2d/halfcheetah in float32; `buffer_bytes` / `check_buffer_fits` say so before
allocating. `dtype=bfloat16` halves it (samples are cast back to float32). Writes must run under
`jax.jit(..., donate_argnums=...)` with the buffer donated, so XLA updates the slot in place instead of
copying the whole ring.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mb2po_jax import rollout as ro
from mb2po_jax.errors import ConfigError
from mb2po_jax.rollout import RolloutBatch

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """num_slots: iterations kept (paper n = 100). rows_per_slot: rows of one iteration's RolloutBatch
    (horizon * num_starts, paper 1M). dtype: storage dtype of the float fields."""

    obs_dim: int
    act_dim: int
    num_slots: int = 100
    rows_per_slot: int = 1_000_000
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_slots < 1 or self.rows_per_slot < 1:
            raise ConfigError(
                f"buffer: num_slots and rows_per_slot must be >= 1, got {self.num_slots}, "
                f"{self.rows_per_slot}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"buffer: dtype must be float32 or bfloat16, got {self.dtype!r}")


class ModelBuffer(struct.PyTreeNode):
    observations: jax.Array  # [S, R, o]
    actions: jax.Array  # [S, R, a]
    rewards: jax.Array  # [S, R]
    next_observations: jax.Array  # [S, R, o]
    terminals: jax.Array  # [S, R] bool
    counts: jax.Array  # [S] int32, valid rows at the front of each slot (0 = unfilled)
    write_index: jax.Array  # int32, slot the next iteration goes to
    num_written: jax.Array  # int32, iterations written so far; filled slots = min(num_written, S)

    @property
    def num_slots(self) -> int:
        return self.counts.shape[0]

    @property
    def rows_per_slot(self) -> int:
        return self.rewards.shape[1]


def buffer_bytes(config: BufferConfig) -> int:
    """Device bytes of the ring's storage (plus its counters)."""
    item = np.dtype(jnp.bfloat16 if config.dtype == "bfloat16" else np.float32).itemsize
    floats_per_row = 2 * config.obs_dim + config.act_dim + 1
    per_row = floats_per_row * item + 1  # + bool terminal
    return config.num_slots * config.rows_per_slot * per_row + 4 * config.num_slots + 8


def check_buffer_fits(config: BufferConfig, available_bytes: int, *, headroom: float = 0.8) -> int:
    """Raises ConfigError unless the buffer fits in `headroom` x `available_bytes`; returns its size."""
    need = buffer_bytes(config)
    budget = int(headroom * available_bytes)
    if need > budget:
        raise ConfigError(
            f"model buffer needs {need / 2**30:.2f} GiB ({config.num_slots} iterations x "
            f"{config.rows_per_slot:,} rows, obs_dim={config.obs_dim}, act_dim={config.act_dim}, "
            f"{config.dtype}) but only {budget / 2**30:.2f} GiB of {available_bytes / 2**30:.2f} GiB may be "
            "used: lower the number of kept iterations or imagined steps per iteration, or use bfloat16 "
            "storage"
        )
    return need


def init_buffer(config: BufferConfig) -> ModelBuffer:
    s, r = config.num_slots, config.rows_per_slot
    dt = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return ModelBuffer(
        observations=jnp.zeros((s, r, config.obs_dim), dt),
        actions=jnp.zeros((s, r, config.act_dim), dt),
        rewards=jnp.zeros((s, r), dt),
        next_observations=jnp.zeros((s, r, config.obs_dim), dt),
        terminals=jnp.zeros((s, r), bool),
        counts=jnp.zeros((s,), jnp.int32),
        write_index=jnp.zeros((), jnp.int32),
        num_written=jnp.zeros((), jnp.int32),
    )


def add_rollout(buffer: ModelBuffer, batch: RolloutBatch) -> ModelBuffer:
    """Writes one iteration into slot `write_index`, valid rows compacted to the front (pure; jit it with
    the buffer donated). batch rows must equal rows_per_slot."""
    r = buffer.rows_per_slot
    chex.assert_shape(batch.valid, (r,))
    valid = batch.valid
    # Destination of each valid row: its rank among the valid rows; invalid rows go out of range (dropped).
    dest = jnp.where(valid, jnp.cumsum(valid) - 1, r)
    slot = buffer.write_index

    def write(store: jax.Array, rows: jax.Array) -> jax.Array:
        compact = jnp.zeros(store.shape[1:], store.dtype).at[dest].set(rows.astype(store.dtype), mode="drop")
        return jax.lax.dynamic_update_index_in_dim(store, compact, slot, axis=0)

    return buffer.replace(
        observations=write(buffer.observations, batch.observations),
        actions=write(buffer.actions, batch.actions),
        rewards=write(buffer.rewards, batch.rewards),
        next_observations=write(buffer.next_observations, batch.next_observations),
        terminals=write(buffer.terminals, batch.terminals),
        counts=buffer.counts.at[slot].set(jnp.sum(valid, dtype=jnp.int32)),
        write_index=(slot + 1) % buffer.num_slots,
        num_written=buffer.num_written + 1,
    )


def make_collect_fn(
    policy_fn: ro.PolicyFn,
    termination_fn: Any,
    rollout_config: ro.RolloutConfig,
    num_starts: int,
):
    """Algorithm 1's data collection for one iteration as ONE compiled call: sample `num_starts` start
    states from D_beta, roll the policy out in the model, write the valid rows into the ring.

    Returns jitted `collect(key, policy_params, dyn_state, dataset_observations [N, o], buffer)
    -> (buffer, rollout metrics)`, with the buffer donated (updated in place; do not reuse the argument).
    The buffer's rows_per_slot must equal horizon * num_starts.
    """

    def fn(key, policy_params, dyn_state, dataset_observations, buffer):
        return collect(key, policy_params, dyn_state, dataset_observations, buffer, policy_fn=policy_fn,
                       termination_fn=termination_fn, rollout_config=rollout_config, num_starts=num_starts)

    return jax.jit(fn, donate_argnums=4)


def rollout_from_dataset(key, policy_params, dyn_state, dataset_observations, *, policy_fn, termination_fn,
                         rollout_config: ro.RolloutConfig, num_starts: int):
    """`num_starts` start states drawn from D_beta, rolled out in the model (pure; the first half of
    `collect`, and an MB2PO iteration's `imagine`). Returns (RolloutBatch, rollout metrics)."""
    k_start, k_roll = jax.random.split(key)
    start = ro.sample_start_states(k_start, dataset_observations, num_starts)
    return ro.rollout(k_roll, policy_params, dyn_state, start,
                      policy_fn=policy_fn, termination_fn=termination_fn, config=rollout_config)


def collect(key, policy_params, dyn_state, dataset_observations, buffer: ModelBuffer, *, policy_fn,
            termination_fn, rollout_config: ro.RolloutConfig, num_starts: int):
    """The pure body of `make_collect_fn`: `rollout_from_dataset`, then the batch into the ring."""
    batch, metrics = rollout_from_dataset(key, policy_params, dyn_state, dataset_observations,
                                          policy_fn=policy_fn, termination_fn=termination_fn,
                                          rollout_config=rollout_config, num_starts=num_starts)
    return add_rollout(buffer, batch), metrics


def num_valid(buffer: ModelBuffer) -> jax.Array:
    """Rows available for sampling (int32 scalar)."""
    return jnp.sum(buffer.counts)


def sample(buffer: ModelBuffer, key: jax.Array, batch_size: int) -> Batch:
    """`batch_size` rows drawn uniformly with replacement among all valid stored rows.

    Returns float32 {observations, actions, rewards, next_observations, terminals}. The buffer must hold at
    least one valid row (check `num_valid`); an empty buffer yields the zero rows of slot 0.
    """
    counts = buffer.counts
    ends = jnp.cumsum(counts)  # [S], exclusive end of each slot's range in the global index
    g = jax.random.randint(key, (batch_size,), 0, jnp.maximum(ends[-1], 1))
    slot = jnp.minimum(jnp.searchsorted(ends, g, side="right"), buffer.num_slots - 1)
    row = g - (ends[slot] - counts[slot])
    take = lambda x: x[slot, row].astype(jnp.float32)
    return {
        "observations": take(buffer.observations),
        "actions": take(buffer.actions),
        "rewards": take(buffer.rewards),
        "next_observations": take(buffer.next_observations),
        "terminals": take(buffer.terminals),
    }


def _dataset_field(data: Any, name: str) -> jax.Array:
    value = data[name] if isinstance(data, Mapping) else getattr(data, name)
    return jnp.asarray(value)


def sample_dataset(key: jax.Array, dataset: Any, batch_size: int) -> Batch:
    """Uniform rows (with replacement) of the offline dataset (mapping or object with the 5 fields)."""
    n = _dataset_field(dataset, "observations").shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    out = {k: _dataset_field(dataset, k)[idx] for k in ("observations", "actions", "next_observations")}
    for k in ("rewards", "terminals"):  # [N] or [N, 1] -> [B]
        out[k] = _dataset_field(dataset, k).reshape(n)[idx]
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def num_real(batch_size: int, omega: float) -> int:
    """Rows from the offline data in a mixed batch: exactly round(omega * batch_size)."""
    if not 0.0 <= omega <= 1.0:
        raise ConfigError(f"omega (fraction of real data per batch) must be in [0, 1], got {omega}")
    return int(round(omega * batch_size))


def mixed_batch(key: jax.Array, dataset: Any, buffer: ModelBuffer, batch_size: int, omega: float) -> Batch:
    """Algorithm 1: round(omega * batch_size) rows from D_beta, the rest from the model buffer; dataset
    rows first. Static sizes, so the split is exact. dataset: mapping/object with observations, actions,
    rewards, next_observations, terminals (device arrays, so nothing is transferred per call)."""
    n_real = num_real(batch_size, omega)
    k_real, k_model = jax.random.split(key)
    real = sample_dataset(k_real, dataset, n_real)
    model = sample(buffer, k_model, batch_size - n_real)
    return {k: jnp.concatenate([real[k], model[k]], axis=0) for k in real}

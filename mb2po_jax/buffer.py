"""Model buffer: a device-resident ring of the last n iterations' imagined rollouts (paper section 4.3:
"sample ... uniformly from the last 100 policy iterates", Algorithm 1's {D_{k-i}}_{i=0}^{99}).

Storage is [n_slots, rows_per_slot, ...]; iteration k is written into slot k % n_slots (SPEC section 3: a
real ring with a write index and a fill count, not `concatenate([old[:-n], new[:n]])`). On write, the
rollout's valid rows are compacted to the front of the slot and the slot's count is recorded; the tail is
zeroed and never sampled. Uniform sampling over every valid stored row is then exact and cheap: draw a
global index in [0, total_valid) and map it to (slot, row) through the cumulative counts. Unfilled slots
have count 0, so they are never sampled.

Memory: 100 slots x 1M rows x ((2 * obs_dim + act_dim + 1) floats + 1 byte), i.e. 10.5 GB for hopper
and 16.5 GB for walker2d/halfcheetah in float32 (`parallel.ring_bytes`; `parallel.check_fits` checks it
fits before allocating). `dtype=bfloat16` halves it (samples are cast back to float32). Writes must run under
`jax.jit(..., donate_argnums=...)` with the buffer donated, so XLA updates the slot in place instead of
copying the whole ring.
"""
from __future__ import annotations

import dataclasses
import chex
import jax
import jax.numpy as jnp
from flax import struct

from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError


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


def add_rollout(buffer: ModelBuffer, batch: Transitions, valid: jax.Array) -> ModelBuffer:
    """Writes one iteration's rollout into slot `write_index`, its valid rows ([R] bool) compacted to the
    front (pure; jit it with the buffer donated). batch rows must equal rows_per_slot."""
    r = buffer.rows_per_slot
    chex.assert_shape(valid, (r,))
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


def num_valid(buffer: ModelBuffer) -> jax.Array:
    """Rows available for sampling (int32 scalar)."""
    return jnp.sum(buffer.counts)


def sample(buffer: ModelBuffer, key: jax.Array, batch_size: int) -> Transitions:
    """`batch_size` rows drawn uniformly with replacement among all valid stored rows, as float32.

    The buffer must hold at least one valid row (check `num_valid`); an empty buffer yields the zero rows
    of slot 0.
    """
    counts = buffer.counts
    ends = jnp.cumsum(counts)  # [S], exclusive end of each slot's range in the global index
    g = jax.random.randint(key, (batch_size,), 0, jnp.maximum(ends[-1], 1))
    slot = jnp.minimum(jnp.searchsorted(ends, g, side="right"), buffer.num_slots - 1)
    row = g - (ends[slot] - counts[slot])
    take = lambda x: x[slot, row].astype(jnp.float32)
    return Transitions(observations=take(buffer.observations), actions=take(buffer.actions),
                       rewards=take(buffer.rewards), next_observations=take(buffer.next_observations),
                       terminals=take(buffer.terminals))


def sample_dataset(key: jax.Array, dataset: Transitions, batch_size: int) -> Transitions:
    """Uniform rows (with replacement) of the offline dataset (device-resident `Transitions`)."""
    idx = jax.random.randint(key, (batch_size,), 0, len(dataset))
    return jax.tree.map(lambda x: x[idx], dataset.replace(next_valid=None))


def num_real(batch_size: int, omega: float) -> int:
    """Rows from the offline data in a mixed batch: exactly round(omega * batch_size)."""
    if not 0.0 <= omega <= 1.0:
        raise ConfigError(f"omega (fraction of real data per batch) must be in [0, 1], got {omega}")
    return int(round(omega * batch_size))


def mixed_batch(key: jax.Array, dataset: Transitions, buffer: ModelBuffer, batch_size: int,
                omega: float) -> Transitions:
    """Algorithm 1's omega mixing: round(omega * batch_size) rows from D_beta, the rest from the model
    buffer; dataset rows first. Static sizes, so the split is exact. `dataset` lives on the device, so
    nothing is transferred per call."""
    n_real = num_real(batch_size, omega)
    k_real, k_model = jax.random.split(key)
    real = sample_dataset(k_real, dataset, n_real)
    model = sample(buffer, k_model, batch_size - n_real)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), real, model)

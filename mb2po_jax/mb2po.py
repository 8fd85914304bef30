"""MB2PO (paper section 4.3, Algorithm 1): AWAC fine-tuning inside the conservative model MDP.

One iteration k for one seed (`iteration`), pure:
  1. `imagine`: sample `num_starts` start states s_1 from D_beta; roll the current policy out for h steps
     in the ensemble (a uniformly drawn member per trajectory and step, penalised reward r - lambda *
     u(s, a), trajectories stop at predicted termination)                           -> rollout.imagine
     (lambda: the seed's `rollout.capped_penalty_coef`, computed by the caller when the stage starts)
  2. `learn`: the iteration's valid transitions become D_k, slot k % n of the model ring
                                                                                     -> buffer.add_rollout
     then `updates_per_iteration` AWAC steps on batches of exactly round(omega * B) rows of D_beta and the
     rest uniformly from the last n iterations' valid rows                           -> buffer.mixed_batch

The state is (AWAC state, model ring, iteration counter); the dynamics ensemble and the dataset are inputs,
not state. The AWAC state carries its own PRNG key, so iteration k depends only on the state after
iteration k - 1: N calls of one iteration equal any other split of the same N iterations (what makes
resume exact). Every seed at once, on one device or several, is `parallel.make_iteration_fn`'s work: it
compiles these functions for a device layout by passing wrapped `policy_fn` / `split_rows` hooks, which
are the identity here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from mb2po_jax import awac, buffer as buf, dynamics as dyn, rollout as ro
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import TerminationFn

SplitRows = Callable[..., Any]  # (tree, axis=0) -> tree: how a device layout splits rows (identity here)


def _same_rows(tree: Any, axis: int = 0) -> Any:
    return tree


@dataclasses.dataclass(frozen=True)
class MB2POConfig(ro.RolloutConfig):
    """Algorithm 1's settings, on top of the rollout's (h, lambda, penalty, members, chunk size, declared in
    `rollout.RolloutConfig`). Defaults are the paper's (section 5 and Algorithm 1); h and lambda are per
    task (MOPO's table, `mb2po_jax/configs/tasks.json`), omega = 0.05 as the earlier version of the paper
    and MOPO (SPEC section 1)."""

    iterations: int = 500
    imagined_steps: int = 1_000_000  # per iteration: horizon * num_starts (rounded down to a multiple)
    updates_per_iteration: int = 1000
    num_slots: int = 100  # n: iterations kept in the model ring
    omega: float = 0.05  # fraction of every AWAC batch drawn from D_beta
    buffer_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()  # the rollout's settings
        for name in ("iterations", "imagined_steps", "updates_per_iteration", "num_slots"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mb2po: {name} must be >= 1, got {getattr(self, name)}")
        if self.imagined_steps < self.horizon:
            raise ConfigError(
                f"mb2po: imagined_steps={self.imagined_steps} is less than one trajectory of "
                f"horizon={self.horizon}"
            )
        if not 0.0 <= self.omega <= 1.0:
            raise ConfigError(f"mb2po: omega (fraction of real data per batch) must be in [0, 1], got {self.omega}")
        buf.BufferConfig(1, 1, dtype=self.buffer_dtype)  # validates dtype

    @property
    def num_starts(self) -> int:
        return self.imagined_steps // self.horizon

    @property
    def rows_per_slot(self) -> int:
        return self.num_starts * self.horizon

    def rollout_config(self) -> ro.RolloutConfig:
        """The rollout's settings alone (what `rollout.imagine` is compiled for)."""
        return ro.RolloutConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ro.RolloutConfig)})

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


def policy_sample(agent: awac.AWACState, key: jax.Array, obs: jax.Array) -> jax.Array:
    """The rollout's behaviour: a sample of the current AWAC policy (Algorithm 1: a_j ~ pi(s_j))."""
    return awac.act(agent, obs, key)


def imagine(
    agent: awac.AWACState,
    dyn_state: dyn.DynamicsState,
    observations: jax.Array,
    penalty_coef: jax.Array,
    *,
    config: MB2POConfig,
    termination_fn: TerminationFn,
    policy_fn: ro.PolicyFn = policy_sample,
) -> tuple[Transitions, jax.Array, dict[str, jax.Array]]:
    """Step 1 of an iteration (pure): start states from D_beta's `observations`, the rollout of the
    current policy with lambda = `penalty_coef` (a scalar: `config.penalty_coef`, or the seed's
    `rollout.capped_penalty_coef`). Reads the agent's key without advancing it (`learn` advances it)."""
    _, k_collect = jax.random.split(agent.key)
    return ro.imagine(k_collect, agent, dyn_state, observations, config.num_starts, policy_fn=policy_fn,
                      termination_fn=termination_fn, config=config.rollout_config(), penalty_coef=penalty_coef)


def learn(
    state: MB2POState,
    imagined: tuple[Transitions, jax.Array, dict[str, jax.Array]],
    dataset: Transitions,
    *,
    config: MB2POConfig,
    split_rows: SplitRows = _same_rows,
) -> tuple[MB2POState, dict[str, jax.Array]]:
    """Step 2 (pure): `imagine`'s rollout into the ring, then the AWAC updates on omega-mixed batches."""
    batch, valid, rollout_metrics = imagined
    key, _ = jax.random.split(state.agent.key)  # the split `imagine` made
    agent = state.agent.replace(key=key)
    ring = split_rows(buf.add_rollout(state.buffer, batch, valid), 1)  # storage [slots, R, ...]

    def mixed(data, key, batch_size):  # Algorithm 1: omega from D_beta, the rest from {D_k-i}
        return split_rows(buf.mixed_batch(key, data[0], data[1], batch_size, config.omega))

    agent, train_metrics = awac.train_steps(agent, (dataset, ring), config.updates_per_iteration, mixed)
    metrics = {**train_metrics,
               **{f"rollout_{k}": v for k, v in rollout_metrics.items()},
               "buffer_rows": buf.num_valid(ring)}
    return MB2POState(agent=agent, buffer=ring, iteration=state.iteration + 1), metrics


def iteration(
    state: MB2POState,
    dyn_state: dyn.DynamicsState,
    dataset: Transitions,
    penalty_coef: jax.Array,
    *,
    config: MB2POConfig,
    termination_fn: TerminationFn,
    policy_fn: ro.PolicyFn = policy_sample,
    split_rows: SplitRows = _same_rows,
) -> tuple[MB2POState, dict[str, jax.Array]]:
    """One MB2PO iteration for one seed (pure): `imagine` then `learn`. dataset: D_beta on the device
    (actions in the policy's scale); penalty_coef: the seed's lambda (scalar)."""
    imagined = imagine(state.agent, dyn_state, dataset.observations, penalty_coef, config=config,
                       termination_fn=termination_fn, policy_fn=policy_fn)
    return learn(state, imagined, dataset, config=config, split_rows=split_rows)

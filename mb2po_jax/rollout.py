"""Imagined rollouts in the conservative model MDP (paper section 4.3, Algorithm 1, inner loops).

From each start state the current policy acts for `horizon` steps; at every step every trajectory draws an
ensemble member uniformly (from all N members, as the paper's Algorithm 1; or from the elites), samples (s', r) from that member's Gaussian, and
gets the penalised reward r~ = r - lambda * u(s, a). Trajectories stop at predicted termination: a
trajectory that terminates at step k (1-based) yields exactly k valid rows, the k-th with terminal=1; later
rows are computed (static shapes) but flagged `valid=False` and never reach a buffer.

Uncertainty u(s, a), over the set M of members the rollout draws from (`members`: "all", the paper's, or
"elites", MOPO's), sigma_i = predicted std over the obs_dim + 1 target dims [s' - s, r]:
- "max_std" (default; the paper's max_i ||Sigma_i(s, a)||_F as SPEC reads it, "largest predicted standard
  deviation"): u = max_{i in M} ||sigma_i||_2.
- "max_aleatoric" (MOPO's `penalty_learned_var=True`, exactly, with members="elites"): the same norm, but
  the max runs over ALL members, elites or not (MOPO predicts with all 7 networks and samples only from the elites). Costs the
  forward pass of the non-elite members too.
- "ensemble_disagreement" (MOPO's `penalty_learned_var=False`): u = max_{i in M} ||mu_i^obs - mean_j
  mu_j^obs||_2 over the next-observation dims only, the distance of each member's mean next state from the
  ensemble average.

Speed (SPEC section 4: ~2 MFLOP per imagined step, the matmuls are the floor): every step evaluates only
the members in M (5 by default: 1.55 MFLOP per step with a 3 x 256 policy) on the shared
[C, in] inputs; all of M's outputs are needed anyway for the penalty, so the drawn member's mean/variance
are picked from the small feature-major [|M|, obs_dim + 1, C] output (a sum of |M| selects), and only the
drawn member's Gaussian is sampled. Start states are processed in chunks (`lax.map` over chunks,
`lax.scan` over the horizon inside), so activation memory is bounded by the chunk and 1M imagined steps
are one compiled call. The member indices and the Gaussian noise of a chunk are drawn once before its
horizon loop (on CPU each threefry draw is a small loop of its own). Every layer of the ensemble is one
batched matmul over the members with feature-major activations ([|F|, features, C], see `dynamics._mlp`),
the first one a single [|F| * H, in] x [in, C] matmul over the shared input; chunks are 1024
trajectories on CPU and up to 65536 on GPU/TPU (`default_chunk_size`).
The variance soft clamp uses a closed form (`dynamics.bounded_var`): XLA:CPU's softplus cost 13% of a step.

Trajectories whose prediction is not finite (state, reward or uncertainty) are stopped and that row is
invalid, so no NaN/inf can reach the buffer. After a stop, a trajectory keeps its last valid state so the
(masked) remaining steps stay finite.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import struct

from mb2po_jax import dynamics as dyn
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import TerminationFn

PolicyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, key, obs [B,o]) -> act [B,a]

PENALTIES = ("max_std", "max_aleatoric", "ensemble_disagreement")
MEMBER_SETS = ("all", "elites")  # whom a rollout draws from and penalises over


class RolloutBatch(struct.PyTreeNode):
    """Imagined transitions, N = horizon * num_starts rows, row t * num_starts + b = step t of start b."""

    observations: jax.Array  # [N, o]
    actions: jax.Array  # [N, a]
    rewards: jax.Array  # [N] penalised: r - lambda * u
    next_observations: jax.Array  # [N, o]
    terminals: jax.Array  # [N] bool, predicted termination (only meaningful where valid)
    valid: jax.Array  # [N] bool, False after a trajectory stopped (never store or sample these)
    uncertainty: jax.Array  # [N] u(s, a) before multiplying by lambda

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Paper: h and lambda per task (MOPO's table, SPEC section 4); 1M imagined steps per iteration."""

    horizon: int = 5
    penalty_coef: float = 1.0
    penalty: str = "max_std"
    members: str = "all"  # "all" (the paper) or "elites" (MOPO)
    # Max trajectories per chunk (None: by backend, see `default_chunk_size`). Bounds activation memory
    # (|M| x chunk x 200 floats per layer) and sets the matmul shapes.
    chunk_size: int | None = None
    # How the members are scheduled ("auto": by backend, see `resolve_layout`; or a
    # `dynamics.ensemble_mean_var` layout: "batched", "scan", "unrolled"). Same numbers, different speed.
    layout: str = "auto"

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ConfigError(f"rollout: penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.members not in MEMBER_SETS:
            raise ConfigError(f"--rollout_members must be one of {', '.join(MEMBER_SETS)}, got {self.members!r}")
        if self.horizon < 1 or (self.chunk_size is not None and self.chunk_size < 1):
            raise ConfigError(
                f"rollout: horizon and chunk_size must be >= 1, got {self.horizon}, {self.chunk_size}"
            )
        if self.layout not in ("auto", "batched", "scan", "unrolled"):
            raise ConfigError(f"rollout: layout must be auto, batched, scan or unrolled, got {self.layout!r}")


def default_chunk_size() -> int:
    """CPU: 1024 trajectories (measured on the 2-core dev CPU, batched layout: 512, 1024 and 2048 within
    noise of each other; small chunks keep the [|F|, 200, C] activations in cache). GPU/TPU: 65536,
    large enough to fill the device
    (one chunk of a 1M-step iteration is 5 x 65536 x 200 x 4 B = 262 MB per activation)."""
    return 1024 if jax.default_backend() == "cpu" else 65536


def resolve_layout(layout: str) -> str:
    """"auto" is "batched" on every backend: one kernel per layer on GPU/TPU; on the 2-core CPU, with the
    feature-major activations, batched and "unrolled" measured the same (0.63-0.69 of the matmul rate,
    noise of the shared machine) and "scan" (one member's whole MLP at a time) 0.56."""
    return "batched" if layout == "auto" else layout


def sample_start_states(key: jax.Array, observations: jax.Array, num_starts: int) -> jax.Array:
    """Uniform draws (with replacement) from the dataset's observations [N, o] -> [num_starts, o]."""
    idx = jax.random.randint(key, (num_starts,), 0, observations.shape[0])
    return observations[idx]


def _member_sets(dyn_state: dyn.DynamicsState, config: RolloutConfig):
    """(members evaluated F [|F|] int32, positions within F that trajectories draw from [|M|] int32)."""
    e = dyn_state.config.num_members
    if config.members == "all":
        everyone = jnp.arange(e, dtype=jnp.int32)
        return everyone, everyone
    if config.penalty == "max_aleatoric":
        # MOPO: penalty over all members, draws from the elites.
        return jnp.arange(e, dtype=jnp.int32), dyn_state.elites
    return dyn_state.elites, jnp.arange(dyn_state.elites.shape[0], dtype=jnp.int32)


def _uncertainty(mean: jax.Array, var: jax.Array, obs_dim: int, penalty: str, feature_axis: int = -1) -> jax.Array:
    """mean, var: [|F|, C, d] (or [|F|, d, C] with feature_axis=1) over the members the penalty runs over
    -> u [C]."""
    if penalty == "ensemble_disagreement":
        mu = jax.lax.slice_in_dim(mean, 0, obs_dim, axis=feature_axis)  # the added obs cancels
        return jnp.max(jnp.linalg.norm(mu - jnp.mean(mu, axis=0), axis=feature_axis), axis=0)
    # max_std / max_aleatoric: max_i ||sigma_i||_2 = sqrt(max_i sum_d var_i,d)
    return jnp.sqrt(jnp.max(jnp.sum(var, axis=feature_axis), axis=0))


def _rollout_chunk(
    key: jax.Array,
    policy_params: Any,
    dyn_state: dyn.DynamicsState,
    params: dyn.Params,
    draw_pos: jax.Array,
    start_obs: jax.Array,
    start_alive: jax.Array,
    *,
    policy_fn: PolicyFn,
    termination_fn: TerminationFn,
    config: RolloutConfig,
):
    """One chunk: start_obs [C, o], start_alive [C] bool -> per-step arrays [horizon, C, ...].
    params: the evaluated members F (leading axis |F|); draw_pos: positions in F trajectories draw from."""
    obs_dim = dyn_state.obs_dim
    num_f, num_draw = params["max_logvar"].shape[0], draw_pos.shape[0]
    lam = config.penalty_coef
    layout = resolve_layout(config.layout)

    c, d = start_obs.shape[0], obs_dim + 1
    k_policy, k_member, k_noise = jax.random.split(key, 3)
    # The rollout's own random draws for the whole chunk at once, before the horizon loop: on CPU every
    # threefry draw is a small while loop of its own, and two per step cost ~5% of a rollout.
    # Algorithm 1: "uniformly sample T from {T_i}" per trajectory and step.
    members = draw_pos[jax.random.randint(k_member, (config.horizon, c), 0, num_draw)]  # [h, C] in [0, |F|)
    noise = jax.random.normal(k_noise, (config.horizon, d, c), start_obs.dtype)  # [h, d, C]

    def step(carry, xs):
        obs, alive = carry  # [C, o], [C]
        k_pi, drawn, eps = xs  # key, [C], [d, C]
        act = policy_fn(policy_params, k_pi, obs)  # [C, a]
        x = dyn.normalize_inputs(dyn_state, obs, act)  # [C, in]
        # Feature-major [|F|, d, C], the network's own layout: the penalty's reductions and the member
        # select run along contiguous rows, and only the drawn member's sample [d, C] is transposed.
        mean, var = dyn.ensemble_mean_var(params, x, layout, feature_major=True)
        u = _uncertainty(mean, var, obs_dim, config.penalty, feature_axis=1)  # [C]
        # The drawn member's row, as a sum of |F| selects (one elementwise loop; a masked reduce over the
        # member axis ran ~10x slower on XLA:CPU).
        pick = lambda z: sum(jnp.where(drawn == f, z[f], 0.0) for f in range(num_f))  # [d, C]
        y = (pick(mean) + jnp.sqrt(pick(var)) * eps).T  # [C, d]
        next_obs, reward = obs + y[:, :obs_dim], y[:, obs_dim]
        finite = jnp.all(jnp.isfinite(next_obs), axis=-1) & jnp.isfinite(reward) & jnp.isfinite(u)
        valid = alive & finite
        done = termination_fn(obs, act, next_obs) & valid
        alive_next = valid & ~done
        out = (obs, act, reward - lam * u, next_obs, done, valid, u, reward, alive & ~finite)
        # Stopped trajectories keep their last valid state so the masked steps stay finite.
        obs = jnp.where(alive_next[:, None], next_obs, obs)
        return (obs, alive_next), out

    xs = (jax.random.split(k_policy, config.horizon), members, noise)
    _, outs = jax.lax.scan(step, (start_obs, start_alive), xs)
    return outs


def rollout(
    key: jax.Array,
    policy_params: Any,
    dyn_state: dyn.DynamicsState,
    start_obs: jax.Array,
    *,
    policy_fn: PolicyFn,
    termination_fn: TerminationFn,
    config: RolloutConfig = RolloutConfig(),
) -> tuple[RolloutBatch, dict[str, jax.Array]]:
    """Pure, jittable (close over / mark static everything after `start_obs`).

    start_obs: [B, o]. Returns (RolloutBatch with horizon * B rows, metrics). Metrics (scalars):
    `mean_raw_reward`, `mean_penalty` (lambda * u), `mean_uncertainty` (averages over valid rows),
    `fraction_terminated` (of the B trajectories), `num_valid`, `num_nonfinite` (rows dropped for a
    non-finite prediction).
    """
    chex.assert_rank(start_obs, 2)
    chex.assert_shape(start_obs, (None, dyn_state.obs_dim))
    b = start_obs.shape[0]
    # As few chunks as the size cap allows, then equal sizes: padding is < num_chunks rows.
    num_chunks = -(-b // (config.chunk_size or default_chunk_size()))
    c = -(-b // num_chunks)
    pad = num_chunks * c - b
    # Padding trajectories start stopped: they produce only invalid rows.
    alive = jnp.arange(num_chunks * c) < b
    start_obs = jnp.concatenate([start_obs, jnp.broadcast_to(start_obs[:1], (pad, start_obs.shape[1]))])
    members, draw_pos = _member_sets(dyn_state, config)
    params = dyn.take_members(dyn_state.params, members)  # [|F|, ...], gathered once for all chunks
    chunk_fn = lambda args: _rollout_chunk(
        args[0], policy_params, dyn_state, params, draw_pos, args[1], args[2],
        policy_fn=policy_fn, termination_fn=termination_fn, config=config,
    )
    outs = jax.lax.map(
        chunk_fn,
        (
            jax.random.split(key, num_chunks),
            start_obs.reshape(num_chunks, c, -1),
            alive.reshape(num_chunks, c),
        ),
    )  # each [num_chunks, horizon, C, ...]

    def time_major(x):  # [num_chunks, h, C, ...] -> [h * B, ...], row t * B + b
        x = jnp.swapaxes(x, 0, 1).reshape((config.horizon, num_chunks * c) + x.shape[3:])
        return x[:, :b].reshape((config.horizon * b,) + x.shape[2:])

    obs, act, rew, next_obs, done, valid, u, raw_rew, nonfinite = (time_major(x) for x in outs)
    batch = RolloutBatch(
        observations=obs, actions=act, rewards=rew, next_observations=next_obs,
        terminals=done, valid=valid, uncertainty=u,
    )
    num_valid = jnp.sum(valid)
    denom = jnp.maximum(num_valid, 1).astype(jnp.float32)
    vmean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / denom
    metrics = {
        "mean_raw_reward": vmean(raw_rew),
        "mean_penalty": vmean(config.penalty_coef * u),
        "mean_uncertainty": vmean(u),
        "fraction_terminated": jnp.sum(done) / b,
        "num_valid": num_valid,
        "num_nonfinite": jnp.sum(nonfinite),
    }
    return batch, metrics


def make_rollout_fn(
    policy_fn: PolicyFn,
    termination_fn: TerminationFn,
    config: RolloutConfig = RolloutConfig(),
) -> Callable[[jax.Array, Any, dyn.DynamicsState, jax.Array], tuple[RolloutBatch, dict[str, jax.Array]]]:
    """Jitted `fn(key, policy_params, dyn_state, start_obs [B, o]) -> (RolloutBatch, metrics)`; B is
    chunked by `config.chunk_size`, so 1M imagined steps (B = 1M / horizon) is one call with memory bounded
    by the chunk plus the output."""

    def fn(key, policy_params, dyn_state, start_obs):
        return rollout(
            key, policy_params, dyn_state, start_obs,
            policy_fn=policy_fn, termination_fn=termination_fn, config=config,
        )

    return jax.jit(fn)

"""Imagined rollouts in the conservative model MDP (paper section 4.3, Algorithm 1, inner loops).

`imagine` is Algorithm 1's data collection for one iteration: start states drawn uniformly from D_beta,
then `rollout`: from each start state the current policy acts for `horizon` steps; at every step every
trajectory draws an ensemble member uniformly (from all N members, as the paper's Algorithm 1, or from the
elites, as MOPO), samples (s', r) from that member's Gaussian (`model_step`), and gets the penalised reward
r~ = r - lambda * u(s, a) (`penalised_reward`). Trajectories stop at predicted termination: a trajectory
that terminates at step k (1-based) yields exactly k valid rows, the k-th with terminal=1; later rows are
computed (static shapes) but flagged invalid and never reach a buffer.

Uncertainty u(s, a) (`uncertainty`), over the set M of members the rollout draws from, sigma_i = predicted
std over the obs_dim + 1 target dims [s' - s, r]:
- "max_std" (default; the paper's max_i ||Sigma_i(s, a)||_F as SPEC reads it, "largest predicted standard
  deviation"): u = max_{i in M} ||sigma_i||_2.
- "max_aleatoric" (MOPO's `penalty_learned_var=True`, exactly, with members="elites"): the same norm, but
  the max runs over ALL members, elites or not (MOPO predicts with all 7 networks and samples only from the
  elites).
- "ensemble_disagreement" (MOPO's `penalty_learned_var=False`): u = max_{i in M} ||mu_i^obs - mean_j
  mu_j^obs||_2 over the next-observation dims only.

How it is computed: start states are processed in chunks (`lax.map` over chunks, `lax.scan` over the
horizon inside), so activation memory is bounded by the chunk and 1M imagined steps are one compiled call.
Every step evaluates the members of M on the shared inputs in the network's feature-major layout
([|M|, obs_dim + 1, C]); all of M's outputs are needed for the penalty anyway, and only the drawn member's
Gaussian is sampled. Two scheduling choices are kept for speed (DESIGN.md): a chunk's member indices and
Gaussian noise are drawn once before its horizon loop (`draw_chunk`), and the drawn member's row is picked
by a sum of selects rather than a gather (`_pick_member`); `tests/test_rollout.py` checks the chunk equals
the plain step-by-step `model_step` with the same draws.

Trajectories whose prediction is not finite (state, reward or uncertainty) are stopped and that row is
invalid, so no NaN/inf can reach the buffer. After a stop, a trajectory keeps its last valid state so the
(masked) remaining steps stay finite.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from mb2po_jax import dynamics as dyn
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import TerminationFn

PolicyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, key, obs [B,o]) -> act [B,a]

PENALTIES = ("max_std", "max_aleatoric", "ensemble_disagreement")
MEMBER_SETS = ("all", "elites")  # whom a rollout draws from and penalises over


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The conservative MDP's rollout settings (also `MB2POConfig`'s, which extends this class). Paper: h and
    lambda per task (MOPO's table, SPEC section 4)."""

    horizon: int = 5  # h
    penalty_coef: float = 1.0  # lambda (the task's; `capped_penalty_coef` may lower it per ensemble)
    # rho of `capped_penalty_coef`: the most of the data's mean |r| that lambda * mean u may take on the
    # data itself; 0 (the paper) turns the cap off. The `smoke` and `cpu` presets use 0.5.
    max_penalty_share: float = 0.0
    # rho of `capped_penalty_coef` when > 0: lambda per seed is set so that lambda * mean u takes exactly this
    # share of the data's mean |r| on the data, in place of the task's lambda; 0 (the paper) keeps the task's.
    # The `smoke` and `cpu` presets use 0.5 (issue 18's rule, DESIGN.md).
    penalty_share: float = 0.0
    penalty: str = "max_std"  # u(s, a), see the module docstring
    rollout_members: str = "all"  # whom a rollout draws from and penalises over: "all" (the paper), "elites" (MOPO)
    # Max trajectories per chunk (None: by backend, see `default_chunk_size`). Bounds activation memory
    # (|M| x chunk x 200 floats per layer) and sets the matmul shapes.
    chunk_size: int | None = None

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ConfigError(f"rollout: penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if not (math.isfinite(self.penalty_coef) and self.penalty_coef >= 0):  # NaN fails too
            raise ConfigError(f"--penalty_coef must be a number >= 0 (a negative lambda would reward the "
                              f"models' uncertainty), got {self.penalty_coef}")
        if not (math.isfinite(self.max_penalty_share) and self.max_penalty_share >= 0):
            raise ConfigError(f"--max_penalty_share must be a number >= 0 (0 turns the cap off), "
                              f"got {self.max_penalty_share}")
        if not (math.isfinite(self.penalty_share) and self.penalty_share >= 0):
            raise ConfigError(f"--penalty_share must be a number >= 0 (0 keeps the task's lambda), "
                              f"got {self.penalty_share}")
        if self.rollout_members not in MEMBER_SETS:
            raise ConfigError(f"--rollout_members must be one of {', '.join(MEMBER_SETS)}, "
                              f"got {self.rollout_members!r}")
        if self.horizon < 1 or (self.chunk_size is not None and self.chunk_size < 1):
            raise ConfigError(
                f"rollout: horizon and chunk_size must be >= 1, got {self.horizon}, {self.chunk_size}"
            )


def default_chunk_size() -> int:
    """Trajectories per chunk by backend: 1024 on CPU (small chunks keep the [|M|, 200, C] activations in
    cache), 65536 on GPU/TPU (enough to fill the device; one chunk of a 1M-step iteration is
    5 x 65536 x 200 x 4 B = 262 MB per activation)."""
    return 1024 if jax.default_backend() == "cpu" else 65536


def sample_start_states(key: jax.Array, observations: jax.Array, num_starts: int) -> jax.Array:
    """Uniform draws (with replacement) from the dataset's observations [N, o] -> [num_starts, o]."""
    idx = jax.random.randint(key, (num_starts,), 0, observations.shape[0])
    return observations[idx]


def member_sets(dyn_state: dyn.DynamicsState, config: RolloutConfig):
    """(members evaluated F [|F|] int32, positions within F that trajectories draw from [|M|] int32)."""
    e = dyn_state.config.num_members
    if config.rollout_members == "all":
        everyone = jnp.arange(e, dtype=jnp.int32)
        return everyone, everyone
    if config.penalty == "max_aleatoric":
        # MOPO: penalty over all members, draws from the elites.
        return jnp.arange(e, dtype=jnp.int32), dyn_state.elites
    return dyn_state.elites, jnp.arange(dyn_state.elites.shape[0], dtype=jnp.int32)


def uncertainty(mean: jax.Array, var: jax.Array, obs_dim: int, penalty: str, feature_axis: int = -1) -> jax.Array:
    """The paper's u(s, a) from the outputs of the members the penalty runs over: mean, var [|M|, C, d]
    (or [|M|, d, C] with feature_axis=1) -> u [C]."""
    if penalty == "ensemble_disagreement":
        mu = jax.lax.slice_in_dim(mean, 0, obs_dim, axis=feature_axis)  # the added obs cancels
        return jnp.max(jnp.linalg.norm(mu - jnp.mean(mu, axis=0), axis=feature_axis), axis=0)
    # max_std / max_aleatoric: max_i ||sigma_i||_2 = sqrt(max_i sum_d var_i,d)
    return jnp.sqrt(jnp.max(jnp.sum(var, axis=feature_axis), axis=0))


def penalised_reward(reward: jax.Array, u: jax.Array, penalty_coef: float | jax.Array) -> jax.Array:
    """The conservative MDP's reward r~(s, a) = r(s, a) - lambda * u(s, a) (paper eq. for the P-MDP)."""
    return reward - penalty_coef * u


def dataset_uncertainty(dyn_state: dyn.DynamicsState, observations: jax.Array, actions: jax.Array,
                        config: RolloutConfig, max_rows: int = 20_000) -> jax.Array:
    """Mean u(s, a) of one ensemble over D_beta's own pairs (actions in the policy's scale), over the
    members the rollout penalises with (`member_sets`). Deterministic: every k-th row, at most `max_rows`."""
    stride = max(1, -(-observations.shape[0] // max_rows))
    members, _ = member_sets(dyn_state, config)
    x = dyn.normalize_inputs(dyn_state, observations[::stride], actions[::stride])
    mean, var = dyn.ensemble_mean_var(dyn.take_members(dyn_state.params, members), x)  # [|F|, C, d]
    return jnp.mean(uncertainty(mean, var, dyn_state.obs_dim, config.penalty))


def capped_penalty_coef(penalty_coef: float, max_share: float, mean_abs_reward: float | jax.Array,
                        mean_u: jax.Array, share: float = 0.0) -> jax.Array:
    """The lambda a rollout uses (deviations from the paper, DESIGN.md). With `share` = rho_s > 0, lambda =
    rho_s * mean|r_D| / mean u_D, in place of the given one: on the dataset's own pairs the penalty takes
    exactly that share of the mean reward, whatever the ensemble's scale of uncertainty. Then the cap:
    lambda_eff = min(lambda, rho * mean|r_D| / mean u_D), so that the penalty takes at most the share rho
    (`max_share`) of the mean reward. The task table's lambda was tuned for MOPO's ensembles on D4RL; an
    ensemble much less certain on its data (walker2d medium-replay) penalises in-data behaviour more than it
    rewards it, and a much more certain one (hopper medium-expert at 100k updates) hardly penalises anything
    (RESULTS.md). share = 0: lambda as given; max_share = 0: no cap. Works per seed (mean_u [S] -> [S])."""
    scale = mean_abs_reward / jnp.maximum(mean_u, 1e-8)
    lam = (share * scale if share > 0 else jnp.full(jnp.shape(mean_u), penalty_coef)).astype(jnp.float32)
    if max_share <= 0:
        return lam
    return jnp.minimum(lam, max_share * scale)


def model_step(obs: jax.Array, act: jax.Array, dyn_state: dyn.DynamicsState, params: dyn.Params,
               drawn: jax.Array, eps: jax.Array, *, penalty: str, pick=None):
    """One imagined step of C trajectories, in its plain form: every evaluated member's Gaussian at (s, a),
    the uncertainty over them, and a sample of member `drawn` [C] (indices into params' members) with
    standard-normal noise eps [d, C]. Returns (s' [C, o], model reward r [C], u [C]).
    pick(z [|F|, d, C], drawn) -> [d, C] selects the drawn member's row (default: a gather)."""
    pick = pick or (lambda z, m: jnp.take_along_axis(z, m[None, None, :], axis=0)[0])
    x = dyn.normalize_inputs(dyn_state, obs, act)  # [C, in]
    mean, var = dyn.ensemble_mean_var(params, x, feature_major=True)  # [|F|, d, C]
    u = uncertainty(mean, var, dyn_state.obs_dim, penalty, feature_axis=1)
    y = (pick(mean, drawn) + jnp.sqrt(pick(var, drawn)) * eps).T  # [C, d]: s' - s and r
    return obs + y[:, :dyn_state.obs_dim], y[:, dyn_state.obs_dim], u


def _pick_member(z: jax.Array, drawn: jax.Array) -> jax.Array:
    """`model_step`'s default pick as a sum of |F| selects: one elementwise loop on XLA:CPU, where the
    gather (and a masked reduce over members) is much slower. Same values."""
    return sum(jnp.where(drawn == f, z[f], 0.0) for f in range(z.shape[0]))


def draw_chunk(key: jax.Array, draw_pos: jax.Array, horizon: int, num_traj: int, target_dim: int, dtype):
    """A chunk's random draws for its whole horizon at once (on CPU every threefry draw is a small loop of
    its own): (policy keys [h, 2], drawn members [h, C] as positions among the evaluated members, drawn
    uniformly from `draw_pos` as Algorithm 1's "uniformly sample T from {T_i}", noise [h, d, C])."""
    k_policy, k_member, k_noise = jax.random.split(key, 3)
    members = draw_pos[jax.random.randint(k_member, (horizon, num_traj), 0, draw_pos.shape[0])]
    noise = jax.random.normal(k_noise, (horizon, target_dim, num_traj), dtype)
    return jax.random.split(k_policy, horizon), members, noise


def _rollout_chunk(
    key: jax.Array,
    policy_params: Any,
    dyn_state: dyn.DynamicsState,
    params: dyn.Params,
    draw_pos: jax.Array,
    start_obs: jax.Array,
    start_alive: jax.Array,
    penalty_coef: jax.Array,
    *,
    policy_fn: PolicyFn,
    termination_fn: TerminationFn,
    config: RolloutConfig,
):
    """One chunk: start_obs [C, o], start_alive [C] bool -> per-step arrays [horizon, C, ...].
    params: the evaluated members F (leading axis |F|); draw_pos: positions in F trajectories draw from."""
    xs = draw_chunk(key, draw_pos, config.horizon, start_obs.shape[0], dyn_state.obs_dim + 1, start_obs.dtype)

    def step(carry, xs):
        obs, alive = carry  # [C, o], [C]
        k_pi, drawn, eps = xs  # key, [C], [d, C]
        act = policy_fn(policy_params, k_pi, obs)  # [C, a]
        next_obs, reward, u = model_step(obs, act, dyn_state, params, drawn, eps, penalty=config.penalty,
                                         pick=_pick_member)
        finite = jnp.all(jnp.isfinite(next_obs), axis=-1) & jnp.isfinite(reward) & jnp.isfinite(u)
        valid = alive & finite
        done = termination_fn(obs, act, next_obs) & valid
        alive_next = valid & ~done
        out = (obs, act, penalised_reward(reward, u, penalty_coef), next_obs, done, valid, u, reward,
               alive & ~finite)
        # Stopped trajectories keep their last valid state so the masked steps stay finite.
        obs = jnp.where(alive_next[:, None], next_obs, obs)
        return (obs, alive_next), out

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
    penalty_coef: float | jax.Array | None = None,
) -> tuple[Transitions, jax.Array, dict[str, jax.Array]]:
    """Pure, jittable (close over / mark static everything after `start_obs` but `penalty_coef`, the
    lambda to use, default `config.penalty_coef`; a traced scalar is fine, e.g. `capped_penalty_coef`'s).

    start_obs: [B, o]. Returns (transitions with horizon * B rows, row t * B + b = step t of start b;
    rewards penalised, terminals the predicted termination as 0/1 floats; valid [horizon * B] bool, False
    after a trajectory stopped (never store or sample those rows); metrics). Metrics (scalars):
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
    lam = config.penalty_coef if penalty_coef is None else penalty_coef
    chex.assert_rank(lam, 0)  # one lambda per rollout (a seed's [S] lambda is vmapped outside)
    members, draw_pos = member_sets(dyn_state, config)
    params = dyn.take_members(dyn_state.params, members)  # [|F|, ...], gathered once for all chunks
    chunk_fn = lambda args: _rollout_chunk(
        args[0], policy_params, dyn_state, params, draw_pos, args[1], args[2], lam,
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
    transitions = Transitions(observations=obs, actions=act, rewards=rew, next_observations=next_obs,
                              terminals=done.astype(rew.dtype))
    num_valid = jnp.sum(valid)
    denom = jnp.maximum(num_valid, 1).astype(jnp.float32)
    vmean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / denom
    metrics = {
        "mean_raw_reward": vmean(raw_rew),
        "mean_penalty": vmean(lam * u),
        "mean_uncertainty": vmean(u),
        "fraction_terminated": jnp.sum(done) / b,
        "num_valid": num_valid,
        "num_nonfinite": jnp.sum(nonfinite),
    }
    return transitions, valid, metrics


def imagine(key: jax.Array, policy_params: Any, dyn_state: dyn.DynamicsState, dataset_observations: jax.Array,
            num_starts: int, *, policy_fn: PolicyFn, termination_fn: TerminationFn,
            config: RolloutConfig = RolloutConfig(),
            penalty_coef: float | jax.Array | None = None) -> tuple[Transitions, jax.Array, dict[str, jax.Array]]:
    """Algorithm 1's data collection for one iteration (pure): `num_starts` start states drawn uniformly
    from D_beta's observations [N, o], rolled out in the model (`rollout`'s outputs)."""
    k_start, k_roll = jax.random.split(key)
    start = sample_start_states(k_start, dataset_observations, num_starts)
    return rollout(k_roll, policy_params, dyn_state, start, policy_fn=policy_fn, termination_fn=termination_fn,
                   config=config, penalty_coef=penalty_coef)


def make_rollout_fn(
    policy_fn: PolicyFn,
    termination_fn: TerminationFn,
    config: RolloutConfig = RolloutConfig(),
) -> Callable[[jax.Array, Any, dyn.DynamicsState, jax.Array], tuple[Transitions, jax.Array, dict]]:
    """Jitted `fn(key, policy_params, dyn_state, start_obs [B, o]) -> (transitions, valid, metrics)`; B is
    chunked by `config.chunk_size`, so 1M imagined steps (B = 1M / horizon) is one call with memory bounded
    by the chunk plus the output."""

    def fn(key, policy_params, dyn_state, start_obs):
        return rollout(
            key, policy_params, dyn_state, start_obs,
            policy_fn=policy_fn, termination_fn=termination_fn, config=config,
        )

    return jax.jit(fn)

"""Probabilistic dynamics ensemble (paper section 4.3, Algorithm 1 line 2; priors from MBPO/MOPO).

Each of E members is an MLP (swish) mapping standardised (s, a) to a diagonal Gaussian over the target
y = [s' - s, r] (dim obs_dim + 1, reward LAST). Parameters are explicit arrays stacked on a leading member
axis ([E, in, out] per layer), not `nn.vmap(nn.Dense)`: the HLO is the same batched dot either way, and
plain arrays make the per-member snapshot restore (`jnp.where` on the member axis), the elite gather
(`p[elites]`) one-liners. Training evaluates every layer as ONE batched matmul over the members' own
minibatches, with feature-major activations (`einsum('eio,eib->eob')`, see `ensemble_mlp`; the faster layout on
CPU, DESIGN.md). In a rollout all members see the same (s, a), so the first layer is one shared matmul.

Design decisions (SPEC section 1 stage 2, section 3 traps):
- Inputs are standardised with mean/std of the TRAINING split (stored in the state). Targets are NOT
  standardised, as in MBPO/MOPO: the Gaussian NLL with a learned variance is invariant to per-dimension
  target scale up to a constant, and raw targets keep the learned log-variance bounds (init 0.5 / -10) and
  hence the uncertainty penalty in the units MOPO's per-task lambda values were tuned for.
- Log-variance soft-clamped between learned per-member bounds (MBPO's `max_logvar - softplus(max - lv)`,
  `min + softplus(lv - min)`, computed in the equivalent closed form of `bounded_var`), with loss term
  `logvar_loss_coef * (sum max_logvar - sum min_logvar)`. The bounds are per member and per dim (MBPO
  shares one vector across members) so a member's best snapshot includes its own bounds.
- Loss per member: Gaussian NLL (mean over batch, SUM over target dims, i.e. the joint diagonal-Gaussian
  NLL without the 2*pi constant) + per-layer L2 `decay_l * 0.5 * ||W_l||^2` (MBPO's decays). MBPO averages
  the NLL over dims instead; summing makes the decay and bound terms ~(obs_dim+1) times weaker relative
  to the data term.
- Each member trains on its own bootstrap resample of the training split ([E, N_train] indices drawn with
  replacement once per fit, visited in a new random order every epoch), so members see different minibatches at
  every step (SPEC section 3: shared minibatches destroy the diversity the penalty relies on).
- Holdout: `min(holdout_fraction * N, max_holdout)` rows (at least 1), the same rows for all members. MOPO
  (OfflineRL-Kit) caps holdout at 1000, MBPO at 5000; we default to 5000 because the holdout MSE picks the
  snapshot and the elites, and at 1M-row datasets 5000 held-out rows cost nothing.
- Per-member early stopping (MBPO): after every epoch a member's snapshot is replaced when its holdout MSE
  improves by more than `improvement_threshold` relative; training stops when no member has improved for
  `max_epochs_since_improvement` epochs; the end of fitting restores each member's best snapshot. Elites are
  the `num_elites` members with the lowest snapshot holdout MSE.
- One compiled call trains a whole epoch: a `fori_loop` over minibatches (dynamic trip count so that a
  `max_steps` budget is honoured exactly) followed by the holdout evaluation and the snapshot update.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mb2po_jax.errors import ConfigError, DataError

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """Ensemble hyperparameters: the paper's N = 5 members (section 4.3); the rest MBPO/MOPO's. Elites (the
    members with the lowest holdout MSE) matter only to rollouts with members="elites" (MOPO's 7 / 5)."""

    num_members: int = 5
    num_elites: int = 5
    hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    learning_rate: float = 1e-3
    # L2 coefficient per layer (len(hidden_dims) + 1 entries), MBPO's values for 4 x 200.
    weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    batch_size: int = 256
    holdout_fraction: float = 0.1
    max_holdout: int = 5000
    max_epochs_since_improvement: int = 5
    # A snapshot is replaced only if holdout MSE improves by more than this fraction (MBPO: 1%).
    improvement_threshold: float = 0.01
    logvar_loss_coef: float = 0.01
    max_logvar_init: float = 0.5
    min_logvar_init: float = -10.0

    def __post_init__(self):
        if self.num_members < 1:
            raise ConfigError(f"--num_members must be >= 1, got {self.num_members}")
        if not 1 <= self.num_elites <= self.num_members:
            raise ConfigError(
                f"--num_elites must be in [1, --num_members={self.num_members}], got {self.num_elites}"
            )
        if len(self.weight_decay) != len(self.hidden_dims) + 1:
            raise ConfigError(
                f"dynamics: weight_decay needs one value per layer ({len(self.hidden_dims) + 1} for "
                f"hidden_dims={self.hidden_dims}), got {len(self.weight_decay)}"
            )
        # Named by their flags (config.DYNAMICS_FLAGS); comparisons written so that NaN fails them too.
        checks = [
            ("--dynamics_lr", self.learning_rate, math.isfinite(self.learning_rate) and self.learning_rate >= 0,
             "a number >= 0"),
            ("--dynamics_weight_decay", self.weight_decay,
             all(math.isfinite(w) and w >= 0 for w in self.weight_decay), "numbers >= 0"),
            ("--dynamics_hidden_dims", self.hidden_dims, all(w >= 1 for w in self.hidden_dims), "widths >= 1"),
            ("--dynamics_batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("--holdout_fraction", self.holdout_fraction, 0.0 < self.holdout_fraction < 1.0, "in (0, 1)"),
            ("--max_holdout", self.max_holdout, self.max_holdout >= 1, ">= 1"),
            ("--max_epochs_since_improvement", self.max_epochs_since_improvement,
             self.max_epochs_since_improvement >= 1, ">= 1"),
            ("dynamics: improvement_threshold", self.improvement_threshold,
             0.0 <= self.improvement_threshold < 1.0, "in [0, 1)"),
            ("dynamics: logvar_loss_coef", self.logvar_loss_coef,
             math.isfinite(self.logvar_loss_coef) and self.logvar_loss_coef >= 0, "a number >= 0"),
        ]
        for name, value, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {value}")


class DynamicsState(struct.PyTreeNode):
    """Everything a checkpoint needs to resume or use the ensemble; all array leaves, member axis first.

    `params` are the weights being trained; `best_params` each member's best-holdout snapshot (after
    `fit_dynamics` returns, `params` equals `best_params`).
    """

    params: Params  # {"layers": [{"w": [E,i,o], "b": [E,1,o]}...], "max_logvar"/"min_logvar": [E,1,d]}
    opt_state: Any
    input_mean: jax.Array  # [obs_dim + act_dim]
    input_std: jax.Array  # [obs_dim + act_dim]
    best_params: Params
    best_holdout_mse: jax.Array  # [E] float32, inf before the first evaluation
    elites: jax.Array  # [num_elites] int32, ascending holdout MSE
    epoch: jax.Array  # int32 scalar, epochs trained
    step: jax.Array  # int32 scalar, minibatch updates made
    epochs_since_improvement: jax.Array  # int32 scalar
    obs_dim: int = struct.field(pytree_node=False)
    act_dim: int = struct.field(pytree_node=False)
    config: DynamicsConfig = struct.field(pytree_node=False)

    @property
    def target_dim(self) -> int:
        return self.obs_dim + 1


# ----------------------------------------------------------------------------------------------------------
# Network


def layer_sizes(config: DynamicsConfig, obs_dim: int, act_dim: int) -> list[int]:
    """Widths of each member's layers, input to output; the output holds the mean and raw log-variance of
    [delta_obs, reward]."""
    return [obs_dim + act_dim, *config.hidden_dims, 2 * (obs_dim + 1)]


def init_params(key: jax.Array, obs_dim: int, act_dim: int, config: DynamicsConfig) -> Params:
    """MBPO's init: truncated normal, std 1 / (2 sqrt(fan_in)), zero biases; independent per member."""
    sizes = layer_sizes(config, obs_dim, act_dim)
    e, d = config.num_members, obs_dim + 1
    shapes = [(e, fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]
    # One draw for all layers, then sliced: each random op compiles its own threefry loop (slow).
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(math.prod(s) for s in shapes),), jnp.float32)
    layers, start = [], 0
    for shape in shapes:
        w = flat[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
        layers.append({"w": w / (2.0 * math.sqrt(shape[1])), "b": jnp.zeros((e, 1, shape[2]), jnp.float32)})
    return {
        "layers": layers,
        "max_logvar": jnp.full((e, 1, d), config.max_logvar_init, jnp.float32),
        "min_logvar": jnp.full((e, 1, d), config.min_logvar_init, jnp.float32),
    }


def ensemble_apply(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Means and bounded log-variances of all members.

    x: [B, in] (the same standardised inputs for every member, e.g. in a rollout) or [E, B, in] (one batch
    per member, e.g. bootstrap minibatches). Returns (mean, logvar), each [E, B, d] over [delta_obs, r].
    """
    mean, var = ensemble_mean_var(params, x)
    return mean, jnp.log(var)


def ensemble_mean_var(
    params: Params, x: jax.Array, feature_major: bool = False
) -> tuple[jax.Array, jax.Array]:
    """As `ensemble_apply` but returns the variance (what sampling and the penalty need): [E, B, d] x 2,
    or [E, d, B] x 2 with `feature_major=True` (the layout the network computes in: the rollout picks the
    drawn member's row and reduces over members without transposing the [E, 2d, B] output).
    """
    h = ensemble_mlp(params, x)
    d = h.shape[1] // 2  # h: [E, 2d, B]
    bound = lambda b: jnp.swapaxes(b, 1, 2)  # [E, 1, d] -> [E, d, 1]
    mean = h[:, :d]
    var = bounded_var(h[:, d:], bound(params["max_logvar"]), bound(params["min_logvar"]))
    if feature_major:
        return mean, var
    return jnp.swapaxes(mean, 1, 2), jnp.swapaxes(var, 1, 2)


def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2: the same function, but XLA:CPU evaluates
    tanh with a short polynomial where `jax.nn.swish` costs an exp and a divide per element (DESIGN.md)."""
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def ensemble_mlp(params: Params, x: jax.Array) -> jax.Array:
    """x: [B, in] (shared by all members) or [E, B, in] -> [E, 2d, B]: mean rows, then unbounded log-variance
    rows, feature-major."""
    layers = params["layers"]
    # Feature-major activations [E, features, B]: the batch is the minor (contiguous) axis of every
    # matmul output, which XLA:CPU runs faster than batch-major (`ebi,eio->ebo`; DESIGN.md). Only the
    # narrow input and output are transposed.
    # The barrier makes the transposed input a real array: otherwise XLA folds the transpose into the
    # first layer's weight-gradient dot, which XLA:CPU then runs far more slowly.
    x = jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))  # [..., in, B]
    if x.ndim == 2 and len(layers) > 1:
        # Shared inputs: the first layer of all members is ONE [E*H, in] x [in, B] matmul whose output
        # already is the feature-major [E, H, B] (faster than a batched [E, H, in] x [in, B] dot over a
        # broadcast input: K = in is tiny and each member's N alone is small).
        w = jnp.swapaxes(layers[0]["w"], 1, 2)  # [E, H, in]
        e, hdim = w.shape[:2]
        h = (w.reshape(e * hdim, -1) @ x).reshape(e, hdim, -1) + jnp.swapaxes(layers[0]["b"], 1, 2)
        h, layers = swish(h), layers[1:]
    else:  # [E, in, B], or a shared [in, B] broadcast to every member (no hidden layer)
        h = x if x.ndim == 3 else jnp.broadcast_to(x, (layers[0]["w"].shape[0],) + x.shape)
    for i, layer in enumerate(layers):
        h = jnp.einsum("eio,eib->eob", layer["w"], h) + jnp.swapaxes(layer["b"], 1, 2)
        if i < len(layers) - 1:
            h = swish(h)
    return h


def bounded_var(raw_logvar: jax.Array, max_logvar: jax.Array, min_logvar: jax.Array) -> jax.Array:
    """exp of MBPO's soft clamp, in closed form.

    MBPO: lv = max - softplus(max - raw); lv = min + softplus(lv - min). Exponentiating,
    exp(lv) = exp(min) + exp(max) * sigmoid(raw - max) exactly (softplus(z) = log(1 + e^z)). One sigmoid
    instead of two softplus, which XLA:CPU lowers to slow code. Gradients still flow at the bounds, unlike a
    hard clip.
    """
    return jnp.exp(min_logvar) + jnp.exp(max_logvar) * jax.nn.sigmoid(raw_logvar - max_logvar)


def take_members(params: Params, members: jax.Array) -> Params:
    """Sub-ensemble (e.g. the elites): gathers the leading member axis of every leaf."""
    return jax.tree_util.tree_map(lambda p: p[members], params)


def normalize_inputs(state: DynamicsState, obs: jax.Array, act: jax.Array) -> jax.Array:
    """[B, o], [B, a] -> standardised [B, o + a]."""
    return (jnp.concatenate([obs, act], axis=-1) - state.input_mean) / state.input_std


def predict(state: DynamicsState, obs: jax.Array, act: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-member Gaussian over (next_obs, reward).

    obs: [B, o], act: [B, a]. Returns (mean, std), each [E, B, o + 1]: mean[..., :o] is the predicted next
    observation (delta already added to obs), mean[..., o] the reward; std is in the same (raw) units.
    """
    chex.assert_rank([obs, act], 2)
    chex.assert_shape(obs, (None, state.obs_dim))
    chex.assert_shape(act, (obs.shape[0], state.act_dim))
    mean, logvar = ensemble_apply(state.params, normalize_inputs(state, obs, act))
    next_obs = mean[..., : state.obs_dim] + obs
    mean = jnp.concatenate([next_obs, mean[..., state.obs_dim :]], axis=-1)
    return mean, jnp.exp(0.5 * logvar)


def _gaussian_nll(mean: jax.Array, logvar: jax.Array, target: jax.Array) -> jax.Array:
    """[E, B, d] -> [E]: mean over batch of the summed-over-dims NLL (without the 2*pi constant)."""
    per_row = 0.5 * jnp.sum(jnp.square(mean - target) * jnp.exp(-logvar) + logvar, axis=-1)
    return jnp.mean(per_row, axis=-1)


def _weight_decay(params: Params, config: DynamicsConfig) -> jax.Array:
    """[E]: sum over layers of decay_l * 0.5 * ||W_l||^2 (biases and log-var bounds are not decayed)."""
    terms = [
        c * 0.5 * jnp.sum(jnp.square(layer["w"]), axis=(1, 2))
        for c, layer in zip(config.weight_decay, params["layers"])
    ]
    return sum(terms)


def ensemble_loss(
    params: Params, inputs: jax.Array, targets: jax.Array, config: DynamicsConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """inputs: [E, B, in] standardised, targets: [E, B, d]. Members are independent: the total is a sum."""
    mean, logvar = ensemble_apply(params, inputs)
    nll = _gaussian_nll(mean, logvar, targets)  # [E]
    decay = _weight_decay(params, config)  # [E]
    bounds = config.logvar_loss_coef * (
        jnp.sum(params["max_logvar"]) - jnp.sum(params["min_logvar"])
    )
    loss = jnp.sum(nll + decay) + bounds
    return loss, {"train_nll": nll, "weight_decay": decay, "logvar_bound_loss": bounds}


def make_optimizer(config: DynamicsConfig) -> optax.GradientTransformation:
    # Weight decay is in the loss (MBPO's L2 term), so plain Adam.
    return optax.adam(config.learning_rate)


# ----------------------------------------------------------------------------------------------------------
# State, data preparation, evaluation


def init_dynamics(
    key: jax.Array, obs_dim: int, act_dim: int, config: DynamicsConfig, train_inputs: jax.Array
) -> DynamicsState:
    """Fresh ensemble; the input normaliser comes from `train_inputs` [N, obs_dim + act_dim] (raw (s, a))."""
    train_inputs = jnp.asarray(train_inputs, jnp.float32)
    chex.assert_shape(train_inputs, (None, obs_dim + act_dim))
    return _init_dynamics(key, obs_dim, act_dim, config, train_inputs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # one compiled call instead of ~50 eager ops
def _init_dynamics(key, obs_dim, act_dim, config, train_inputs) -> DynamicsState:
    mean = jnp.mean(train_inputs, axis=0)
    std = jnp.std(train_inputs, axis=0)
    # Constant input columns (e.g. an unused action dim) would divide by zero: leave them unscaled.
    std = jnp.where(std < 1e-6, 1.0, std)
    params = init_params(key, obs_dim, act_dim, config)
    e = config.num_members
    return DynamicsState(
        params=params,
        opt_state=make_optimizer(config).init(params),
        input_mean=mean,
        input_std=std,
        best_params=params,
        best_holdout_mse=jnp.full((e,), jnp.inf, jnp.float32),
        elites=jnp.arange(config.num_elites, dtype=jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        epochs_since_improvement=jnp.zeros((), jnp.int32),
        obs_dim=obs_dim,
        act_dim=act_dim,
        config=config,
    )


def _field(data: Any, name: str) -> Any:
    if isinstance(data, Mapping):
        return data.get(name)
    return getattr(data, name, None)


def transitions_to_arrays(transitions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Raw model inputs [N, o + a] and targets [N, o + 1] = [s' - s, r] (host numpy, float32).

    `transitions`: a mapping or object with `observations, actions, rewards, next_observations` and
    optionally `next_valid` ([N], 0 where s' is not the true successor: those rows are dropped, they are no
    dynamics targets).
    """
    obs = np.asarray(_field(transitions, "observations"), np.float32)
    act = np.asarray(_field(transitions, "actions"), np.float32)
    rew = np.asarray(_field(transitions, "rewards"), np.float32).reshape(-1)
    next_obs = np.asarray(_field(transitions, "next_observations"), np.float32)
    if obs.ndim != 2 or act.ndim != 2 or next_obs.shape != obs.shape or not (
        act.shape[0] == rew.shape[0] == obs.shape[0]
    ):
        raise DataError(
            f"dynamics: inconsistent transition shapes observations {obs.shape}, actions {act.shape}, "
            f"rewards {rew.shape}, next_observations {next_obs.shape}"
        )
    inputs = np.concatenate([obs, act], axis=1)
    targets = np.concatenate([next_obs - obs, rew[:, None]], axis=1)
    next_valid = _field(transitions, "next_valid")
    if next_valid is not None:
        keep = np.asarray(next_valid).reshape(-1) > 0.5
        inputs, targets = inputs[keep], targets[keep]
    return inputs, targets


def split_holdout(
    key: jax.Array, inputs: np.ndarray, targets: np.ndarray, config: DynamicsConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random train/holdout split (host side): ({"inputs", "targets"} x 2), raw (un-standardised) inputs."""
    n = inputs.shape[0]
    num_holdout = max(1, min(int(n * config.holdout_fraction), config.max_holdout))
    if n - num_holdout < config.batch_size:
        raise DataError(
            f"dynamics: {n} usable transitions leave {n - num_holdout} for training after a "
            f"{num_holdout}-row holdout, fewer than batch_size={config.batch_size}"
        )
    # Host-side shuffle seeded from the key (an eager jax permutation would compile for every new N).
    perm = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist()).permutation(n)
    hold, train = perm[:num_holdout], perm[num_holdout:]
    return (
        {"inputs": inputs[train], "targets": targets[train]},
        {"inputs": inputs[hold], "targets": targets[hold]},
    )


def make_epoch_data(
    key: jax.Array, state: DynamicsState, train: Mapping[str, Any], holdout: Mapping[str, Any]
) -> dict[str, jax.Array]:
    """Device arrays for `epoch_fn`: standardised inputs, targets and per-member bootstrap indices.

    bootstrap: [E, N_train] int32, each row N_train draws with replacement (one bootstrap set per member).
    """
    return _make_epoch_data(
        key, state, *(jnp.asarray(x[k], jnp.float32) for x in (train, holdout) for k in ("inputs", "targets"))
    )


@jax.jit
def _make_epoch_data(key, state, train_inputs, train_targets, holdout_inputs, holdout_targets):
    n = train_inputs.shape[0]
    norm = lambda x: (x - state.input_mean) / state.input_std
    return {
        "inputs": norm(train_inputs),  # [N_train, in]
        "targets": train_targets,  # [N_train, d]
        "bootstrap": jax.random.randint(key, (state.config.num_members, n), 0, n, dtype=jnp.int32),
        "holdout_inputs": norm(holdout_inputs),  # [N_hold, in]
        "holdout_targets": holdout_targets,  # [N_hold, d]
    }


def evaluate_holdout(
    state: DynamicsState, inputs: jax.Array, targets: jax.Array, params: Params | None = None
) -> dict[str, jax.Array]:
    """Per-member holdout metrics, each [E]: `mse` of the mean (averaged over rows and target dims; MBPO's
    selection criterion) and `nll` (mean over rows of the full diagonal-Gaussian NLL, 2*pi included).

    inputs: [N, in] ALREADY standardised (as in `make_epoch_data`), targets: [N, d].
    """
    params = state.params if params is None else params
    mean, logvar = ensemble_apply(params, inputs)  # [E, N, d]
    mse = jnp.mean(jnp.square(mean - targets), axis=(1, 2))
    d = targets.shape[-1]
    nll = _gaussian_nll(mean, logvar, targets) + 0.5 * d * math.log(2 * math.pi)
    return {"mse": mse, "nll": nll}


def update_snapshots(state: DynamicsState, holdout_mse: jax.Array) -> tuple[DynamicsState, jax.Array]:
    """MBPO's per-member `_save_best`: keep params of members whose holdout MSE improved by more than
    `improvement_threshold` (relative); count epochs without any improvement; re-rank elites.
    Returns (state, improved [E] bool)."""
    cfg = state.config
    best = state.best_holdout_mse
    improved = holdout_mse < best * (1.0 - cfg.improvement_threshold)  # inf best: always improves
    improved = improved & jnp.isfinite(holdout_mse)

    def pick(new, old):  # leaves carry the member axis first
        mask = improved.reshape((-1,) + (1,) * (new.ndim - 1))
        return jnp.where(mask, new, old)

    best_params = jax.tree_util.tree_map(pick, state.params, state.best_params)
    best = jnp.where(improved, holdout_mse, best)
    since = jnp.where(jnp.any(improved), 0, state.epochs_since_improvement + 1)
    elites = jnp.argsort(best)[: cfg.num_elites].astype(jnp.int32)
    state = state.replace(
        best_params=best_params, best_holdout_mse=best, epochs_since_improvement=since, elites=elites
    )
    return state, improved


def restore_best(state: DynamicsState) -> DynamicsState:
    """Each member back to its best-holdout snapshot (end of fitting)."""
    return state.replace(params=state.best_params)


# ----------------------------------------------------------------------------------------------------------
# Training


@functools.lru_cache(maxsize=16)  # same config -> same compiled function (fits, resumes, tests)
def make_train_epoch(
    config: DynamicsConfig,
) -> Callable[..., tuple[DynamicsState, dict[str, jax.Array]]]:
    """Returns jitted `epoch_fn(state, data, key, max_updates=None) -> (state, metrics)`.

    One call = one epoch: the members' bootstrap indices are reshuffled, then min(N_train // batch_size,
    max_updates) Adam steps on [E, batch_size] minibatches (all members in one batched forward/backward),
    then holdout evaluation and the per-member snapshot update. `data` comes from `make_epoch_data`.
    metrics: `train_loss` (scalar, mean over the epoch's updates), `holdout_mse`/`holdout_nll`/`improved`
    ([E]), `num_updates`.
    """
    tx = make_optimizer(config)
    bs = config.batch_size

    def update(state: DynamicsState, inputs, targets):
        (loss, aux), grads = jax.value_and_grad(ensemble_loss, has_aux=True)(
            state.params, inputs, targets, config
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    def epoch_fn(state: DynamicsState, data: Mapping[str, jax.Array], key: jax.Array, max_updates=None):
        chex.assert_rank(data["bootstrap"], 2)
        e, n = data["bootstrap"].shape
        chex.assert_equal(e, config.num_members)
        num_batches = n // bs
        if max_updates is None:  # (pass an int32 array to share one compilation with budgeted calls)
            max_updates = num_batches
        num_updates = jnp.minimum(jnp.asarray(max_updates, jnp.int32), num_batches)
        # Every member visits its own bootstrap set in a new random order. One permutation of the
        # positions serves all members: their bootstrap lists are independent iid draws, so member e's
        # minibatches bootstrap[e, perm[...]] are still independent of the others' and uniformly
        # shuffled, at 1/E of the sorting cost.
        perm = jax.random.permutation(key, n)[: num_batches * bs]
        order = data["bootstrap"][:, perm].reshape(e, num_batches, bs)  # [E, num_batches, bs]

        def body(i, carry):
            state, loss_sum = carry
            idx = jax.lax.dynamic_index_in_dim(order, i, axis=1, keepdims=False)  # [E, bs]
            state, loss = update(state, data["inputs"][idx], data["targets"][idx])
            return state, loss_sum + loss

        state, loss_sum = jax.lax.fori_loop(0, num_updates, body, (state, jnp.zeros((), jnp.float32)))
        holdout = evaluate_holdout(state, data["holdout_inputs"], data["holdout_targets"])
        state, improved = update_snapshots(state, holdout["mse"])
        state = state.replace(epoch=state.epoch + 1)
        metrics = {
            "train_loss": loss_sum / jnp.maximum(num_updates, 1),
            "holdout_mse": holdout["mse"],
            "holdout_nll": holdout["nll"],
            "improved": improved,
            "num_updates": num_updates,
        }
        return state, metrics

    return jax.jit(epoch_fn)


# ----------------------------------------------------------------------------------------------------------
# Several seeds in one program (the pipeline's dynamics stage)


def init_seeds(
    keys: jax.Array, transitions: Any, config: DynamicsConfig = DynamicsConfig()
) -> tuple[DynamicsState, dict[str, jax.Array], jax.Array]:
    """One ensemble per seed, stacked on a leading [S] axis, with its own holdout split, normaliser,
    initialisation and bootstrap sets: `fit_dynamics`'s set-up for each of keys [S, 2].

    Returns (states [S], epoch data [S] for `make_train_epoch_seeds`, per-seed epoch keys [S, 2]).
    Deterministic in the keys, so a resumed run rebuilds exactly the same data.
    """
    inputs, targets = transitions_to_arrays(transitions)
    obs_dim = targets.shape[1] - 1
    act_dim = inputs.shape[1] - obs_dim
    states, datas, train_keys = [], [], []
    for key in keys:
        k_split, k_init, k_boot, k_train = jax.random.split(key, 4)
        train, holdout = split_holdout(k_split, inputs, targets, config)
        state = init_dynamics(k_init, obs_dim, act_dim, config, train["inputs"])
        datas.append(make_epoch_data(k_boot, state, train, holdout))
        states.append(state)
        train_keys.append(k_train)
    stack = lambda *xs: jnp.stack(xs)
    return jax.tree.map(stack, *states), jax.tree.map(stack, *datas), jnp.stack(train_keys)


@functools.lru_cache(maxsize=16)
def make_train_epoch_seeds(config: DynamicsConfig):
    """`make_train_epoch` vmapped over a leading seed axis of (state, data, key, max_updates [S] int32):
    a seed whose budget is 0 (stopped early, or out of steps) makes no update and keeps its snapshots."""
    return jax.jit(jax.vmap(make_train_epoch(config)))


def counters(state: DynamicsState) -> dict[str, jax.Array]:
    """The training counters of states [S] that decide when each seed stops (read them on the host)."""
    return {"since": state.epochs_since_improvement, "updates": state.step, "epoch": state.epoch,
            "best_holdout_mse": state.best_holdout_mse, "elites": state.elites}


def epoch_budgets(host_counters: Mapping[str, np.ndarray], config: DynamicsConfig, max_updates: int,
                  early_stopping: bool = True) -> np.ndarray:
    """[S] int32: how many updates each seed may make in its next epoch; 0 once it has stopped, early (no
    member improved its holdout MSE for `max_epochs_since_improvement` epochs) or at `max_updates`."""
    updates = np.asarray(host_counters["updates"])
    stopped = updates >= max_updates
    if early_stopping:
        stopped |= np.asarray(host_counters["since"]) >= config.max_epochs_since_improvement
    return np.where(stopped, 0, max_updates - updates).astype(np.int32)


def fit_dynamics(
    key: jax.Array,
    transitions: Any,
    config: DynamicsConfig = DynamicsConfig(),
    *,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    early_stopping: bool = True,
) -> tuple[DynamicsState, list[dict]]:
    """One ensemble trained on the host's `transitions` (mapping/object with observations, actions,
    rewards, next_observations [, next_valid]) until early stopping or a budget (`max_epochs`, or
    `max_steps` minibatch updates, exact): the pipeline's dynamics stage for one seed, with the same
    set-up (`init_seeds`), compiled epoch and stopping rule (`epoch_budgets`). Returns the state with each
    member's best snapshot restored and one history dict (host values) per epoch."""
    if not early_stopping and max_epochs is None and max_steps is None:
        raise ConfigError("fit_dynamics: without early stopping, give max_epochs or max_steps")
    states, data, keys = init_seeds(key[None], transitions, config)
    epoch_fn = make_train_epoch_seeds(config)
    max_updates = np.iinfo(np.int32).max if max_steps is None else max_steps
    history: list[dict] = []
    while max_epochs is None or len(history) < max_epochs:
        budget = epoch_budgets(jax.device_get(counters(states)), config, max_updates, early_stopping)
        if not budget.any():
            break
        states, metrics = epoch_fn(states, data, jax.vmap(jax.random.fold_in)(keys, states.epoch), budget)
        host, c = jax.device_get((metrics, counters(states)))
        history.append({"epoch": int(c["epoch"][0]), "step": int(c["updates"][0]),
                        "train_loss": float(host["train_loss"][0]), "holdout_mse": host["holdout_mse"][0].tolist(),
                        "holdout_nll": host["holdout_nll"][0].tolist(),
                        "best_holdout_mse": c["best_holdout_mse"][0].tolist(), "elites": c["elites"][0].tolist(),
                        "epochs_since_improvement": int(c["since"][0])})
    return restore_best(jax.tree.map(lambda x: x[0], states)), history

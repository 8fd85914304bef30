"""Neural networks and policy distributions shared by AWAC, SAC and the rollout engine.

The AWAC policy is the paper's tanh-squashed Gaussian mixture (section 4.2: "a tanh-squashed GMM with 5
components"). AWAC only needs log pi(a|s) of dataset actions and samples without gradients, so the
mixture needs no reparameterisation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

# Dataset actions on the boundary of [-1, 1] have atanh = +-inf; they are clipped this far inside before
# any log-prob (SPEC section 1). In float32, 1 - 1e-5 is exactly representable enough that atanh is finite
# (about 6.1) and the Jacobian term log(1 - a^2) stays around -10.8.
ACTION_EPS = 1e-5


def default_init(scale: float = 1.0):
    # Variance scaling rather than orthogonal: orthogonal init runs a QR per layer, which under
    # jit(vmap(init)) over seeds compiled for minutes on the CPU.
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


class MLP(nn.Module):
    """Dense layers with an activation between them (none after the last when `activate_final=False`)."""

    hidden_dims: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    activate_final: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, kernel_init=default_init())(x)
            if i + 1 < len(self.hidden_dims) or self.activate_final:
                x = self.activation(x)
        return x


class Critic(nn.Module):
    """Q(s, a). obs: [B, obs_dim], act: [B, act_dim] -> [B], or [B, num_outputs] when `num_outputs` is set
    (a distributional critic's quantiles)."""

    hidden_dims: Sequence[int] = (256, 256, 256)
    num_outputs: int | None = None

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array) -> jax.Array:
        x = MLP(self.hidden_dims)(jnp.concatenate([obs, act], axis=-1))
        if self.num_outputs is None:
            return nn.Dense(1, kernel_init=default_init(1.0))(x)[..., 0]
        return nn.Dense(self.num_outputs, kernel_init=default_init(1.0))(x)


class EnsembleCritic(nn.Module):
    """`num_qs` independent critics with parameters stacked on a leading axis: -> [num_qs, B] (or
    [num_qs, B, num_outputs]).

    Stacking (nn.vmap) runs the twin critics as one batched matmul per layer instead of two.
    """

    hidden_dims: Sequence[int] = (256, 256, 256)
    num_qs: int = 2
    num_outputs: int | None = None

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array) -> jax.Array:
        ensemble = nn.vmap(
            Critic,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_qs,
        )
        return ensemble(self.hidden_dims, self.num_outputs)(obs, act)


class GMMParams(nn.Module):
    """Raw parameters of a K-component diagonal Gaussian mixture over pre-tanh actions."""

    hidden_dims: Sequence[int]
    action_dim: int
    num_components: int = 5
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array):
        k, a = self.num_components, self.action_dim
        h = MLP(self.hidden_dims)(obs)
        logits = nn.Dense(k, kernel_init=default_init(1e-2))(h)  # [B, K]
        means = nn.Dense(k * a, kernel_init=default_init(1e-2))(h).reshape(*obs.shape[:-1], k, a)
        log_stds = nn.Dense(k * a, kernel_init=default_init(1e-2))(h).reshape(*obs.shape[:-1], k, a)
        log_stds = jnp.clip(log_stds, self.log_std_min, self.log_std_max)
        return logits, means, log_stds


class _TanhInside(distrax.Tanh):
    """tanh whose outputs stay in [-1 + ACTION_EPS, 1 - ACTION_EPS], in both directions.

    In float32 tanh(x) rounds to exactly +-1 for |x| > ~9, which std up to e^2 makes common: such a sample's
    log-prob was atanh(1) = inf, and critics saw actions that clipped dataset actions never are. The
    log-determinant is tanh's at the unclipped x, so densities strictly inside are unchanged.
    """

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, log_det = super().forward_and_log_det(x)
        return jnp.clip(y, -1.0 + ACTION_EPS, 1.0 - ACTION_EPS), log_det

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return super().inverse_and_log_det(jnp.clip(y, -1.0 + ACTION_EPS, 1.0 - ACTION_EPS))

    def same_as(self, other: distrax.Bijector) -> bool:
        return type(other) is _TanhInside


def tanh_gmm(logits: jax.Array, means: jax.Array, log_stds: jax.Array) -> distrax.Distribution:
    """tanh-squashed Gaussian mixture: logits [..., K], means/log_stds [..., K, A] -> dist over [..., A].

    Samples lie strictly inside (-1, 1) (see `_TanhInside`)."""
    mixture = distrax.MixtureSameFamily(
        mixture_distribution=distrax.Categorical(logits=logits),
        components_distribution=distrax.MultivariateNormalDiag(means, jnp.exp(log_stds)),
    )
    return distrax.Transformed(mixture, distrax.Block(_TanhInside(), ndims=1))


def tanh_gmm_log_prob(logits, means, log_stds, actions: jax.Array) -> jax.Array:
    """log pi(a|s) of (dataset) actions [..., A], clipped inside (-1, 1) first so boundary actions stay finite."""
    actions = jnp.clip(actions, -1.0 + ACTION_EPS, 1.0 - ACTION_EPS)
    return tanh_gmm(logits, means, log_stds).log_prob(actions)


def tanh_gmm_mode(logits, means, log_stds) -> jax.Array:
    """Deterministic evaluation action: tanh of the mean of the most probable component."""
    del log_stds
    best = jnp.argmax(logits, axis=-1)  # [...]
    mean = jnp.take_along_axis(means, best[..., None, None], axis=-2)[..., 0, :]
    return jnp.tanh(mean)


class TanhGaussianParams(nn.Module):
    """Mean and log-std of a diagonal Gaussian over pre-tanh actions (SAC's actor)."""

    hidden_dims: Sequence[int]
    action_dim: int
    log_std_min: float = -20.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array):
        h = MLP(self.hidden_dims)(obs)
        mean = nn.Dense(self.action_dim, kernel_init=default_init(1e-2))(h)
        log_std = nn.Dense(self.action_dim, kernel_init=default_init(1e-2))(h)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


def tanh_gaussian(mean: jax.Array, log_std: jax.Array) -> distrax.Distribution:
    return distrax.Transformed(
        distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)), distrax.Block(distrax.Tanh(), ndims=1)
    )

"""A PyTorch model rollout written the way OfflineRL-Kit's MOPO does it: the reference
`mb2po-bench rollout --compare_torch` times the JAX engine against.

Written for this project from the published description of that design (no code copied):
- the ensemble is one module whose layers hold [E, in, out] weights, applied with `torch.einsum` to the
  input broadcast to every member; swish activations; soft-clamped log-variance;
- every imagined step goes through numpy: the policy's action and the members' means/variances come back
  to numpy, the member is drawn per row with `np.random`, the next state is sampled in numpy, the penalty is
  computed in numpy, the termination function runs on numpy arrays, and the surviving rows are kept by
  boolean indexing before the next step (OfflineRL-Kit's `rollout` shrinks the batch to non-terminated rows);
- the policy is a 3x256 ReLU tanh-Gaussian actor run under `torch.no_grad()`.

All start states are rolled out as one batch (OfflineRL-Kit uses rollout batches of 50,000).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


class EinsumEnsemble(nn.Module):
    def __init__(self, num_members: int, sizes: list[int], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(num_members, i, o, generator=g) / (2 * i**0.5))
             for i, o in zip(sizes[:-1], sizes[1:])])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_members, 1, o)) for o in sizes[1:]])
        d = sizes[-1] // 2
        self.max_logvar = nn.Parameter(torch.full((1, d), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, d), -10.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.unsqueeze(0).expand(len(self.weights[0]), *x.shape)  # [E, B, in]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("ebi,eio->ebo", h, w) + b
            if i < len(self.weights) - 1:
                h = h * torch.sigmoid(h)
        mean, logvar = h.chunk(2, dim=-1)
        logvar = self.max_logvar - nn.functional.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + nn.functional.softplus(logvar - self.min_logvar)
        return mean, logvar


class TanhGaussianActor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden=(256, 256, 256)):
        super().__init__()
        layers, d = [], obs_dim
        for w in hidden:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        layers.append(nn.Linear(d, 2 * act_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return torch.tanh(mean + log_std.clamp(-5, 2).exp() * torch.randn_like(mean))


def hopper_done(next_obs: np.ndarray) -> np.ndarray:
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (np.isfinite(next_obs).all(-1) & (np.abs(next_obs[:, 1:]) < 100).all(-1) & (z > 0.7)
               & (np.abs(angle) < 0.2))
    return ~healthy


def imagined_steps_per_s(obs_dim: int = 11, act_dim: int = 3, steps: int = 1_000_000, horizon: int = 5,
                         num_members: int = 7, num_elites: int = 5, penalty_coef: float = 1.0,
                         repeats: int = 1, seed: int = 0) -> dict[str, float]:
    """Best-of `repeats` rollouts of steps // horizon start states for `horizon` steps, after a warm-up.
    `rows_computed_per_s` counts the rows that went through the networks (the reference drops terminated
    rows, the JAX engine computes masked ones, so per-row network throughput is the like-for-like rate)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EinsumEnsemble(num_members, [obs_dim + act_dim, 200, 200, 200, 200, 2 * (obs_dim + 1)], seed)
    actor = TanhGaussianActor(obs_dim, act_dim)
    elites = np.arange(num_elites)
    num_starts = steps // horizon
    start = rng.normal(size=(num_starts, obs_dim)).astype(np.float32)
    start[:, 0] = 1.25
    start[:, 1:] *= 0.01  # healthy hopper states, so trajectories survive as with a trained model
    mu_in, sd_in = np.zeros(obs_dim + act_dim, np.float32), np.ones(obs_dim + act_dim, np.float32)

    def one_rollout() -> tuple[int, int]:
        obs, produced, computed = start, 0, 0
        for _ in range(horizon):
            with torch.no_grad():
                act = actor(torch.from_numpy(obs)).numpy()
                x = (np.concatenate([obs, act], -1) - mu_in) / sd_in
                mean, logvar = model(torch.from_numpy(x))
            mean, std = mean.numpy(), np.exp(0.5 * logvar.numpy())
            mean[..., :-1] += obs
            members = rng.choice(elites, size=obs.shape[0])
            rows = np.arange(obs.shape[0])
            sample = mean[members, rows] + std[members, rows] * rng.normal(size=mean.shape[1:])
            next_obs, reward = sample[:, :-1].astype(np.float32), sample[:, -1]
            penalty = np.amax(np.linalg.norm(std[elites], axis=-1), axis=0)
            reward = reward - penalty_coef * penalty
            done = hopper_done(next_obs)
            computed += obs.shape[0]
            produced += obs.shape[0]
            obs = next_obs[~done]
            if obs.shape[0] == 0:
                break
        return produced, computed

    one_rollout()  # warm-up: allocators, oneDNN primitive caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        produced, computed = one_rollout()
        best = min(best, time.perf_counter() - t0)
    return {"imagined_steps_per_s": produced / best, "rows_computed_per_s": computed / best,
            "rows_produced": produced, "seconds": best, "torch_threads": torch.get_num_threads()}

"""A CORL-style PyTorch AWAC update: the reference `mb2po-bench awac --compare_torch` times us against.

Written for this project from the published description of CORL's single-file AWAC (no code copied):
- actor: 3x256 ReLU MLP -> mean of a diagonal Gaussian (no tanh), a state-independent learned log-std
  clamped to [-20, 2]; sampled actions are clamped to the action box [-1, 1];
- twin 3x256 ReLU critics, each with its own Adam, and Polyak-averaged target copies (tau 0.005);
- one update = critic step on y = r + gamma (1 - done) min_j Q'_j(s', a'), a' ~ pi(.|s'), then the actor
  step on -log pi(a|s) * min(exp(A / lambda), 20) with A = min_j Q_j(s, a) - min_j Q_j(s, a_pi) taken from
  the *updated* critics, then the soft target update;
- each step's batch is drawn from tensors holding the whole dataset with `torch.randint` indices.

It is deliberately not the paper's policy class: it is the baseline users compare against. The Gaussian
log-prob is written out rather than built through `torch.distributions`, which only makes the baseline
faster (no argument validation, no distribution objects per step).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import torch
from torch import nn

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """pi(a|s) = N(mu(s), diag(exp(log_std))^2), log_std a free parameter (not a function of s)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int], log_std_range=(-20.0, 2.0)):
        super().__init__()
        self.mean = _mlp(obs_dim, hidden_dims, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.log_std_range = log_std_range

    def _mean_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(obs), self.log_std.clamp(*self.log_std_range)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s): obs [B, obs_dim], actions [B, act_dim] -> [B]."""
        mean, log_std = self._mean_log_std(obs)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._mean_log_std(obs)
        return (mean + log_std.exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)


class Critic(nn.Module):
    """Q(s, a): obs [B, obs_dim], actions [B, act_dim] -> [B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int]):
        super().__init__()
        self.net = _mlp(obs_dim + act_dim, hidden_dims, 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


class TorchAWAC:
    """The reference learner: `update(batch)` does one critic step, one actor step and the target update."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dims: Sequence[int] = (256, 256, 256),
        lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        awac_lambda: float = 1.0,
        max_weight: float = 20.0,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.actor = GaussianActor(obs_dim, act_dim, hidden_dims)
        self.critics = [Critic(obs_dim, act_dim, hidden_dims) for _ in range(2)]
        self.targets = [copy.deepcopy(c).requires_grad_(False) for c in self.critics]
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opts = [torch.optim.Adam(c.parameters(), lr=lr) for c in self.critics]
        self.gamma, self.tau, self.awac_lambda, self.max_weight = gamma, tau, awac_lambda, max_weight

    def min_q(self, critics, obs, actions) -> torch.Tensor:
        return torch.min(critics[0](obs, actions), critics[1](obs, actions))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        obs, actions, rewards = batch["observations"], batch["actions"], batch["rewards"]
        next_obs, terminals = batch["next_observations"], batch["terminals"]

        # Critic: y = r + gamma (1 - done) min_j Q'_j(s', a'), a' ~ pi(.|s').
        with torch.no_grad():
            next_q = self.min_q(self.targets, next_obs, self.actor.sample(next_obs))
            target = rewards + self.gamma * (1.0 - terminals) * next_q
        critic_loss = sum(((c(obs, actions) - target) ** 2).mean() for c in self.critics)
        for opt in self.critic_opts:
            opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        for opt in self.critic_opts:
            opt.step()

        # Actor: advantage-weighted regression with the critics just updated.
        with torch.no_grad():
            advantage = self.min_q(self.critics, obs, actions) - self.min_q(
                self.critics, obs, self.actor.sample(obs)
            )
            weights = torch.exp(advantage / self.awac_lambda).clamp(max=self.max_weight)
        actor_loss = -(self.actor.log_prob(obs, actions) * weights).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        with torch.no_grad():
            for critic, target_critic in zip(self.critics, self.targets):
                for p, tp in zip(critic.parameters(), target_critic.parameters()):
                    tp.lerp_(p, self.tau)
        # Tensors, not floats: a .item() here would add a sync per step that CORL's loop does not have.
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach()}


def random_dataset(num: int, obs_dim: int, act_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random transitions of the shapes a D4RL dataset has (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(num, obs_dim, generator=g),
        "actions": torch.rand(num, act_dim, generator=g) * 2.0 - 1.0,
        "rewards": torch.randn(num, generator=g),
        "next_observations": torch.randn(num, obs_dim, generator=g),
        "terminals": (torch.rand(num, generator=g) < 0.01).float(),
    }


def sample(data: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    idx = torch.randint(0, data["rewards"].shape[0], (batch_size,))
    return {k: v[idx] for k, v in data.items()}


def timed_rates(
    obs_dim: int = 11,
    act_dim: int = 3,
    batch_size: int = 256,
    min_time: float = 2.0,
    *,
    hidden_dims: Sequence[int] = (256, 256, 256),
    steps_per_chunk: int = 100,
    min_repeats: int = 3,
    dataset_size: int = 1_000_000,
    data: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Best-of rates over chunks of `steps_per_chunk` sample+update steps, after one warm-up chunk; at
    least `min_repeats` chunks and `min_time` seconds (the protocol of `common.time_call` on the JAX side).
    `updates_per_s` is wall-clock; `cpu_updates_per_s` per second of process CPU time (all threads)."""
    if data is None:
        data = random_dataset(dataset_size, obs_dim, act_dim)
    agent = TorchAWAC(obs_dim, act_dim, hidden_dims)

    def chunk() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps_per_chunk):
            agent.update(sample(data, batch_size))
        return time.perf_counter() - t0, time.process_time() - c0

    chunk()  # warm-up: allocator, Adam state, oneDNN primitive caches
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < min_repeats or time.perf_counter() - start < min_time:
        wall, cpu = chunk()
        walls.append(wall)
        cpus.append(cpu)
    return {"updates_per_s": steps_per_chunk / min(walls), "cpu_updates_per_s": steps_per_chunk / min(cpus)}


def updates_per_s(obs_dim: int = 11, act_dim: int = 3, batch_size: int = 256, min_time: float = 2.0,
                  **kwargs) -> float:
    """Wall-clock updates per second of the reference on torch's current thread count (see `timed_rates`)."""
    return timed_rates(obs_dim, act_dim, batch_size, min_time, **kwargs)["updates_per_s"]

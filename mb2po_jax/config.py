"""Run configuration: frozen dataclasses with the paper's defaults, and the one place that maps presets
(and, later, per-task values) onto them. The CLI maps flags onto these and does nothing else."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mb2po_jax.awac import AWACConfig
from mb2po_jax.errors import ConfigError

STAGES = ("awac", "dynamics", "mb2po")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a `mb2po-train` run needs besides the dataset and the workdir."""

    awac: AWACConfig = AWACConfig()
    stages: tuple[str, ...] = ("awac",)
    num_seeds: int = 1
    seed: int = 0
    awac_steps: int = 500_000  # paper: 500k gradient steps before fine-tuning
    steps_per_call: int = 1000  # updates fused into one compiled call
    eval_every: int = 50_000
    eval_episodes: int = 10
    max_episode_steps: int = 1000
    checkpoint_every: int = 50_000

    def validate(self) -> "RunConfig":
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
        for name in ("num_seeds", "awac_steps", "steps_per_call", "eval_every", "eval_episodes",
                     "checkpoint_every", "max_episode_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "awac_steps"):
            if getattr(self, name) % self.steps_per_call:
                raise ConfigError(
                    f"--{name}={getattr(self, name)} must be a multiple of "
                    f"--steps_per_call={self.steps_per_call} (updates are fused per compiled call)"
                )
        if self.awac.batch_size <= 0:
            raise ConfigError(f"--batch_size must be positive, got {self.awac.batch_size}")
        return self


# Presets. `smoke`: a few minutes on 2 CPU cores, to see everything run. `cpu`: a real but short run on a
# laptop. `paper`: the paper's protocol (section 5: 500k AWAC steps; 4 seeds as in Table 1).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        awac_steps=2_000, steps_per_call=500, eval_every=1_000, eval_episodes=2, checkpoint_every=1_000
    ),
    "cpu": dict(
        awac_steps=100_000, steps_per_call=1000, eval_every=10_000, eval_episodes=10,
        checkpoint_every=10_000,
    ),
    "paper": dict(
        awac_steps=500_000, steps_per_call=1000, eval_every=50_000, eval_episodes=10,
        checkpoint_every=50_000, num_seeds=4,
    ),
}


def make_config(preset: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The preset's RunConfig with `overrides` (None values ignored) applied to RunConfig or AWACConfig
    fields by name."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is not one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    awac_fields = {f.name for f in dataclasses.fields(AWACConfig)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"awac"}
    unknown = set(values) - awac_fields - run_fields
    if unknown:
        raise ConfigError(f"unknown configuration field(s): {sorted(unknown)}")
    awac = AWACConfig(**{k: v for k, v in values.items() if k in awac_fields})
    run = RunConfig(awac=awac, **{k: v for k, v in values.items() if k in run_fields})
    return run.validate()


def to_dict(config: RunConfig) -> dict[str, Any]:
    """JSON-able view (tuples become lists) for config.json and results.json."""
    return dataclasses.asdict(config)

"""Run configuration: frozen dataclasses with the paper's defaults, and the one place that maps presets
and per-task values onto them. The CLI maps flags onto these and does nothing else.

Precedence, lowest first: dataclass defaults < per-task (h, lambda) from the table shipped in the package,
`mb2po_jax/configs/tasks.json` (or --task_config) < preset < flags.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import pathlib
import re
from typing import Any, Mapping

from mb2po_jax.awac import AWACConfig
from mb2po_jax.data import registry
from mb2po_jax.dynamics import DynamicsConfig
from mb2po_jax.errors import ConfigError
from mb2po_jax.mb2po import MB2POConfig
from mb2po_jax.online import FLAGS as ONLINE_FLAGS, SCHEDULE as ONLINE_SCHEDULE, OnlineConfig

STAGES = ("awac", "dynamics", "mb2po", "online")
SECTIONS = ("awac", "dynamics", "mb2po", "online")  # RunConfig's nested config sections
# MB2PO settings that may change between reruns of one workdir (extending a run), like the step counts.
MB2PO_SCHEDULE = ("iterations",)
# Settings added after workdirs already existed, with the value that reproduces how those ran: a recorded
# configuration without one (config.json, a benchmark's results.json) is read as having this value.
ADDED_FIELDS = {("mb2po", "max_penalty_share"): 0.0, ("mb2po", "penalty_share"): 0.0}


def with_added_fields(recorded: Any) -> Any:
    """A recorded configuration or identity (dict of sections) with `ADDED_FIELDS` it lacks filled in."""
    if not isinstance(recorded, dict):
        return recorded
    out = dict(recorded)
    for (section, field), value in ADDED_FIELDS.items():
        if isinstance(out.get(section), dict) and field not in out[section]:
            out[section] = {**out[section], field: value}
    return out


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a `mb2po-train` run needs besides the dataset and the workdir."""

    awac: AWACConfig = AWACConfig()
    dynamics: DynamicsConfig = DynamicsConfig()
    mb2po: MB2POConfig = MB2POConfig()
    online: OnlineConfig = OnlineConfig()
    stages: tuple[str, ...] = ("awac",)
    num_seeds: int = 1
    seed: int = 0
    awac_steps: int = 500_000  # paper: 500k gradient steps before fine-tuning
    steps_per_call: int = 1000  # updates fused into one compiled call
    eval_every: int = 50_000
    eval_episodes: int = 10
    # Episodes of each stage's last evaluation, its final score (None: eval_episodes). The presets that report
    # results use 100: 10 episodes per seed of a walker or hopper that falls in some leave a standard error of
    # several points on a 3-seed mean, the size of the paper's 3-point bound (RESULTS.md).
    final_eval_episodes: int | None = None
    max_episode_steps: int = 1000
    checkpoint_every: int = 50_000
    dynamics_steps: int = 100_000  # paper: 100k gradient steps (early stopping may end it sooner)
    dynamics_early_stopping: bool = True  # MBPO's per-member holdout early stopping
    mb2po_eval_every: int = 25  # iterations between real-environment evaluations
    mb2po_checkpoint_every: int = 25  # iterations between checkpoints (ring included)

    def validate(self) -> "RunConfig":
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
        for name in ("num_seeds", "awac_steps", "steps_per_call", "eval_every", "eval_episodes",
                     "checkpoint_every", "max_episode_steps", "dynamics_steps", "mb2po_eval_every",
                     "mb2po_checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.final_eval_episodes is not None and not 1 <= self.final_eval_episodes <= 1000:
            raise ConfigError(f"--final_eval_episodes must be in [1, 1000], got {self.final_eval_episodes}")
        for name in ("eval_every", "checkpoint_every", "awac_steps"):
            if getattr(self, name) % self.steps_per_call:
                raise ConfigError(
                    f"--{name}={getattr(self, name)} must be a multiple of "
                    f"--steps_per_call={self.steps_per_call} (updates are fused per compiled call)"
                )
        return self

    @property
    def final_episodes(self) -> int:
        """Episodes per seed of each stage's final evaluation."""
        return self.eval_episodes if self.final_eval_episodes is None else self.final_eval_episodes


# Presets. `smoke`: a few minutes on 2 CPU cores, to see every stage run. `cpu`: a real but short run that
# fits 2 CPU cores and 24 GB: 50 MB2PO iterations of 50,000 imagined steps (not 1M) with a ring of the
# last 20 iterations (1M model rows, 0.1 GB for hopper). `paper`: the paper's protocol (section 5: 500k
# AWAC steps, 100k dynamics steps, 500 iterations x (1M imagined steps + 1000 AWAC updates), ring of the
# last 100 iterations; 4 seeds as in Table 1). `smoke` and `cpu` set lambda per seed so that the penalty takes
# half the data's reward on the data (--penalty_share=0.5, capped there by --max_penalty_share=0.5,
# `rollout.capped_penalty_coef`) and draw half of each batch from the data (--omega=0.5), and `cpu` trains
# the paper's 100k dynamics steps: issue 18's rule (DESIGN.md); `paper` keeps the task table's lambda and
# omega = 0.05 as the paper does.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        awac_steps=2_000, steps_per_call=500, eval_every=1_000, eval_episodes=2, checkpoint_every=1_000,
        dynamics_steps=1_000, mb2po_iterations=4, imagined_steps=10_000, updates_per_iteration=250,
        num_slots=4, mb2po_eval_every=2, mb2po_checkpoint_every=2, max_penalty_share=0.5, penalty_share=0.5,
        omega=0.5,
        online_steps=2_000, online_steps_per_call=500, online_eval_every=500, online_checkpoint_every=500,
        online_buffer_size=2_000, model_refit_every=1_000,
    ),
    "cpu": dict(
        awac_steps=100_000, steps_per_call=1000, eval_every=10_000, eval_episodes=10, final_eval_episodes=100,
        checkpoint_every=10_000, dynamics_steps=100_000, mb2po_iterations=50, imagined_steps=50_000,
        updates_per_iteration=1000, num_slots=20, mb2po_eval_every=10, mb2po_checkpoint_every=5,
        max_penalty_share=0.5, penalty_share=0.5, omega=0.5,
        online_steps=100_000, online_steps_per_call=1000, online_eval_every=5_000,
        online_checkpoint_every=10_000, online_buffer_size=100_000,
    ),
    "paper": dict(
        awac_steps=500_000, steps_per_call=1000, eval_every=50_000, eval_episodes=10, final_eval_episodes=100,
        checkpoint_every=50_000, num_seeds=4, dynamics_steps=100_000, mb2po_iterations=500,
        imagined_steps=1_000_000, updates_per_iteration=1000, num_slots=100, mb2po_eval_every=25,
        mb2po_checkpoint_every=25, online_steps=250_000, online_steps_per_call=1000,
        online_eval_every=10_000, online_checkpoint_every=10_000, online_buffer_size=1_000_000,
    ),
}

# Flag name -> (config section, field). Flags of the AWAC and run sections are their field names.
DYNAMICS_FLAGS = {
    "num_members": "num_members", "num_elites": "num_elites", "dynamics_hidden_dims": "hidden_dims",
    "dynamics_lr": "learning_rate", "dynamics_weight_decay": "weight_decay",
    "dynamics_batch_size": "batch_size", "holdout_fraction": "holdout_fraction", "max_holdout": "max_holdout",
    "max_epochs_since_improvement": "max_epochs_since_improvement",
}
MB2PO_FLAGS = {
    "mb2po_iterations": "iterations", "imagined_steps": "imagined_steps",
    "updates_per_iteration": "updates_per_iteration", "num_slots": "num_slots", "omega": "omega",
    "horizon": "horizon", "penalty_coef": "penalty_coef", "max_penalty_share": "max_penalty_share",
    "penalty_share": "penalty_share", "penalty": "penalty",
    "rollout_members": "rollout_members",
    "buffer_dtype": "buffer_dtype", "rollout_chunk_size": "chunk_size",
}

# Package data (setup.py package_data), found with importlib.resources: an installed wheel reads the same table
# as a source checkout.
TASKS_RESOURCE = "configs/tasks.json"
_KINDS = ("medium-expert", "medium-replay", "full-replay", "medium", "random", "expert")


def task_key(dataset: str | None) -> str | None:
    """'hopper-medium-replay' for hopper-medium-replay-v2, hopper_mixed (v0), hopper-medium-replay-local,
    mujoco/hopper/medium-v0, /data/hopper_medium_replay-v2.hdf5; None if the env or kind is not recognised."""
    if not dataset:
        return None
    base = os.path.basename(dataset) if os.path.sep in dataset and dataset.endswith(".hdf5") else dataset
    env = registry.env_key(base)
    text = re.sub(r"[_/]", "-", base.lower()).replace("mixed", "medium-replay")
    kind = next((k for k in _KINDS if k in text), None)
    return f"{env}-{kind}" if env and kind else None


def _task_table(path: str | None) -> dict[str, Any]:
    """The table at `path` (--task_config), else the one shipped in the package; ConfigError if unreadable."""
    if path is None:
        source = importlib.resources.files("mb2po_jax") / TASKS_RESOURCE
        if not source.is_file():
            raise ConfigError(f"{source}: the per-task table is missing from the installed mb2po_jax package "
                              f"(reinstall it, or pass --task_config PATH)")
    else:
        source = pathlib.Path(path)
        if not source.is_file():
            raise ConfigError(f"{path}: per-task table (--task_config) not found")
    try:
        table = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: cannot read the per-task table ({' '.join(str(e).split())})") from e
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: the per-task table is not a JSON object")
    return table


def task_defaults(dataset: str | None, path: str | None = None) -> dict[str, Any]:
    """Per-task (horizon, penalty_coef) for `dataset` from the table at `path`, default the package's
    `mb2po_jax/configs/tasks.json`; {} for a dataset the table has no row for."""
    table = _task_table(path)
    key = task_key(dataset)
    return dict(table.get(key, {})) if key is not None else {}


def make_config(preset: str, overrides: Mapping[str, Any] | None = None,
                task: Mapping[str, Any] | None = None) -> RunConfig:
    """The preset's RunConfig with `task` values (per-task defaults) under it and `overrides` (None values
    ignored) over it, each applied by flag name (AWAC/run field names, `DYNAMICS_FLAGS`, `MB2PO_FLAGS`,
    `ONLINE_FLAGS`)."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is not one of {sorted(PRESETS)}")
    values = {**(task or {}), **PRESETS[preset],
              **{k: v for k, v in (overrides or {}).items() if v is not None}}
    awac_fields = {f.name for f in dataclasses.fields(AWACConfig)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS)
    unknown = set(values) - awac_fields - run_fields - set(DYNAMICS_FLAGS) - set(MB2PO_FLAGS) - set(ONLINE_FLAGS)
    if unknown:
        raise ConfigError(f"unknown configuration field(s): {sorted(unknown)}")
    awac = AWACConfig(**{k: v for k, v in values.items() if k in awac_fields})
    dynamics = DynamicsConfig(**{DYNAMICS_FLAGS[k]: v for k, v in values.items() if k in DYNAMICS_FLAGS})
    mb2po = MB2POConfig(**{MB2PO_FLAGS[k]: v for k, v in values.items() if k in MB2PO_FLAGS})
    online = OnlineConfig(**{ONLINE_FLAGS[k]: v for k, v in values.items() if k in ONLINE_FLAGS})
    run = RunConfig(awac=awac, dynamics=dynamics, mb2po=mb2po, online=online,
                    **{k: v for k, v in values.items() if k in run_fields})
    return run.validate()


def field_defaults() -> dict[str, Any]:
    """Flag name -> the dataclass default it overrides (what a run gets from neither preset nor flag)."""
    out = {f.name: f.default for f in dataclasses.fields(AWACConfig)}
    out.update({f.name: f.default for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS})
    dyn_fields = {f.name: f.default for f in dataclasses.fields(DynamicsConfig)}
    out.update({flag: dyn_fields[field] for flag, field in DYNAMICS_FLAGS.items()})
    mb2po_fields = {f.name: f.default for f in dataclasses.fields(MB2POConfig)}
    out.update({flag: mb2po_fields[field] for flag, field in MB2PO_FLAGS.items()})
    online_fields = {f.name: f.default for f in dataclasses.fields(OnlineConfig)}
    out.update({flag: online_fields[field] for flag, field in ONLINE_FLAGS.items()})
    return out


def flag_name(section: str, field: str) -> str:
    """The flag that sets `field` of a config section ("awac", "dynamics", "mb2po", "online", or "" for RunConfig
    and the run's identity: dataset, env), e.g. --dynamics_lr for ("dynamics", "learning_rate"); a field
    no flag sets is named section.field."""
    names = {"dynamics": {v: k for k, v in DYNAMICS_FLAGS.items()},
             "mb2po": {v: k for k, v in MB2PO_FLAGS.items()},
             "online": {v: k for k, v in ONLINE_FLAGS.items()}}.get(section)
    if names is None:  # AWAC and run fields are their flags' names
        return f"--{field}"
    return f"--{names[field]}" if field in names else f"{section}.{field}"


def to_dict(config: RunConfig) -> dict[str, Any]:
    """JSON-able view (tuples become lists) for config.json and results.json."""
    return dataclasses.asdict(config)


def from_dict(recorded: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a `to_dict` view records (config.json's "config"): lists back to tuples; fields it
    lacks get `ADDED_FIELDS`' values, then the dataclass defaults. For tools that reopen a finished workdir
    with exactly the settings it was trained with."""
    recorded = with_added_fields(dict(recorded))
    classes = {"awac": AWACConfig, "dynamics": DynamicsConfig, "mb2po": MB2POConfig, "online": OnlineConfig}

    def build(cls, values: Mapping[str, Any], **sections):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"recorded configuration: unknown field(s) {sorted(unknown)} of {cls.__name__}")
        return cls(**{k: _tuples(v) for k, v in values.items()}, **sections)

    sections = {name: build(cls, recorded.get(name) or {}) for name, cls in classes.items()}
    return build(RunConfig, {k: v for k, v in recorded.items() if k not in SECTIONS}, **sections).validate()


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config dataclasses hold (nested ones too)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def recorded_final_episodes(config: Mapping[str, Any], final: Mapping[str, Any] | None = None) -> int | None:
    """Episodes per seed behind a recorded final score: the count stored with it (`final["episodes"]`), else
    (runs made before that) the recorded config's final_eval_episodes, else its eval_episodes; None when the
    record names none of them. The reading of `RunConfig.final_episodes` for config.json/results.json."""
    if final and final.get("episodes") is not None:
        return final["episodes"]
    return config.get("final_eval_episodes") or config.get("eval_episodes")


def identity(config: RunConfig) -> dict[str, Any]:
    """The settings that define what a run's checkpoints are: seed, seed count and every section's fields
    except its schedule (step counts, evaluation and checkpoint intervals may change to extend a run). A
    rerun of a workdir that differs in one of them is refused (pipeline), and the default workdir's name
    carries a hash of them where they differ from the preset's (`default_workdir`)."""
    cfg = to_dict(config)
    return {"seed": cfg["seed"], "num_seeds": cfg["num_seeds"], "awac": cfg["awac"], "dynamics": cfg["dynamics"],
            "mb2po": {k: v for k, v in cfg["mb2po"].items() if k not in MB2PO_SCHEDULE},
            "online": {k: v for k, v in cfg["online"].items() if k not in ONLINE_SCHEDULE}}


def default_workdir(dataset: str, preset: str, config: RunConfig, task: Mapping[str, Any] | None = None,
                    env: str | None = None) -> str:
    """`workdirs/<dataset>_<preset>_seed<seed>` for the preset's own settings (a file: its name; a Minari
    id: with `_` for `/`); with a `_<8 hex digits>` suffix, a hash of the run's identity (and `env`, if
    given), when flags change what the run is (say --penalty_share or --num_seeds), so a tweaked run starts
    in its own workdir instead of being refused by the untweaked one's. Schedule flags (--awac_steps,
    --mb2po_iterations, ...) keep the name: a rerun with more steps extends the run."""
    # A file by its name; a registry id (a Minari id's slashes included) whole, so ids stay apart.
    dataset_part = os.path.basename(dataset) if os.path.isfile(dataset) else dataset.replace("/", "_")
    name = f"{dataset_part}_{preset}_seed{config.seed}"
    plain = make_config(preset, {"seed": config.seed, "stages": config.stages}, task)
    settings = identity(config)
    if settings != identity(plain) or env:
        settings["env"] = env
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name}_{digest}"
    return os.path.join("workdirs", name)

"""A training run, identified by its workdir: dataset -> stages, each checkpointed and resumable.

Host-side orchestration only: it loads data, calls the compiled training functions of each stage, and
handles files (config.json, metrics.jsonl, checkpoints/<stage>/, results.json), evaluation and signals.

    WORKDIR/config.json       the settings the run was started with (a rerun must agree on them)
    WORKDIR/metrics.jsonl     one JSON object per line: {"stage", "step", ...}; evaluations add
                              "return" and "normalized_score" (lists over seeds)
    WORKDIR/tensorboard/      the same metrics as TensorBoard event files
    WORKDIR/checkpoints/awac  orbax checkpoints of the full training state
    WORKDIR/results.json      written once, when every requested stage has finished
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax import awac, config as config_lib
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data import DEFAULT_DATASET, ensure_default_dataset, load_dataset, normalized_score
from mb2po_jax.data.envs import env_spaces
from mb2po_jax.errors import ConfigError
from mb2po_jax.evaluation import evaluate
from mb2po_jax.logger import MetricsWriter, Progress

# Settings that define what a workdir's checkpoints are; a rerun that differs in one of them is refused.
# Step counts, evaluation and checkpoint intervals may change between reruns (e.g. to extend a run).
IDENTITY_FIELDS = ("dataset", "env", "seed", "num_seeds", "awac")


class Stopped(Exception):
    """Raised after a SIGTERM/SIGINT once the current compiled call has finished and a checkpoint is saved."""


@dataclasses.dataclass(frozen=True)
class ActionScaler:
    """AWAC's tanh policy acts in [-1, 1]; an environment's Box bounds may differ (e.g. Pendulum's 2)."""

    low: np.ndarray
    high: np.ndarray

    def to_unit(self, actions: np.ndarray) -> np.ndarray:
        return (2.0 * (actions - self.low) / (self.high - self.low) - 1.0).astype(np.float32)

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.low + (np.asarray(actions, np.float64) + 1.0) * 0.5 * (self.high - self.low)

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.low == -1.0) and np.all(self.high == 1.0))


class _StopFlag:
    """SIGTERM (preemption) and Ctrl-C only set a flag; the loop saves at the next call boundary."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            del frame
            self.signal = signum
            print(f"\nreceived signal {signum}: saving a checkpoint after the current call", file=sys.stderr)

        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        else:
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _truncate_metrics(path: str, stage: str, step: int) -> None:
    """Drop `stage` lines logged after `step`: a run killed between checkpoints redoes those steps."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (record.get("stage") == stage and record.get("step", 0) > step):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _to_list(x) -> list[float]:
    return [float(v) for v in np.asarray(x).reshape(-1)]


class Run:
    """One `mb2po-train` invocation over a workdir."""

    def __init__(self, workdir: str, dataset: str | None, env: str | None, config: config_lib.RunConfig,
                 *, preset: str = "custom", log: Callable[[str], None] | None = None):
        self.workdir = os.path.abspath(workdir)
        self.config = config.validate()
        self.preset = preset
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stop = _StopFlag()
        for stage in self.config.stages:
            if stage != "awac":
                raise ConfigError(
                    f"--stages: stage {stage!r} is not available in this version (only 'awac' is)"
                )
        if dataset is None:
            ensure_default_dataset()
            dataset = DEFAULT_DATASET
        self.dataset = load_dataset(dataset, env)  # validated before any work
        self.env_id = self.dataset.env_id
        spaces = env_spaces(self.env_id)
        self.actions = ActionScaler(np.asarray(spaces.act_low), np.asarray(spaces.act_high))
        os.makedirs(self.workdir, exist_ok=True)
        self._check_config(dataset, env)
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")

    # ----------------------------------------------------------------------------------------- set-up
    def _identity(self, dataset_arg: str, env_arg: str | None) -> dict:
        cfg = config_lib.to_dict(self.config)
        return {"dataset": dataset_arg, "env": self.env_id, "seed": cfg["seed"],
                "num_seeds": cfg["num_seeds"], "awac": cfg["awac"]}

    def _check_config(self, dataset_arg: str, env_arg: str | None) -> None:
        path = os.path.join(self.workdir, "config.json")
        identity = json.loads(json.dumps(self._identity(dataset_arg, env_arg)))  # tuples -> lists
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            diffs = [k for k in IDENTITY_FIELDS if previous.get("identity", {}).get(k) != identity[k]]
            if diffs:
                details = "; ".join(
                    f"{k}: was {previous['identity'].get(k)!r}, now {identity[k]!r}" for k in diffs
                )
                raise ConfigError(
                    f"{self.workdir} holds a run with other settings ({details}); "
                    "use a new --workdir or the original settings"
                )
        _write_json_atomic(path, {
            "identity": identity,
            "preset": self.preset,
            "config": config_lib.to_dict(self.config),
            "dataset_path": self.dataset.path,
        })

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, act_seeds: Callable[[jax.Array], jax.Array]) -> dict[str, list[float]]:
        cfg = self.config

        def act_fn(obs: np.ndarray) -> np.ndarray:
            return self.actions.to_env(np.asarray(act_seeds(jnp.asarray(obs))))

        result = evaluate(act_fn, self.env_id, num_seeds=cfg.num_seeds, num_episodes=cfg.eval_episodes,
                          seed=cfg.seed + 10_000, max_episode_steps=cfg.max_episode_steps)
        returns = result.mean_return()
        return {
            "return": _to_list(returns),
            "return_std": _to_list(result.std_return()),
            "normalized_score": _to_list(normalized_score(self.env_id, returns)),
        }

    # ------------------------------------------------------------------------------------ AWAC stage
    def _device_dataset(self) -> awac.Batch:
        t = self.dataset.transitions
        arrays = t.as_dict()
        if not self.actions.is_identity:
            arrays = {**arrays, "actions": self.actions.to_unit(arrays["actions"])}
        return awac.Batch.from_mapping(arrays)

    def init_awac(self) -> awac.AWACState:
        cfg = self.config
        normalizer = awac.Normalizer.fit(self.dataset.transitions.observations)
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.num_seeds)
        return awac.init_seeds(keys, self.dataset.obs_dim, self.dataset.act_dim, cfg.awac, normalizer)

    def run_awac(self, writer: MetricsWriter) -> tuple[awac.AWACState, dict]:
        cfg = self.config
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "awac"))
        state, step, final = self.init_awac(), 0, None
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            step, final = int(meta["step"]), meta.get("final")
            self.log(f"[awac] resuming from step {step} ({ckpt.latest_step()})")
            _truncate_metrics(self.metrics_path, "awac", step)
        if final is not None and step >= cfg.awac_steps:
            self.log(f"[awac] already finished ({step} steps)")
            ckpt.close()
            return state, final

        data = self._device_dataset()
        train = awac.make_train_steps(cfg.steps_per_call)
        act = jax.jit(awac.act_seeds)
        progress = Progress(cfg.awac_steps, "awac", start_step=step)
        try:
            while step < cfg.awac_steps:
                t0 = time.perf_counter()
                state, metrics = train(state, data)
                metrics = jax.device_get(metrics)
                step += cfg.steps_per_call
                rate = cfg.steps_per_call / (time.perf_counter() - t0)
                writer.write("awac", step, {**metrics, "updates_per_s": rate})
                progress.update(step, critic_loss=float(np.mean(metrics["critic_loss"])))
                done = step >= cfg.awac_steps
                if step % cfg.eval_every == 0 or done:
                    scores = self._evaluate(lambda o: act(state, o))
                    writer.write("awac", step, scores)
                    self.log(f"[awac] step {step}: return {np.mean(scores['return']):.1f}, "
                             f"normalized {np.mean(scores['normalized_score']):.1f}")
                    if done:
                        final = scores
                if step % cfg.checkpoint_every == 0 or done or self.stop.signal is not None:
                    ckpt.save(step, state, {"step": step, "final": final})
                if self.stop.signal is not None and not done:
                    ckpt.wait()
                    raise Stopped(f"[awac] stopped at step {step}; checkpoint saved in "
                                  f"{ckpt.directory}; rerun the same command to resume")
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
        return state, final

    # ------------------------------------------------------------------------------------------ all
    def __call__(self) -> dict:
        cfg = self.config
        self.log(f"dataset {self.dataset.name}: {self.dataset.num_transitions} transitions, "
                 f"{self.dataset.num_episodes} episodes, env {self.env_id}; workdir {self.workdir}")
        started = time.time()
        finals: dict[str, Any] = {}
        with self.stop.installed(), MetricsWriter(self.workdir) as writer:
            if "awac" in cfg.stages:
                _, finals["awac"] = self.run_awac(writer)
        results = {
            "dataset": self.dataset.name,
            "dataset_path": self.dataset.path,
            "env": self.env_id,
            "num_seeds": cfg.num_seeds,
            "seed": cfg.seed,
            "preset": self.preset,
            "stages": list(cfg.stages),
            "final": finals,
            "config": config_lib.to_dict(cfg),
            "wall_time_s": time.time() - started,
        }
        _write_json_atomic(os.path.join(self.workdir, "results.json"), results)
        return results

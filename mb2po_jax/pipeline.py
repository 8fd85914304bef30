"""A training run, identified by its workdir: dataset -> stages, each checkpointed and resumable.

Host-side orchestration only: it loads data, calls the compiled training functions of each stage, and
handles files (config.json, metrics.jsonl, checkpoints/<stage>/, results.json), evaluation and signals.

    WORKDIR/config.json       the settings the run was started with (a rerun must agree on them)
    WORKDIR/metrics.jsonl     one JSON object per line: {"stage", "step", ...}; evaluations add
                              "return" and "normalized_score" (lists over seeds)
    WORKDIR/tensorboard/      the same metrics as TensorBoard event files
    WORKDIR/checkpoints/awac  orbax checkpoints of the full training state, one directory per stage
    WORKDIR/checkpoints/dynamics, WORKDIR/checkpoints/mb2po
    WORKDIR/results.json      written once, when every requested stage has finished

Stages: `awac` (pretraining on D_beta), `dynamics` (one ensemble per seed, trained epoch by epoch with
early stopping), `mb2po` (Algorithm 1, one compiled call per iteration). A later stage starts from the
finished checkpoint of the earlier one, so `--stages=mb2po` alone continues a workdir whose AWAC and
dynamics stages are done.
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

from mb2po_jax import awac, config as config_lib, dynamics as dyn, mb2po, sharding
from mb2po_jax.termination import termination_fn_for
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data import DEFAULT_DATASET, ensure_default_dataset, load_dataset, normalized_score
from mb2po_jax.data.envs import env_spaces
from mb2po_jax.errors import ConfigError
from mb2po_jax.evaluation import evaluate
from mb2po_jax.logger import MetricsWriter, Progress

# Settings that define what a workdir's checkpoints are; a rerun that differs in one of them is refused.
# Step counts, evaluation and checkpoint intervals may change between reruns (e.g. to extend a run).
IDENTITY_FIELDS = ("dataset", "env", "seed", "num_seeds", "awac", "dynamics", "mb2po")
# MB2PO settings that may change between reruns (extending a run), like the step counts.
MB2PO_SCHEDULE = ("iterations",)


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
        if dataset is None:
            ensure_default_dataset()
            dataset = DEFAULT_DATASET
        self.dataset = load_dataset(dataset, env)  # validated before any work
        self.env_id = self.dataset.env_id
        spaces = env_spaces(self.env_id)
        self.actions = ActionScaler(np.asarray(spaces.act_low), np.asarray(spaces.act_high))
        if "mb2po" in self.config.stages:  # refuse before any work, not after two stages
            self.available_bytes = mb2po.available_device_bytes()
            self.memory = mb2po.check_fits(self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim,
                                           self.config.num_seeds, self.available_bytes)
        self.mesh = sharding.seed_mesh(self.config.num_seeds)
        os.makedirs(self.workdir, exist_ok=True)
        self._check_config(dataset, env)
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")

    # ----------------------------------------------------------------------------------------- set-up
    def _identity(self, dataset_arg: str, env_arg: str | None) -> dict:
        cfg = config_lib.to_dict(self.config)
        schedule_free = {k: v for k, v in cfg["mb2po"].items() if k not in MB2PO_SCHEDULE}
        return {"dataset": dataset_arg, "env": self.env_id, "seed": cfg["seed"],
                "num_seeds": cfg["num_seeds"], "awac": cfg["awac"], "dynamics": cfg["dynamics"],
                "mb2po": schedule_free}

    def _check_config(self, dataset_arg: str, env_arg: str | None) -> None:
        path = os.path.join(self.workdir, "config.json")
        identity = json.loads(json.dumps(self._identity(dataset_arg, env_arg)))  # tuples -> lists
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            # Fields a workdir of an older version did not record are not compared.
            diffs = [k for k in IDENTITY_FIELDS
                     if k in previous.get("identity", {}) and previous["identity"][k] != identity[k]]
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

    def _end_of_call(self, stage: str, unit: str, writer: MetricsWriter, ckpt: Checkpointer, state, step: int,
                     *, done: bool, eval_due: bool, save_due: bool, act) -> dict | None:
        """After one compiled call of a stage's loop: evaluate when due (the last evaluation is the stage's
        final score, returned), checkpoint when due, at the end or on a signal, then stop on a signal.
        The checkpoint meta is {unit: step, "final": scores or None}."""
        final = None
        if eval_due or done:
            scores = self._evaluate(lambda o: act(state, o))
            writer.write(stage, step, scores)
            self.log(f"[{stage}] {unit} {step}: return {np.mean(scores['return']):.1f}, "
                     f"normalized {np.mean(scores['normalized_score']):.1f}")
            final = scores if done else None
        if save_due or done or self.stop.signal is not None:
            ckpt.save(step, state, {unit: step, "final": final})
        if self.stop.signal is not None and not done:
            ckpt.wait()
            raise Stopped(f"[{stage}] stopped at {unit} {step}; checkpoint saved in {ckpt.directory}; "
                          "rerun the same command to resume")
        return final

    # ------------------------------------------------------------------------------------ AWAC stage
    def _device_dataset(self) -> awac.Batch:
        t = self.dataset.transitions
        arrays = t.as_dict()
        if not self.actions.is_identity:
            arrays = {**arrays, "actions": self.actions.to_unit(arrays["actions"])}
        return sharding.replicate(awac.Batch.from_mapping(arrays), self.mesh)

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
        state = sharding.shard_seeds(state, self.mesh)

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
                final = self._end_of_call(
                    "awac", "step", writer, ckpt, state, step, done=step >= cfg.awac_steps,
                    eval_due=step % cfg.eval_every == 0, save_due=step % cfg.checkpoint_every == 0,
                    act=act) or final
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
        return state, final

    def _finished_awac(self) -> awac.AWACState:
        """The finished AWAC stage's state (what the later stages start from)."""
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "awac"))
        try:
            if ckpt.latest_step() is None:
                raise ConfigError(f"{self.workdir}: no AWAC checkpoint; run --stages=awac first")
            state, meta = ckpt.restore(self.init_awac())
        finally:
            ckpt.close()
        if meta.get("final") is None or int(meta["step"]) < self.config.awac_steps:
            raise ConfigError(f"{self.workdir}: the AWAC stage is not finished ({meta['step']} of "
                              f"{self.config.awac_steps} steps); run --stages=awac first")
        return state

    # -------------------------------------------------------------------------------- dynamics stage
    def _dynamics_transitions(self) -> dict[str, np.ndarray]:
        """D_beta as the ensemble sees it: actions in the policy's [-1, 1] scale, true successors only."""
        t = self.dataset.transitions
        arrays = t.as_dict()
        if not self.actions.is_identity:
            arrays["actions"] = self.actions.to_unit(arrays["actions"])
        return {**arrays, "next_valid": t.next_valid_mask}

    def init_dynamics(self):
        cfg = self.config
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1), cfg.num_seeds)
        return dyn.init_seeds(keys, self._dynamics_transitions(), cfg.dynamics)

    def run_dynamics(self, writer: MetricsWriter) -> dyn.DynamicsState:
        """Trains one ensemble per seed until every seed has stopped early or `dynamics_steps` updates;
        checkpointed after every epoch (so resume is exact and loses at most one epoch)."""
        cfg = self.config
        dcfg = cfg.dynamics
        state, data, keys = self.init_dynamics()
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "dynamics"))
        done = False
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            done = bool(meta.get("done"))
            self.log(f"[dynamics] resuming after epoch {int(np.max(state.epoch))} "
                     f"({int(np.max(state.step))} updates)")
            _truncate_metrics(self.metrics_path, "dynamics", int(np.max(state.step)))
        if done:
            self.log("[dynamics] already finished")
            ckpt.close()
            return dyn.restore_best(state)

        state, data, keys = sharding.shard_seeds((state, data, keys), self.mesh)
        epoch_fn = dyn.make_train_epoch_seeds(dcfg)
        num_train = data["bootstrap"].shape[-1]
        self.log(f"[dynamics] {cfg.num_seeds} seed(s) x {dcfg.num_members} members, {num_train} training / "
                 f"{data['holdout_targets'].shape[1]} holdout transitions, {num_train // dcfg.batch_size} "
                 f"updates per epoch, budget {cfg.dynamics_steps} updates")
        progress = Progress(cfg.dynamics_steps, "dynamics", start_step=int(np.min(state.step)),
                            min_interval_s=0.0)

        def stopped(state):
            since = np.asarray(state.epochs_since_improvement)
            early = since >= dcfg.max_epochs_since_improvement if cfg.dynamics_early_stopping else False
            return early | (np.asarray(state.step) >= cfg.dynamics_steps)

        try:
            while not np.all(stopped(state)):
                budget = np.where(stopped(state), 0, cfg.dynamics_steps - np.asarray(state.step))
                epoch_keys = jax.vmap(jax.random.fold_in)(keys, state.epoch)
                state, metrics = epoch_fn(state, data, epoch_keys, jnp.asarray(budget, jnp.int32))
                metrics = jax.device_get(metrics)
                step = int(np.max(state.step))
                done = bool(np.all(stopped(state)))
                writer.write("dynamics", step, {
                    "train_loss": metrics["train_loss"], "holdout_mse": metrics["holdout_mse"],
                    "holdout_nll": metrics["holdout_nll"], "best_holdout_mse": state.best_holdout_mse,
                    "elites": state.elites, "epoch": state.epoch, "updates": state.step,
                })
                progress.update(step, holdout_mse=float(np.mean(metrics["holdout_mse"])),
                                stopped=f"{int(np.sum(stopped(state)))}/{cfg.num_seeds}")
                ckpt.save(int(np.max(state.epoch)), state, {"done": done})
                if self.stop.signal is not None and not done:
                    ckpt.wait()
                    raise Stopped(f"[dynamics] stopped after epoch {int(np.max(state.epoch))}; checkpoint "
                                  f"saved in {ckpt.directory}; rerun the same command to resume")
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
        best = np.min(np.asarray(state.best_holdout_mse), axis=-1)
        self.log(f"[dynamics] done: best holdout MSE per seed [{', '.join(f'{x:.4g}' for x in best)}], "
                 f"elites {np.asarray(state.elites).tolist()}")
        return dyn.restore_best(state)

    def _finished_dynamics(self) -> dyn.DynamicsState:
        state, _, _ = self.init_dynamics()
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "dynamics"))
        try:
            if ckpt.latest_step() is None:
                raise ConfigError(f"{self.workdir}: no dynamics checkpoint; run --stages=dynamics first")
            state, meta = ckpt.restore(state)
        finally:
            ckpt.close()
        if not meta.get("done"):
            raise ConfigError(f"{self.workdir}: the dynamics stage is not finished; run --stages=dynamics")
        return dyn.restore_best(state)

    # ----------------------------------------------------------------------------------- MB2PO stage
    def init_mb2po(self, agents: awac.AWACState) -> mb2po.MB2POState:
        return mb2po.init_seeds(agents, self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim)

    def run_mb2po(self, writer: MetricsWriter, agents: awac.AWACState, dyn_state: dyn.DynamicsState):
        cfg, mcfg = self.config, self.config.mb2po
        ring_bytes, rollout_bytes = self.memory
        self.log(f"[mb2po] memory: model rings {ring_bytes / 2**30:.2f} GiB ({cfg.num_seeds} seed(s) x "
                 f"{mcfg.num_slots} iterations x {mcfg.rows_per_slot:,} rows, {mcfg.buffer_dtype}) + "
                 f"{rollout_bytes / 2**30:.2f} GiB per rollout; h={mcfg.horizon}, "
                 f"lambda={mcfg.penalty_coef}, omega={mcfg.omega}, penalty={mcfg.penalty}")
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "mb2po"))
        state, it, final = self.init_mb2po(agents), 0, None
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            it, final = int(meta["iteration"]), meta.get("final")
            self.log(f"[mb2po] resuming from iteration {it}")
            _truncate_metrics(self.metrics_path, "mb2po", it)
        if final is not None and it >= mcfg.iterations:
            self.log(f"[mb2po] already finished ({it} iterations)")
            ckpt.close()
            return state, final

        data = self._device_dataset()
        models = dyn_state.replace(opt_state=None, best_params=None)  # what the rollout reads
        state, models = sharding.shard_seeds((state, models), self.mesh)
        step_fn = mb2po.make_iteration_fn(mcfg, termination_fn_for(self.env_id))
        act = jax.jit(lambda st, o: awac.act_seeds(st.agent, o))
        progress = Progress(mcfg.iterations, "mb2po", start_step=it, min_interval_s=0.0)
        try:
            while it < mcfg.iterations:
                t0 = time.perf_counter()
                state, metrics = step_fn(state, models, data)
                metrics = jax.device_get(metrics)
                it += 1
                seconds = time.perf_counter() - t0
                writer.write("mb2po", it, {**metrics, "seconds_per_iteration": seconds})
                progress.update(it, s_per_iter=seconds,
                                valid=int(np.mean(metrics["rollout_num_valid"])),
                                penalty=float(np.mean(metrics["rollout_mean_penalty"])),
                                critic_loss=float(np.mean(metrics["critic_loss"])))
                final = self._end_of_call(
                    "mb2po", "iteration", writer, ckpt, state, it, done=it >= mcfg.iterations,
                    eval_due=it % cfg.mb2po_eval_every == 0, save_due=it % cfg.mb2po_checkpoint_every == 0,
                    act=act) or final
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
        return state, final

    # ------------------------------------------------------------------------------------------ all
    def __call__(self) -> dict:
        cfg = self.config
        self.log(f"dataset {self.dataset.name}: {self.dataset.num_transitions} transitions, "
                 f"{self.dataset.num_episodes} episodes, env {self.env_id}; workdir {self.workdir}; "
                 f"{cfg.num_seeds} seed(s) on {sharding.describe(self.mesh)}")
        if "mb2po" in cfg.stages:
            ring, peak = self.memory
            self.log(f"MB2PO memory: model rings {ring / 2**30:.2f} GiB + {peak / 2**30:.2f} GiB per rollout "
                     f"(available: {(self.available_bytes or 0) / 2**30:.1f} GiB)")
        started = time.time()
        finals: dict[str, Any] = {}
        with self.stop.installed(), MetricsWriter(self.workdir) as writer:
            agents = dyn_state = None
            if "awac" in cfg.stages:
                agents, finals["awac"] = self.run_awac(writer)
            if "dynamics" in cfg.stages:
                dyn_state = self.run_dynamics(writer)
            if "mb2po" in cfg.stages:
                agents = agents if agents is not None else self._finished_awac()
                dyn_state = dyn_state if dyn_state is not None else self._finished_dynamics()
                _, finals["mb2po"] = self.run_mb2po(writer, agents, dyn_state)
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

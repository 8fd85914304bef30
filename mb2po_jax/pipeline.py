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

Several processes (multi-host, `jax.distributed` initialised by the CLI): every process runs this same
code on the same workdir (a filesystem all hosts see). States are global arrays of which each process holds
its own shards (`sharding`); every process takes part in each checkpoint save and restore (orbax writes
each process's shards), reads training metrics through a collective (`sharding.to_host`), evaluates the
seeds it holds, and agrees on stopping after a signal. Process 0 alone writes config.json, metrics.jsonl,
TensorBoard files and results.json, and prints progress.
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
from jax.sharding import Mesh

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


class _NullWriter:
    """What processes other than 0 write metrics to."""

    def write(self, stage: str, step: int, metrics: Any) -> None:
        del stage, step, metrics

    def truncate(self, stage: str, step: int) -> None:
        del stage, step

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Discard:
    """Where the progress lines of processes other than 0 go."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


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


def _to_list(x) -> list[float]:
    return [float(v) for v in np.asarray(x).reshape(-1)]


_act_seeds = jax.jit(awac.act_seeds)  # deterministic evaluation actions, state [S], obs [S, N, o]


class Run:
    """One `mb2po-train` invocation over a workdir. layout: (mesh, rollout mesh) as `sharding.cpu_layout`
    gives them; default: `sharding.run_mesh(num_seeds)` over every device, and no rollout mesh."""

    def __init__(self, workdir: str, dataset: str | None, env: str | None, config: config_lib.RunConfig,
                 *, preset: str = "custom", log: Callable[[str], None] | None = None,
                 layout: tuple[Mesh | None, Mesh | None] | None = None):
        self.workdir = os.path.abspath(workdir)
        self.config = config.validate()
        self.preset = preset
        self.is_chief = jax.process_index() == 0  # the one process that writes files and prints
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log = log if self.is_chief else (lambda msg: None)
        self.stop = _StopFlag()
        if dataset is None:
            ensure_default_dataset()
            dataset = DEFAULT_DATASET
        self.dataset = load_dataset(dataset, env)  # validated before any work
        self.env_id = self.dataset.env_id
        spaces = env_spaces(self.env_id)
        self.actions = ActionScaler(np.asarray(spaces.act_low), np.asarray(spaces.act_high))
        self.mesh, self.rollout_mesh = layout or (sharding.run_mesh(self.config.num_seeds), None)
        if "mb2po" in self.config.stages:  # refuse before any work, not after two stages
            self.available_bytes = mb2po.available_device_bytes()
            self.memory = mb2po.check_fits(self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim,
                                           self.config.num_seeds, self.available_bytes,
                                           share=self._memory_share())
        os.makedirs(self.workdir, exist_ok=True)
        self._check_config(dataset, env)
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")

    # ----------------------------------------------------------------------------------------- set-up
    def _memory_share(self) -> float:
        """Fraction of the model rings in the memory `available_device_bytes` measures: a mesh splits them
        evenly over its devices; CPU devices of one process share its host's RAM."""
        if self.mesh is None:
            return 1.0
        devices = list(self.mesh.devices.flat)
        if devices[0].platform != "cpu":
            return 1.0 / len(devices)
        return sum(d.process_index == jax.process_index() for d in devices) / len(devices)

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
        if not self.is_chief:
            return
        _write_json_atomic(path, {
            "identity": identity,
            "preset": self.preset,
            "config": config_lib.to_dict(self.config),
            "dataset_path": self.dataset.path,
        })

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, agents: awac.AWACState) -> dict[str, list[float]]:
        """Deterministic-policy returns of every seed of `agents` [S] in the real environment. Each process
        evaluates the seeds it holds (process 0 all of them when the state is not seed-sharded); the scores
        are then combined, so every process returns the same lists."""
        cfg = self.config
        mine = sharding.process_seeds(cfg.num_seeds, self.mesh)
        returns, stds = np.zeros(cfg.num_seeds), np.zeros(cfg.num_seeds)
        if mine.stop > mine.start:
            local = sharding.local_rows(agents, mine)

            def act_fn(obs: np.ndarray) -> np.ndarray:
                return self.actions.to_env(np.asarray(_act_seeds(local, jnp.asarray(obs))))

            result = evaluate(act_fn, self.env_id, num_seeds=mine.stop - mine.start,
                              num_episodes=cfg.eval_episodes, seed=cfg.seed + 10_000,
                              max_episode_steps=cfg.max_episode_steps, first_seed_index=mine.start)
            returns[mine], stds[mine] = result.mean_return(), result.std_return()
        returns = sharding.combine_over_processes(returns, mine)
        stds = sharding.combine_over_processes(stds, mine)
        return {
            "return": _to_list(returns),
            "return_std": _to_list(stds),
            "normalized_score": _to_list(normalized_score(self.env_id, returns)),
        }

    def _stopping(self) -> bool:
        """A signal reached any process (all processes must stop at the same call: saves are collective)."""
        return sharding.any_process(self.stop.signal is not None)

    def _end_of_call(self, stage: str, unit: str, writer: MetricsWriter, ckpt: Checkpointer, state, step: int,
                     *, done: bool, eval_due: bool, save_due: bool, agents: awac.AWACState) -> dict | None:
        """After one compiled call of a stage's loop: evaluate `agents` when due (the last evaluation is the
        stage's final score, returned), checkpoint when due, at the end or on a signal, then stop on a
        signal. The checkpoint meta is {unit: step, "final": scores or None}."""
        final = None
        stopping = self._stopping()
        if eval_due or done:
            scores = self._evaluate(agents)
            writer.write(stage, step, scores)
            self.log(f"[{stage}] {unit} {step}: return {np.mean(scores['return']):.1f}, "
                     f"normalized {np.mean(scores['normalized_score']):.1f}")
            final = scores if done else None
        if save_due or done or stopping:
            ckpt.save(step, state, {unit: step, "final": final})
        if stopping and not done:
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
        """AWAC states [S] of every seed, placed on the run's mesh (each process fills its own shards)."""
        cfg = self.config
        normalizer = awac.Normalizer.fit(self.dataset.transitions.observations)
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.num_seeds)
        state = awac.init_seeds(keys, self.dataset.obs_dim, self.dataset.act_dim, cfg.awac, normalizer)
        return sharding.shard_seeds(state, self.mesh)

    def _progress(self, total: int, desc: str, start_step: int, **kwargs) -> Progress:
        stream = None if self.is_chief else _Discard()
        return Progress(total, desc, start_step=start_step, stream=stream, **kwargs)

    def run_awac(self, writer: MetricsWriter) -> tuple[awac.AWACState, dict]:
        cfg = self.config
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints", "awac"))
        state, step, final = self.init_awac(), 0, None
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)  # into the placed state: each process reads its shards
            step, final = int(meta["step"]), meta.get("final")
            self.log(f"[awac] resuming from step {step} ({ckpt.latest_step()})")
        writer.truncate("awac", step)  # records after the checkpoint are redone (all of them without one)
        if final is not None and step >= cfg.awac_steps:
            self.log(f"[awac] already finished ({step} steps)")
            ckpt.close()
            return state, final

        data = self._device_dataset()
        train = awac.make_train_steps(cfg.steps_per_call)
        progress = self._progress(cfg.awac_steps, "awac", start_step=step)
        try:
            while step < cfg.awac_steps:
                t0 = time.perf_counter()
                state, metrics = train(state, data)
                metrics = sharding.to_host(metrics)
                step += cfg.steps_per_call
                rate = cfg.steps_per_call / (time.perf_counter() - t0)
                writer.write("awac", step, {**metrics, "updates_per_s": rate})
                progress.update(step, critic_loss=float(np.mean(metrics["critic_loss"])))
                final = self._end_of_call(
                    "awac", "step", writer, ckpt, state, step, done=step >= cfg.awac_steps,
                    eval_due=step % cfg.eval_every == 0, save_due=step % cfg.checkpoint_every == 0,
                    agents=state) or final
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
        """(ensemble states [S], epoch data [S], epoch keys [S]), placed on the run's mesh."""
        cfg = self.config
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1), cfg.num_seeds)
        states = dyn.init_seeds(keys, self._dynamics_transitions(), cfg.dynamics)
        return sharding.shard_seeds(states, self.mesh)

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
            epoch, updates = (int(np.max(x)) for x in sharding.to_host((state.epoch, state.step)))
            self.log(f"[dynamics] resuming after epoch {epoch} ({updates} updates)")
        else:
            updates = 0
        writer.truncate("dynamics", updates)
        if done:
            self.log("[dynamics] already finished")
            ckpt.close()
            return dyn.restore_best(state)

        epoch_fn = dyn.make_train_epoch_seeds(dcfg)
        num_train = data["bootstrap"].shape[-1]
        self.log(f"[dynamics] {cfg.num_seeds} seed(s) x {dcfg.num_members} members, {num_train} training / "
                 f"{data['holdout_targets'].shape[1]} holdout transitions, {num_train // dcfg.batch_size} "
                 f"updates per epoch, budget {cfg.dynamics_steps} updates")
        def counters(state):  # the host's view of the [S] counters (a collective on several processes)
            return sharding.to_host({"since": state.epochs_since_improvement, "updates": state.step,
                                     "epoch": state.epoch, "best_holdout_mse": state.best_holdout_mse,
                                     "elites": state.elites})

        def stopped(c):
            early = (c["since"] >= dcfg.max_epochs_since_improvement if cfg.dynamics_early_stopping
                     else False)
            return early | (c["updates"] >= cfg.dynamics_steps)

        c = counters(state)
        progress = self._progress(cfg.dynamics_steps, "dynamics", start_step=int(np.min(c["updates"])),
                                  min_interval_s=0.0)
        try:
            while not np.all(stopped(c)):
                budget = np.where(stopped(c), 0, cfg.dynamics_steps - c["updates"]).astype(np.int32)
                epoch_keys = jax.vmap(jax.random.fold_in)(keys, state.epoch)
                state, metrics = epoch_fn(state, data, epoch_keys, sharding.shard_seeds(budget, self.mesh))
                metrics, c = sharding.to_host(metrics), counters(state)
                step = int(np.max(c["updates"]))
                done = bool(np.all(stopped(c)))
                writer.write("dynamics", step, {
                    "train_loss": metrics["train_loss"], "holdout_mse": metrics["holdout_mse"],
                    "holdout_nll": metrics["holdout_nll"], "best_holdout_mse": c["best_holdout_mse"],
                    "elites": c["elites"], "epoch": c["epoch"], "updates": c["updates"],
                })
                progress.update(step, holdout_mse=float(np.mean(metrics["holdout_mse"])),
                                stopped=f"{int(np.sum(stopped(c)))}/{cfg.num_seeds}")
                stopping = self._stopping()
                ckpt.save(int(np.max(c["epoch"])), state, {"done": done})
                if stopping and not done:
                    ckpt.wait()
                    raise Stopped(f"[dynamics] stopped after epoch {int(np.max(c['epoch']))}; checkpoint "
                                  f"saved in {ckpt.directory}; rerun the same command to resume")
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
        best = np.min(c["best_holdout_mse"], axis=-1)
        self.log(f"[dynamics] done: best holdout MSE per seed [{', '.join(f'{x:.4g}' for x in best)}], "
                 f"elites {c['elites'].tolist()}")
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
        """MB2PO states [S] with empty rings, built in their layout on the run's mesh."""
        return mb2po.init_sharded(agents, self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim,
                                  self.mesh)

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
        writer.truncate("mb2po", it)
        if final is not None and it >= mcfg.iterations:
            self.log(f"[mb2po] already finished ({it} iterations)")
            ckpt.close()
            return state, final

        data = self._device_dataset()
        models = dyn_state.replace(opt_state=None, best_params=None)  # what the rollout reads
        models = sharding.shard_seeds(models, self.mesh)
        step_fn = mb2po.make_iteration_fn(mcfg, termination_fn_for(self.env_id), self.mesh, self.rollout_mesh)
        progress = self._progress(mcfg.iterations, "mb2po", start_step=it, min_interval_s=0.0)
        try:
            while it < mcfg.iterations:
                t0 = time.perf_counter()
                state, metrics = step_fn(state, models, data)
                metrics = sharding.to_host(metrics)
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
                    agents=state.agent) or final
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
                 f"{cfg.num_seeds} seed(s) on {sharding.describe(self.mesh)}"
                 + ("" if self.rollout_mesh is None or "mb2po" not in cfg.stages else
                    f"; MB2PO rollouts split over {self.rollout_mesh.devices.size} CPU host devices"))
        if "mb2po" in cfg.stages:
            ring, peak = self.memory
            self.log(f"MB2PO memory: model rings {ring / 2**30:.2f} GiB + {peak / 2**30:.2f} GiB per rollout "
                     f"(available: {(self.available_bytes or 0) / 2**30:.1f} GiB)")
        started = time.time()
        finals: dict[str, Any] = {}
        with self.stop.installed(), (MetricsWriter(self.workdir) if self.is_chief else _NullWriter()) as writer:
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
            "env_id": self.env_id,  # the Gymnasium id evaluated in (D4RL data: v4; SPEC names it `env`)
            "num_seeds": cfg.num_seeds,
            "seed": cfg.seed,
            "preset": self.preset,
            "stages": list(cfg.stages),
            "final": finals,
            "config": config_lib.to_dict(cfg),
            "wall_time_s": time.time() - started,
            "num_processes": jax.process_count(),
        }
        if self.is_chief:
            _write_json_atomic(os.path.join(self.workdir, "results.json"), results)
        return results

"""A training run, identified by its workdir: dataset -> stages, each checkpointed and resumable.

Host-side orchestration only: it loads data, calls the compiled training functions of each stage, and
handles files (config.json, metrics.jsonl, checkpoints/<stage>/, results.json), evaluation and signals.

    WORKDIR/.lock             flock'ed by the process using the workdir (its PID inside); a second is refused
    WORKDIR/config.json       the settings the run was started with (a rerun must agree on them)
    WORKDIR/metrics.jsonl     one JSON object per line: {"stage", "step", ...}; evaluations add
                              "return" and "normalized_score" (lists over seeds)
    WORKDIR/tensorboard/<stage>/  the same metrics as TensorBoard event files, one run per stage
    WORKDIR/checkpoints/awac  orbax checkpoints of the full training state, one directory per stage
    WORKDIR/checkpoints/dynamics, WORKDIR/checkpoints/mb2po, WORKDIR/checkpoints/online
    WORKDIR/results.json      written when every requested stage has finished: the final scores of every
                              finished stage in the workdir, those of stages not rerun included

Stages: `awac` (pretraining on D_beta), `dynamics` (one ensemble per seed, trained epoch by epoch with
early stopping), `mb2po` (Algorithm 1, one compiled call per iteration), `online` (AWAC continued in the
real environment from the MB2PO agent if the workdir has one, else the AWAC agent; `online.py`). A later
stage starts from the finished checkpoint of the earlier one, so `--stages=mb2po` alone continues a
workdir whose AWAC and dynamics stages are done.

Several processes (multi-host, `jax.distributed` initialised by the CLI): every process runs this same
code on the same workdir (a filesystem all hosts see). States are global arrays of which each process holds
its own shards (`sharding`); every process takes part in each checkpoint save and restore (orbax writes
each process's shards), reads training metrics through a collective (`sharding.to_host`), evaluates the
seeds it holds, and agrees on stopping after a signal. Process 0 alone writes config.json, metrics.jsonl,
TensorBoard files and results.json, holds the workdir's lock, and prints progress.

What a run's record survives: a kill at any moment (rerun: metrics.jsonl and the checkpoints are those of an
uninterrupted run), a damaged newest checkpoint (skipped with a warning, moved aside, the run resumes from
the step before it), a second process on the workdir (refused), and divergence (the run stops at the first
non-finite loss or parameter, before saving it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mb2po_jax import (awac, config as config_lib, dynamics as dyn, mb2po, online, parallel,
                       policy as policy_lib, rollout as ro, sharding)
from mb2po_jax.termination import termination_fn_for
from mb2po_jax.checkpoint import CheckpointDamagedError, Checkpointer
from mb2po_jax.behavior.generation import ensure_default_dataset
from mb2po_jax.data import DEFAULT_DATASET, load_dataset, normalized_score
from mb2po_jax.data.envs import env_spaces, make_env
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError, DivergedError, WorkdirError
from mb2po_jax.evaluation import evaluate
from mb2po_jax.logger import MetricsWriter, Progress

# Settings that define what a workdir's checkpoints are (config.identity, with the dataset and env); a rerun
# that differs in one of them is refused.
IDENTITY_FIELDS = ("dataset", "env", "seed", "num_seeds", "awac", "dynamics", "mb2po", "online")


class Stopped(Exception):
    """Raised after a SIGTERM/SIGINT once the current compiled call has finished and a checkpoint is saved."""


@dataclasses.dataclass
class StageLoop:
    """What one stage supplies to the shared training loop (`Run._drive`), in the spirit of purejaxrl's
    `make_train`: its compiled call and the host-side rules around it. `step` counts the stage's `unit`."""

    name: str  # checkpoint directory and metrics.jsonl's "stage"
    unit: str  # what `step` counts, in messages: "step", "update", "iteration"
    total: int  # the step count the progress line counts to
    call: Callable[[Any], tuple[Any, dict]]  # state -> (state, metrics on the host): one compiled call
    resume: Callable[[Any, dict], tuple[int, bool]]  # restored (state, checkpoint meta) -> (step, done)
    advance: Callable[[Any, int], tuple[int, bool]]  # (state, step) after a call -> (step, done)
    record: Callable[[Any, dict, float], tuple[dict, dict]]  # (state, metrics, seconds) -> (logged, shown)
    params: Callable[[Any], Any]  # what must stay finite
    hint: str  # what to change when it does not
    agents: Callable[[Any], Any] | None = None  # the policy to evaluate (None: the stage has none)
    eval_every: int = 0  # evaluate when step % eval_every == 0 (and at the end)
    checkpoint_every: int = 1  # checkpoint when step % checkpoint_every == 0 (and at the end)
    checkpoint_key: Callable[[Any, int], int] = lambda state, step: step  # the checkpoint's number
    progress_interval_s: float | None = None  # None: Progress's default
    progress_unit: str | None = None  # None: Progress's steps/s
    # (step, scores, done) after each evaluation -> the stage's final result when done (default: scores)
    evaluated: Callable[[int, dict, bool], dict] | None = None
    extra_meta: Callable[[Any], dict] | None = None  # state -> more JSON for the checkpoint meta


class _StageLambda:
    """A stage's per-seed lambda (`Run.penalty_coefs`): computed when the stage starts, recorded in its
    checkpoints' meta ("penalty"), and on resume taken from there, so a stage keeps the lambda it started
    with (even if a new version or device layout would compute it differently)."""

    def __init__(self, stage: str, figures: dict, mesh: Mesh | None, log: Callable[[str], None]):
        self.stage, self.mesh, self.log = stage, mesh, log
        self._set(figures)

    def _set(self, figures: dict) -> None:
        self.figures = figures
        self.array = sharding.shard_seeds(jnp.asarray(figures["penalty_coef"], jnp.float32), self.mesh)

    def resume(self, meta: dict) -> None:
        recorded = meta.get("penalty")
        if recorded is None:  # a checkpoint of a version before the cap: the lambda computed now
            return
        if recorded["penalty_coef"] != self.figures["penalty_coef"]:
            self.log(f"[{self.stage}] resuming with the lambda its checkpoint records, "
                     f"{recorded['penalty_coef']} (computed now: {self.figures['penalty_coef']})")
        self._set(recorded)


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


def _differences(old: dict, new: dict, open_sections: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(flag, old value, new value) of every setting that differs between two recorded identities, except
    in `open_sections`. A key only one of them has (a field a workdir of another version did not record)
    is not compared, except `config.ADDED_FIELDS`, which an older workdir ran with their old value."""
    old = config_lib.with_added_fields(old)
    out = []
    for key in IDENTITY_FIELDS:
        if key in open_sections or key not in old or key not in new:
            continue
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):  # a config section: its fields one by one
            out += [(config_lib.flag_name(key, f), a[f], b[f]) for f in b if f in a and a[f] != b[f]]
        elif a != b:
            out.append((f"--{key}", a, b))
    return out


def _make_workdir(path: str) -> bool:
    """Creates `path` if needed; returns whether it was created. WorkdirError if it cannot be a workdir."""
    if os.path.isdir(path):
        return False
    if os.path.exists(path):
        raise WorkdirError(f"--workdir {path} is a file, not a directory; choose another --workdir")
    try:
        os.makedirs(path)
    except FileExistsError:  # another process made it in between
        return False
    except OSError as e:
        raise WorkdirError(f"--workdir {path} cannot be created ({e.strerror or e}); choose another --workdir")
    return True


class _WorkdirLock:
    """An exclusive flock on WORKDIR/.lock, with the holder's PID written in the file. The OS releases it
    when the process ends, however it ends, so a killed run never blocks a rerun; a second live process is
    refused at once, by name. `release()` (or garbage collection) closes the descriptor, which drops the
    lock; the file stays, as removing it would race a process about to lock it."""

    def __init__(self, workdir: str, log: Callable[[str], None]):
        self.path = os.path.join(workdir, ".lock")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"{self.path}: cannot open the workdir's lock file ({e.strerror or e}); "
                               "check the --workdir's permissions") from None
        self.release = weakref.finalize(self, os.close, self._fd)  # closing the descriptor drops the lock
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.release()
            raise WorkdirError(f"{workdir} is in use by process {holder} (it holds {self.path}); wait for it "
                               "to end or stop it, or use another --workdir") from None
        except OSError as e:  # a filesystem without locks: run, but say what is not guarded
            log(f"warning: cannot lock {self.path} ({e.strerror or e}); nothing stops a second process "
                "from using this workdir at the same time")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def _holder(self) -> str:
        """'PID on host H' from the lock file (its holder may be a moment away from writing it)."""
        for _ in range(40):
            text = os.pread(self._fd, 256, 0).decode(errors="replace").split()
            if len(text) >= 2:
                return f"{text[0]} on host {text[1]}"
            time.sleep(0.05)
        return "another process"


def _first_nonfinite(metrics: dict, seed: int) -> str | None:
    """'name is nan' for the first floating metric ([S, ...] arrays) not finite for `seed`, else None."""
    for name, value in metrics.items():
        v = np.asarray(value)
        if v.dtype.kind == "f":
            bad = v[seed][~np.isfinite(v[seed])]
            if bad.size:
                return f"{name} is {bad.reshape(-1)[0]}"
    return None


def _has_steps(directory: str) -> bool:
    """Whether a stage's checkpoint directory holds a step (without creating it, as a Checkpointer would)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


@jax.jit
def _finite_seeds(tree) -> jax.Array:
    """[S] bool: every floating leaf of the [S]-leading `tree` finite, per seed (one reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    per_leaf = [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]
    return jnp.stack(per_leaf).all(axis=0)


class Run:
    """One `mb2po-train` invocation over a workdir, which it holds (WORKDIR/.lock) until `__call__` returns
    or `close()`. layout: (mesh, rollout mesh) as `sharding.cpu_layout` gives them; default:
    `sharding.run_mesh(num_seeds)` over every device, and no rollout mesh. restart_from: a stage whose
    checkpoints, results and metrics are deleted, with those of the stages after it, before the run.
    record=False: a tool that only reads a finished workdir (experiments/termination_check.py, with the
    workdir's own config, `config_lib.from_dict`) leaves its config.json as training wrote it."""

    def __init__(self, workdir: str, dataset: str | None, env: str | None, config: config_lib.RunConfig,
                 *, preset: str = "custom", log: Callable[[str], None] | None = None,
                 layout: tuple[Mesh | None, Mesh | None] | None = None, restart_from: str | None = None,
                 record: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.config = config.validate()
        if restart_from is not None and restart_from not in config_lib.STAGES:
            raise ConfigError(f"--restart_from={restart_from} is not one of {','.join(config_lib.STAGES)}")
        self.restarted = (() if restart_from is None
                          else config_lib.STAGES[config_lib.STAGES.index(restart_from):])
        self.preset = preset
        self.is_chief = jax.process_index() == 0  # the one process that writes files and prints
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log = log if self.is_chief else (lambda msg: None)
        self.stop = _StopFlag()
        created = _make_workdir(self.workdir)
        self._lock = _WorkdirLock(self.workdir, self.log) if self.is_chief else None  # before any work
        try:
            if dataset is None:
                ensure_default_dataset()
                dataset = DEFAULT_DATASET
            self.dataset = load_dataset(dataset, env)  # validated before any work
            self.env_id = self.dataset.env_id
            self.spaces = env_spaces(self.env_id)  # the policy acts in [-1, 1]; these bounds rescale it
            self.mesh, self.rollout_mesh = layout or (sharding.run_mesh(self.config.num_seeds), None)
            if self._uses_model_ring():  # refuse before any work, not after two stages
                self.available_bytes = parallel.available_device_bytes()
                self.memory = parallel.check_fits(self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim,
                                                  self.config.num_seeds, self.available_bytes,
                                                  share=self._memory_share())
            identity = self._check_config(dataset, env)
            self._check_later_stages()
            if self.is_chief and record:  # recorded once every check has passed
                _write_json_atomic(os.path.join(self.workdir, "config.json"), {
                    "identity": identity, "preset": self.preset, "config": config_lib.to_dict(self.config),
                    "dataset_path": self.dataset.path})
        except BaseException:
            self.close()
            if created and self.is_chief and os.listdir(self.workdir) == [".lock"]:  # leave nothing behind
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def close(self) -> None:
        """Releases the workdir (done by `__call__`; for a Run that is never called)."""
        if self._lock is not None:
            self._lock.release()

    # ----------------------------------------------------------------------------------------- set-up
    def _uses_model_ring(self) -> bool:
        """Whether a stage of this run allocates an MB2PO model ring (mb2po, or online with --online_model)."""
        return "mb2po" in self.config.stages or ("online" in self.config.stages and self.config.online.model)

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
        return {"dataset": dataset_arg, "env": self.env_id, **config_lib.identity(self.config)}

    def _open_sections(self) -> tuple[str, ...]:
        """The config sections whose settings may still change: a stage's, until that stage or a later one
        has a checkpoint (a stage that --restart_from deletes counts as not started). So a finished
        workdir can branch into an online stage with other settings, or rerun MB2PO with another
        --penalty_coef after --restart_from=mb2po, while AWAC's and the dynamics' settings stay fixed."""
        started = [stage for stage in config_lib.STAGES
                   if stage not in self.restarted and _has_steps(self._stage_dir(stage))]
        if not started:
            return config_lib.SECTIONS
        return config_lib.STAGES[config_lib.STAGES.index(started[-1]) + 1:]

    def _check_config(self, dataset_arg: str, env_arg: str | None) -> dict:
        """Refuses settings that differ from those the workdir's checkpoints were made with (naming each
        differing setting with both values; the dataset, env and seeds always, a stage's settings once it
        or a later stage has a checkpoint: `_open_sections`); returns this run's identity, for config.json."""
        path = os.path.join(self.workdir, "config.json")
        identity = json.loads(json.dumps(self._identity(dataset_arg, env_arg)))  # tuples -> lists
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    previous = json.load(f)
                if not isinstance(previous, dict) or not isinstance(previous.get("identity", {}), dict):
                    raise ValueError("not a JSON object with an 'identity' object")
            except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise WorkdirError(
                    f"{path} is damaged ({' '.join(str(e).split())}): it records the settings this workdir's "
                    "checkpoints were made with; restore it, or delete it and rerun with the original settings"
                ) from None
            # Fields a workdir of an older version did not record are not compared.
            diffs = _differences(previous.get("identity", {}), identity, self._open_sections())
            if diffs:
                shown = "; ".join(f"{name}: was {old!r}, now {new!r}" for name, old, new in diffs[:8])
                more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
                raise ConfigError(
                    f"{self.workdir} holds a run with other settings ({shown}{more}); "
                    "use a new --workdir or the original settings"
                )
        return identity

    def _stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, "checkpoints", stage)

    def _stage_meta(self, stage: str) -> dict | None:
        """The meta of a stage's newest checkpoint, or None (no checkpoint, or the newest one is damaged:
        restoring the stage reports it then)."""
        if not _has_steps(self._stage_dir(stage)):
            return None
        ckpt = Checkpointer(self._stage_dir(stage))
        try:
            return ckpt.read_meta()
        except CheckpointDamagedError:
            return None
        finally:
            ckpt.close()

    def _check_later_stages(self) -> None:
        """MB2PO starts from the finished AWAC state, and the online stage from the finished MB2PO (else
        AWAC) state; training a stage on after a later one ran from it would leave that later stage's
        checkpoint and result made from a state the workdir no longer has. Refused before any work, unless
        --restart_from deletes the later stages. (A finished dynamics stage is never trained on.)"""
        cfg = self.config
        checks = (("awac", "step", cfg.awac_steps, "--awac_steps", ("mb2po", "online")),
                  ("mb2po", "iteration", cfg.mb2po.iterations, "--mb2po_iterations", ("online",)))
        for stage, unit, total, flag, later in checks:
            if stage not in cfg.stages or stage in self.restarted:
                continue
            meta = self._stage_meta(stage)
            if meta is None or int(meta.get(unit, 0)) >= total:
                continue
            trained = [s for s in later if s not in self.restarted and _has_steps(self._stage_dir(s))]
            if not trained:
                continue
            done = int(meta[unit])
            raise ConfigError(
                f"{flag}={total} would train the {stage} stage on from {unit} {done}, but the {trained[0]} "
                f"stage in {self.workdir} was trained from that {stage} state: add --restart_from={trained[0]} "
                f"to delete the {'/'.join(trained)} stage's checkpoints and results (rerun it after "
                f"{stage}), or keep {flag}={done}"
            )

    def _restart(self, writer: MetricsWriter) -> None:
        """--restart_from: deletes the checkpoints, results.json entries and metrics.jsonl records of the
        restarted stages (TensorBoard's event files keep theirs)."""
        if not self.restarted:
            return
        if self.is_chief:
            for stage in self.restarted:
                shutil.rmtree(self._stage_dir(stage), ignore_errors=True)
            path = os.path.join(self.workdir, "results.json")
            if os.path.exists(path):
                with contextlib.suppress(OSError, ValueError):  # a damaged one is rewritten at the end
                    with open(path, encoding="utf-8") as f:
                        results = json.load(f)
                    for stage in self.restarted:
                        results.get("final", {}).pop(stage, None)
                    _write_json_atomic(path, results)
        for stage in self.restarted:
            writer.truncate(stage, -1)
        sharding.any_process(False)  # every process waits for the deletion
        self.log(f"--restart_from={self.restarted[0]}: deleted the checkpoints, results and metrics of "
                 f"{', '.join(self.restarted)}")

    def _restore(self, ckpt: Checkpointer, target, stage: str):
        """(state, meta) of the stage's newest intact checkpoint, or None; each damaged step skipped is
        reported in one warning line."""
        return ckpt.restore_latest(target, lambda message: self.log(f"warning: [{stage}] {message}"))

    def _check_finite(self, stage: str, unit: str, step: int, metrics: dict, params, ckpt: Checkpointer,
                      hint: str) -> None:
        """Stops the run at the first non-finite training metric or parameter of any seed, before anything
        of this call is saved: the newest checkpoint stays the last finite state."""
        finite = sharding.to_host(_finite_seeds(params))
        for seed in range(self.config.num_seeds):
            what = _first_nonfinite(metrics, seed) or (None if finite[seed] else "parameters are not finite")
            if what is None:
                continue
            ckpt.wait()
            last = ckpt.latest_step()
            kept = ("no checkpoint was saved" if last is None
                    else f"the newest checkpoint, {os.path.join(ckpt.directory, str(last))}, is the last "
                    "finite state")
            raise DivergedError(
                f"[{stage}] training diverged at {unit} {step}: seed {seed}'s {what}; {kept}. {hint} in a new "
                "--workdir (a rerun here would repeat it)"
            )

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, agents: awac.AWACState, final: bool = False) -> dict[str, list[float]]:
        """Deterministic-policy returns of every seed of `agents` [S] in the real environment, over
        --eval_episodes episodes per seed (--final_eval_episodes for a stage's final score). Each process
        evaluates the seeds it holds (process 0 all of them when the state is not seed-sharded); the scores
        are then combined, so every process returns the same lists."""
        cfg = self.config
        mine = sharding.process_seeds(cfg.num_seeds, self.mesh)
        returns, stds = np.zeros(cfg.num_seeds), np.zeros(cfg.num_seeds)
        if mine.stop > mine.start:
            act_fn = policy_lib.evaluation_act_fn(sharding.local_rows(agents, mine), self.spaces)
            episodes = cfg.final_episodes if final else cfg.eval_episodes
            result = evaluate(act_fn, self.env_id, num_seeds=mine.stop - mine.start,
                              num_episodes=episodes, seed=cfg.seed + 10_000,
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

    def _end_of_call(self, loop: StageLoop, writer: MetricsWriter, ckpt: Checkpointer, state, step: int,
                     metrics: dict, done: bool) -> dict | None:
        """After one compiled call of a stage's loop: stop if a metric or one of the loop's params is not
        finite (nothing of this call saved), evaluate the loop's agents when due (the last evaluation is the
        stage's final score, returned), checkpoint when due or at the end, and stop, with a checkpoint of
        this call, on a signal received at any moment up to here. The checkpoint meta is
        {unit: step, "final": scores or None, "done": done}."""
        stage, unit = loop.name, loop.unit
        self._check_finite(stage, unit, step, metrics, loop.params(state), ckpt, loop.hint)
        final = None
        if loop.agents is not None and ((loop.eval_every and step % loop.eval_every == 0) or done):
            scores = self._evaluate(loop.agents(state), final=done)
            writer.write(stage, step, scores)
            self.log(f"[{stage}] {unit} {step}: return {np.mean(scores['return']):.1f}, "
                     f"normalized {np.mean(scores['normalized_score']):.1f}"
                     + (f" (final score, {self.config.final_episodes} episodes per seed)" if done else ""))
            if loop.evaluated is not None:
                scores = loop.evaluated(step, scores, done)
            # The final score keeps its episode count: a stage restarted under other settings may end with
            # another count than the stages kept from before (the report states each).
            final = {**scores, "episodes": self.config.final_episodes} if done else None
        key, meta = loop.checkpoint_key(state, step), {unit: step, "final": final, "done": done}
        if loop.extra_meta is not None:
            meta.update(loop.extra_meta(state))
        if step % loop.checkpoint_every == 0 or done:
            ckpt.save(key, state, meta)
        if self._stopping() and not done:  # asked last, so a signal during the evaluation counts
            ckpt.save(key, state, meta)  # (skipped when saved just above)
            ckpt.wait()
            raise Stopped(f"[{stage}] stopped at {unit} {step}; checkpoint saved in {ckpt.directory}; "
                          "rerun the same command to resume")
        return final

    def _drive(self, loop: StageLoop, writer: MetricsWriter, state) -> tuple[Any, dict | None]:
        """The one training loop of every stage: restore the newest intact checkpoint into the placed
        `state`, drop the metrics recorded after it, then compiled call, log, evaluate, checkpoint and
        signal check until the loop says it is done. Returns (state, final scores or None)."""
        ckpt = Checkpointer(self._stage_dir(loop.name))
        progress = None
        try:
            step, done, final = 0, False, None
            restored = self._restore(ckpt, state, loop.name)  # into the placed state: each process its shards
            if restored is not None:
                state, meta = restored
                (step, done), final = loop.resume(state, meta), meta.get("final")
                self.log(f"[{loop.name}] resuming from {loop.unit} {step}")
            writer.truncate(loop.name, step)  # records after the checkpoint are redone (all without one)
            if done:
                self.log(f"[{loop.name}] already finished ({step} {loop.unit}s)")
                return state, final
            interval = {} if loop.progress_interval_s is None else {"min_interval_s": loop.progress_interval_s}
            progress = self._progress(loop.total, loop.name, start_step=step, unit=loop.progress_unit, **interval)
            while not done and step < loop.total:  # (a rerun may lower a step count below a checkpoint's)
                t0 = time.perf_counter()
                state, metrics = loop.call(state)
                step, done = loop.advance(state, step)
                logged, shown = loop.record(state, metrics, time.perf_counter() - t0)
                writer.write(loop.name, step, logged)
                progress.update(step, **shown)
                final = self._end_of_call(loop, writer, ckpt, state, step, metrics, done) or final
        finally:
            ckpt.close()  # waits for a save in flight
            if progress is not None:
                progress.close()
        return state, final

    # ------------------------------------------------------------------------------------ AWAC stage
    def _policy_scale_transitions(self) -> Transitions:
        """D_beta on the host with its actions in the policy's [-1, 1] scale."""
        t = self.dataset.transitions
        return t if self.spaces.unit_actions else t.replace(actions=self.spaces.to_unit_actions(t.actions))

    def _device_dataset(self) -> Transitions:
        """D_beta on the run's devices, as AWAC and MB2PO read it."""
        t = self._policy_scale_transitions().replace(next_valid=None)
        return sharding.replicate(jax.device_put(t), self.mesh)

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
        data = self._device_dataset()
        train = awac.make_train_steps(cfg.steps_per_call)

        def call(state):
            state, metrics = train(state, data)
            return state, sharding.to_host(metrics)

        def record(state, metrics, seconds):
            return ({**metrics, "updates_per_s": cfg.steps_per_call / seconds},
                    {"critic_loss": float(np.mean(metrics["critic_loss"]))})

        loop = StageLoop(
            name="awac", unit="step", total=cfg.awac_steps, call=call, record=record,
            resume=lambda state, meta: (int(meta["step"]),
                                        meta.get("final") is not None and int(meta["step"]) >= cfg.awac_steps),
            advance=lambda state, step: (step + cfg.steps_per_call, step + cfg.steps_per_call >= cfg.awac_steps),
            params=lambda state: state, hint="Lower --actor_lr/--critic_lr", agents=lambda state: state,
            eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
        return self._drive(loop, writer, self.init_awac())

    def finished_awac(self) -> awac.AWACState:
        """The finished AWAC stage's state (what the later stages start from)."""
        ckpt = Checkpointer(self._stage_dir("awac"))
        try:
            restored = self._restore(ckpt, self.init_awac(), "awac")
        finally:
            ckpt.close()
        if restored is None:
            raise ConfigError(f"{self.workdir}: no AWAC checkpoint; run --stages=awac first")
        state, meta = restored
        if meta.get("final") is None or int(meta["step"]) < self.config.awac_steps:
            raise ConfigError(f"{self.workdir}: the AWAC stage is not finished ({meta['step']} of "
                              f"{self.config.awac_steps} steps); run --stages=awac first")
        return state

    # -------------------------------------------------------------------------------- dynamics stage
    def _dynamics_transitions(self) -> Transitions:
        """D_beta as the ensemble sees it: actions in the policy's scale, and which rows have true
        successors."""
        t = self._policy_scale_transitions()
        return t.replace(next_valid=t.next_valid_mask)

    def init_dynamics(self):
        """(ensemble states [S], epoch data [S], epoch keys [S]), placed on the run's mesh."""
        cfg = self.config
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1), cfg.num_seeds)
        states = dyn.init_seeds(keys, self._dynamics_transitions(), cfg.dynamics)
        return sharding.shard_seeds(states, self.mesh)

    def run_dynamics(self, writer: MetricsWriter) -> dyn.DynamicsState:
        """Trains one ensemble per seed until every seed has stopped early or `dynamics_steps` updates;
        checkpointed after every epoch (so resume is exact and loses at most one epoch)."""
        cfg, dcfg = self.config, self.config.dynamics
        state, data, keys = self.init_dynamics()
        epoch_fn = dyn.make_train_epoch_seeds(dcfg)
        num_train = data["bootstrap"].shape[-1]
        self.log(f"[dynamics] {cfg.num_seeds} seed(s) x {dcfg.num_members} members, {num_train} training "
                 f"/ {data['holdout_targets'].shape[1]} holdout transitions, {num_train // dcfg.batch_size} "
                 f"updates per epoch, budget {cfg.dynamics_steps} updates")

        def counters(state):  # the host's view of the [S] counters (a collective on several processes)
            return sharding.to_host(dyn.counters(state))

        def budgets(c):  # [S] updates each seed may make next; 0 once stopped
            return dyn.epoch_budgets(c, dcfg, cfg.dynamics_steps, cfg.dynamics_early_stopping)

        def position(state, done=None):
            c = counters(state)
            return int(np.max(c["updates"])), bool(not budgets(c).any()) if done is None else done

        def call(state):
            epoch_keys = jax.vmap(jax.random.fold_in)(keys, state.epoch)
            budget = sharding.shard_seeds(budgets(counters(state)), self.mesh)
            state, metrics = epoch_fn(state, data, epoch_keys, budget)
            return state, sharding.to_host(metrics)

        def record(state, metrics, seconds):
            c = counters(state)
            logged = {"train_loss": metrics["train_loss"], "holdout_mse": metrics["holdout_mse"],
                      "holdout_nll": metrics["holdout_nll"], "best_holdout_mse": c["best_holdout_mse"],
                      "elites": c["elites"], "epoch": c["epoch"], "updates": c["updates"]}
            return logged, {"holdout_mse": float(np.mean(metrics["holdout_mse"])),
                            "stopped": f"{int(np.sum(budgets(c) == 0))}/{cfg.num_seeds}"}

        loop = StageLoop(
            name="dynamics", unit="update", total=cfg.dynamics_steps, call=call, record=record,
            resume=lambda state, meta: position(state, bool(meta.get("done"))),
            advance=lambda state, step: position(state), params=lambda state: (state.params, state.opt_state),
            hint="Lower --dynamics_lr", checkpoint_key=lambda state, step: int(np.max(counters(state)["epoch"])),
            progress_interval_s=0.0)
        state, _ = self._drive(loop, writer, state)
        c = counters(state)
        best = np.min(c["best_holdout_mse"], axis=-1)
        self.log(f"[dynamics] done: best holdout MSE per seed [{', '.join(f'{x:.4g}' for x in best)}], "
                 f"elites {c['elites'].tolist()}")
        return dyn.restore_best(state)

    def finished_dynamics(self) -> dyn.DynamicsState:
        state, _, _ = self.init_dynamics()
        ckpt = Checkpointer(self._stage_dir("dynamics"))
        try:
            restored = self._restore(ckpt, state, "dynamics")
        finally:
            ckpt.close()
        if restored is None:
            raise ConfigError(f"{self.workdir}: no dynamics checkpoint; run --stages=dynamics first")
        state, meta = restored
        if not meta.get("done"):
            raise ConfigError(f"{self.workdir}: the dynamics stage is not finished; run --stages=dynamics")
        return dyn.restore_best(state)

    # ----------------------------------------------------------------------------------- MB2PO stage
    def init_mb2po(self, agents: awac.AWACState) -> mb2po.MB2POState:
        """MB2PO states [S] with empty rings, built in their layout on the run's mesh."""
        return parallel.init_sharded(agents, self.config.mb2po, self.dataset.obs_dim, self.dataset.act_dim,
                                  self.mesh)

    def penalty_coefs(self, stage: str, models: dyn.DynamicsState, data: Transitions) -> "_StageLambda":
        """Every seed's lambda for the rollouts (`rollout.capped_penalty_coef` of its finished ensemble
        `models` [S], placed on the run's mesh, on D_beta `data` as `_device_dataset` gives it), logged, with
        the figures behind it (for results.json and the checkpoints' meta)."""
        mcfg = self.config.mb2po
        fn = jax.jit(jax.vmap(lambda m, obs, act: ro.dataset_uncertainty(m, obs, act, mcfg.rollout_config()),
                              in_axes=(0, None, None)))
        mean_u = sharding.to_host(fn(models, data.observations, data.actions))
        mean_abs_r = float(np.mean(np.abs(self.dataset.transitions.rewards)))
        lam = np.asarray(ro.capped_penalty_coef(mcfg.penalty_coef, mcfg.max_penalty_share, mean_abs_r, mean_u,
                                                share=mcfg.penalty_share))
        share = mcfg.penalty_coef * mean_u / max(mean_abs_r, 1e-8)
        fmt = lambda xs: "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"
        capped = bool(np.any(lam < mcfg.penalty_coef))
        if mcfg.penalty_share:
            how = (f"lambda set to {fmt(lam)} (--penalty_share={mcfg.penalty_share}"
                   + (f", at most --max_penalty_share={mcfg.max_penalty_share}" if mcfg.max_penalty_share else "")
                   + "; --penalty_share=0 --max_penalty_share=0 keeps the task's lambda)")
        elif capped:
            how = (f"lambda capped to {fmt(lam)} (--max_penalty_share={mcfg.max_penalty_share}; 0 keeps the "
                   "task's lambda)")
        else:
            how = f"lambda={mcfg.penalty_coef} for every seed"
        self.log(f"[{stage}] penalty on the data: mean u {fmt(mean_u)} per seed, mean |r| {mean_abs_r:.3g}, "
                 f"so the task's lambda={mcfg.penalty_coef} would take {fmt(share)} of the reward; {how}")
        return _StageLambda(stage, {"penalty_coef": [float(x) for x in lam],
                                    "data_uncertainty": [float(x) for x in mean_u],
                                    "data_mean_abs_reward": mean_abs_r}, self.mesh, self.log)

    def run_mb2po(self, writer: MetricsWriter, agents: awac.AWACState, dyn_state: dyn.DynamicsState):
        cfg, mcfg = self.config, self.config.mb2po
        ring_bytes, rollout_bytes = self.memory
        self.log(f"[mb2po] memory: model rings {ring_bytes / 2**30:.2f} GiB ({cfg.num_seeds} seed(s) x "
                 f"{mcfg.num_slots} iterations x {mcfg.rows_per_slot:,} rows, {mcfg.buffer_dtype}) + "
                 f"{rollout_bytes / 2**30:.2f} GiB per rollout; h={mcfg.horizon}, "
                 + ("lambda from the data (below), " if mcfg.penalty_share else f"lambda={mcfg.penalty_coef}, ")
                 + f"omega={mcfg.omega}, penalty={mcfg.penalty}")
        data = self._device_dataset()
        models = dyn_state.replace(opt_state=None, best_params=None)  # what the rollout reads
        models = sharding.shard_seeds(models, self.mesh)
        lam = self.penalty_coefs("mb2po", models, data)
        step_fn = parallel.make_iteration_fn(mcfg, termination_fn_for(self.env_id), self.mesh,
                                             self.rollout_mesh)

        def call(state):
            state, metrics = step_fn(state, models, data, lam.array)
            return state, sharding.to_host(metrics)

        def resume(state, meta):
            lam.resume(meta)
            iteration = int(meta["iteration"])
            return iteration, meta.get("final") is not None and iteration >= mcfg.iterations

        def record(state, metrics, seconds):
            return ({**metrics, "seconds_per_iteration": seconds},
                    {"s_per_iter": seconds, "valid": int(np.mean(metrics["rollout_num_valid"])),
                     "penalty": float(np.mean(metrics["rollout_mean_penalty"])),
                     "critic_loss": float(np.mean(metrics["critic_loss"]))})

        loop = StageLoop(
            name="mb2po", unit="iteration", total=mcfg.iterations, call=call, record=record,
            resume=resume,
            advance=lambda state, it: (it + 1, it + 1 >= mcfg.iterations), params=lambda state: state.agent,
            hint=("Lower --actor_lr/--critic_lr or raise "
                  + ("--penalty_share" if mcfg.penalty_share else "--penalty_coef")), agents=lambda state: state.agent,
            eval_every=cfg.mb2po_eval_every, checkpoint_every=cfg.mb2po_checkpoint_every,
            progress_interval_s=0.0, progress_unit="it",
            evaluated=lambda step, scores, done: {**scores, **lam.figures} if done else scores,
            extra_meta=lambda state: {"penalty": lam.figures})
        return self._drive(loop, writer, self.init_mb2po(agents))

    def finished_mb2po(self) -> awac.AWACState:
        """The finished MB2PO stage's agent [S] (read without its model ring: a partial restore)."""
        ckpt = Checkpointer(self._stage_dir("mb2po"))
        restored = None
        try:
            for step in reversed(ckpt.all_steps()):
                try:
                    restored = ckpt.restore({"agent": self.init_awac()}, step, partial=True)
                    break
                except CheckpointDamagedError as e:
                    self.log(f"warning: [mb2po] {e}; trying the step before it")
        finally:
            ckpt.close()
        if restored is None:
            raise ConfigError(f"{self.workdir}: no MB2PO checkpoint; run --stages=mb2po first")
        state, meta = restored
        if meta.get("final") is None or int(meta["iteration"]) < self.config.mb2po.iterations:
            raise ConfigError(f"{self.workdir}: the mb2po stage is not finished ({meta['iteration']} of "
                              f"{self.config.mb2po.iterations} iterations); run --stages=mb2po first")
        return state["agent"]

    # ---------------------------------------------------------------------------------- online stage
    def _online_source(self) -> str:
        """The stage whose finished agent the online stage continues: mb2po when this run trains it or the
        workdir has an MB2PO checkpoint, else awac."""
        if "mb2po" in self.config.stages or _has_steps(self._stage_dir("mb2po")):
            return "mb2po"
        return "awac"

    def init_online(self, agents: awac.AWACState, models: dyn.DynamicsState | None = None) -> online.OnlineState:
        """Online states [S] (empty rings) continuing `agents` [S] (and, with --online_model, the finished
        dynamics stage's ensembles `models` [S]), placed on the run's mesh."""
        if self.config.online.model and models is None:
            models = self.finished_dynamics()
        state = online.init_seeds(agents, self.config.online, self.dataset.obs_dim, self.dataset.act_dim,
                                  models=models, model_config=self.config.mb2po)
        return sharding.shard_seeds(state, self.mesh)

    def _log_online_plan(self, source: str) -> None:
        cfg, ocfg = self.config, self.config.online
        row_bytes = 4 * (2 * self.dataset.obs_dim + self.dataset.act_dim + 2)
        self.log(f"[online] from the {source} agent: {ocfg.steps} environment steps per seed in {ocfg.envs} "
                 f"env(s) each, {ocfg.utd} update(s) per step, online ratio {ocfg.ratio}"
                 + (f" (annealed from {ocfg.ratio_start} over {ocfg.ratio_anneal_steps} steps)"
                    if ocfg.ratio_anneal_steps else "")
                 + (f", {ocfg.warmup_steps} warm-up steps before any update" if ocfg.warmup_steps else "")
                 + f"; online ring {cfg.num_seeds} x {ocfg.buffer_size:,} rows "
                 f"({cfg.num_seeds * ocfg.buffer_size * row_bytes / 2**30:.2f} GiB)")
        if ocfg.model:
            mcfg = cfg.mb2po
            capped = (f", set per seed by --penalty_share={mcfg.penalty_share} as below" if mcfg.penalty_share
                      else ", capped per seed as below" if mcfg.max_penalty_share else "")
            self.log(f"[online] model arm: {mcfg.imagined_steps} imagined steps (h={mcfg.horizon}, "
                     f"lambda={mcfg.penalty_coef}{capped}) per {ocfg.steps_per_call} environment steps into a "
                     f"ring of {mcfg.num_slots}; {ocfg.model_ratio} of each batch from it; ensemble refits on "
                     f"offline + online data every {ocfg.model_refit_every} steps ({ocfg.model_refit_epochs} "
                     "epochs)")

    def _refit_online_models(self, state: online.OnlineState, offline: Transitions,
                             env_step: int) -> online.OnlineState:
        """The model arm's refit: every seed's ensemble trained on the offline data plus its online rows."""
        host = sharding.to_host({"buffer": state.buffer, "act_key": state.act_key})
        n = int(host["buffer"].size[0])
        rows = Transitions(observations=host["buffer"].observations[:, :n],
                           actions=host["buffer"].actions[:, :n], rewards=host["buffer"].rewards[:, :n],
                           next_observations=host["buffer"].next_observations[:, :n],
                           terminals=host["buffer"].terminals[:, :n])
        # Its own stream: folding env_step in first, as `online.imagine` does, keeps it apart from the
        # exploration actions' fold_in(act_key, step) keys.
        keys = np.stack([np.asarray(jax.random.fold_in(jax.random.fold_in(k, env_step), 0x2EF17))
                         for k in host["act_key"]])
        models, metrics = online.refit_models(sharding.to_host(state.models), offline, rows, keys,
                                              self.config.online.model_refit_epochs)
        self.log(f"[online] env_step {env_step}: ensembles refit on {len(offline)} offline + {n} online "
                 f"transitions, holdout MSE per seed "
                 f"[{', '.join(f'{x:.4g}' for x in np.min(np.asarray(metrics['holdout_mse']), axis=-1))}]")
        return state.replace(models=sharding.shard_seeds(models, self.mesh))

    def _online_steps(self, state: online.OnlineState, envs: online.EnvBatch, data: Transitions,
                      env_step: int, fns: dict[str, Callable]) -> tuple[online.OnlineState, dict[str, Any]]:
        """One call's `online_steps_per_call` environment steps from `env_step`: per vector step one batched
        policy call, the environments stepped on the host, and one compiled store (+ `utd` updates once past
        the warm-up) call. Returns the state and the call's metrics (means over its learning steps, counters
        and episode figures per seed; the caller adds the call's throughput)."""
        ocfg = self.config.online
        learned = []
        for _ in range(ocfg.vector_steps_per_call):
            actions = np.asarray(fns["act"](state, jnp.asarray(envs.obs)))
            rows = envs.step(self.spaces.from_unit_actions(actions))
            rows = rows.replace(actions=actions.astype(np.float32))  # stored in the policy's scale
            learn = env_step >= ocfg.warmup_steps
            state, metrics = fns["learn" if learn else "store"](state, rows, data)
            env_step += ocfg.envs
            if learn:
                learned.append(metrics)
        out = sharding.to_host(jax.tree.map(lambda *xs: jnp.stack(xs).mean(0), *learned) if learned else {})
        out = {k: v for k, v in out.items() if k != "online_rows"}
        out.update(sharding.to_host({"env_steps": state.env_steps, "updates": state.updates,
                                     "buffer_size": state.buffer.size}))
        out["episode_return"] = envs.last_return.copy()
        out["episodes"] = envs.episodes_done.copy()
        out["terminated_episodes"] = envs.terminated_episodes.copy()
        return state, out

    def run_online(self, writer: MetricsWriter, agents: awac.AWACState, source: str,
                   models: dyn.DynamicsState | None = None):
        """AWAC continued in the real environment (`online.py`): each call steps every seed's
        `online_envs` environments `online_steps_per_call` environment steps on the host (`_online_steps`).
        The checkpoint holds the device state (agent, online ring, counters) and, in its meta, the
        environments' state (MuJoCo's integration state: episodes continue exactly after a resume) and the
        stage's evaluation curve (for the collapse figures of results.json)."""
        cfg, ocfg = self.config, self.config.online
        if jax.process_count() > 1:
            raise ConfigError("--stages=online runs in a single process (its environments are stepped on one "
                              "host); run it without --num_processes/--distributed")
        data = self._device_dataset()
        self._log_online_plan(source)
        fns = {"act": online.make_act_fn(), "learn": online.make_update_fn(ocfg, learn=True),
               "store": online.make_update_fn(ocfg, learn=False) if ocfg.warmup_steps else None}
        lam = None  # the model arm's lambda per seed
        if ocfg.model:
            models = models if models is not None else self.finished_dynamics()
            lam = self.penalty_coefs("online", sharding.shard_seeds(models, self.mesh), data)
            imagine_fn = online.make_imagine_fn(cfg.mb2po, termination_fn_for(self.env_id))
            offline = self._dynamics_transitions()
        envs = online.EnvBatch(
            lambda: make_env(self.env_id, max_episode_steps=cfg.max_episode_steps, disable_env_checker=True),
            cfg.num_seeds, ocfg.envs, cfg.seed + 20_000)
        curve: list[tuple[int, list[float]]] = []  # (env step, normalised scores [S]) of every evaluation
        counter = [0]  # environment steps done (the host's copy of the state's)

        def evaluated(step, scores, done):
            curve[:] = [c for c in curve if c[0] < step] + [(step, list(scores["normalized_score"]))]
            if not done:
                return scores
            figures = [online.collapse_figures([c[0] for c in curve], [c[1][s] for c in curve], ocfg.steps)
                       for s in range(cfg.num_seeds)]
            return {**scores, **{k: [f[k] for f in figures] for k in figures[0]},
                    **(lam.figures if ocfg.model else {})}

        def resume(state, meta):
            if meta.get("source", source) != source:
                raise ConfigError(
                    f"{self.workdir}: the online stage was started from the {meta['source']} agent, but this "
                    f"run would continue the {source} agent; add --restart_from=online to start it again")
            curve[:] = [(int(st), list(sc)) for st, sc in meta.get("curve", [])]
            if ocfg.model:
                lam.resume(meta)
            exact = envs.restore(meta["envs"])
            if not exact:
                self.log("[online] resuming: the environments' state could not be saved; every episode "
                         "restarts from a reset (the counters, buffer and agent continue)")
            counter[0] = step = int(meta["env_step"])
            return step, meta.get("final") is not None and step >= ocfg.steps

        def call(state):
            if counter[0] == 0:  # a fresh stage: its curve starts with the agent it continues, at step 0
                writer.truncate("online", -1)  # (records of an attempt killed before its first checkpoint)
                scores = self._evaluate(state.agent)
                writer.write("online", 0, scores)
                self.log(f"[online] env_step 0: return {np.mean(scores['return']):.1f}, "
                         f"normalized {np.mean(scores['normalized_score']):.1f}")
                curve[:] = [(0, list(scores["normalized_score"]))]
            model_metrics = {}
            t0 = time.perf_counter()  # the call's throughput: the model arm's refit and rollout included
            if ocfg.model:
                if counter[0] > 0 and counter[0] % ocfg.model_refit_every == 0:
                    state = self._refit_online_models(state, offline, counter[0])
                state, model_metrics = imagine_fn(state, data.observations, lam.array)
            state, out = self._online_steps(state, envs, data, counter[0], fns)
            counter[0] += ocfg.steps_per_call
            out["env_steps_per_s"] = np.full(cfg.num_seeds, ocfg.steps_per_call / (time.perf_counter() - t0))
            return state, {**out, **sharding.to_host(model_metrics)}

        def record(state, metrics, seconds):
            shown = {"return": float(np.mean(metrics["episode_return"]))}
            if "critic_loss" in metrics:
                shown["critic_loss"] = float(np.mean(metrics["critic_loss"]))
            return dict(metrics), shown

        def advance(state, step):
            step += ocfg.steps_per_call
            return step, step >= ocfg.steps

        loop = StageLoop(
            name="online", unit="env_step", total=ocfg.steps, call=call, record=record, resume=resume,
            advance=advance, params=lambda state: state.agent, hint="Lower --actor_lr/--critic_lr or --utd",
            agents=lambda state: state.agent, eval_every=ocfg.eval_every, checkpoint_every=ocfg.checkpoint_every,
            progress_interval_s=0.0, evaluated=evaluated,
            extra_meta=lambda state: {"envs": envs.snapshot(), "curve": [list(c) for c in curve],
                                      "source": source, **({"penalty": lam.figures} if ocfg.model else {})})
        state = self.init_online(agents, models)
        try:
            return self._drive(loop, writer, state)
        finally:
            envs.close()

    # ------------------------------------------------------------------------------------------ all
    def __call__(self) -> dict:
        try:
            return self._run_stages()
        finally:
            self.close()

    def _run_stages(self) -> dict:
        cfg = self.config
        self.log(f"dataset {self.dataset.name}: {self.dataset.num_transitions} transitions, "
                 f"{self.dataset.num_episodes} episodes, env {self.env_id}; workdir {self.workdir}; "
                 f"{cfg.num_seeds} seed(s) on {sharding.describe(self.mesh)}"
                 + ("" if self.rollout_mesh is None or "mb2po" not in cfg.stages else
                    f"; MB2PO rollouts split over {self.rollout_mesh.devices.size} CPU host devices"))
        if self._uses_model_ring():
            ring, peak = self.memory
            self.log(f"MB2PO memory: model rings {ring / 2**30:.2f} GiB + {peak / 2**30:.2f} GiB per rollout "
                     f"(available: {(self.available_bytes or 0) / 2**30:.1f} GiB)")
        started = time.time()
        finals: dict[str, Any] = {}
        with self.stop.installed(), (MetricsWriter(self.workdir) if self.is_chief else _NullWriter()) as writer:
            self._restart(writer)
            agents = dyn_state = None
            if "awac" in cfg.stages:
                agents, finals["awac"] = self.run_awac(writer)
            if "dynamics" in cfg.stages:
                dyn_state = self.run_dynamics(writer)
            if "mb2po" in cfg.stages:
                agents = agents if agents is not None else self.finished_awac()
                dyn_state = dyn_state if dyn_state is not None else self.finished_dynamics()
                mb2po_state, finals["mb2po"] = self.run_mb2po(writer, agents, dyn_state)
                agents = mb2po_state.agent
                del mb2po_state  # its model ring
            if "online" in cfg.stages:
                source = self._online_source()
                if agents is None or ("mb2po" not in cfg.stages and source == "mb2po"):
                    agents = self.finished_mb2po() if source == "mb2po" else self.finished_awac()
                models = None
                if cfg.online.model:
                    models = dyn_state if dyn_state is not None else self.finished_dynamics()
                _, finals["online"] = self.run_online(writer, agents, source, models)
        for stage in ("awac", "mb2po", "online"):  # stages not run now keep their results (from checkpoints)
            meta = None if stage in finals else self._stage_meta(stage)
            if meta is not None and meta.get("final") is not None:
                finals[stage] = meta["final"]
        results = {
            "dataset": self.dataset.name,
            "dataset_path": self.dataset.path,
            "env": self.env_id,
            "env_id": self.env_id,  # the Gymnasium id evaluated in (D4RL data: v4; SPEC names it `env`)
            "num_seeds": cfg.num_seeds,
            "seed": cfg.seed,
            "preset": self.preset,
            "stages": list(cfg.stages),
            "final": {stage: finals[stage] for stage in config_lib.STAGES if stage in finals},
            "config": config_lib.to_dict(cfg),
            "wall_time_s": time.time() - started,
            "num_processes": jax.process_count(),
        }
        if self.is_chief:
            _write_json_atomic(os.path.join(self.workdir, "results.json"), results)
        return results

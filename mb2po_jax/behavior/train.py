"""Behaviour-policy training: the long online SAC run behind the D4RL-style datasets (SPEC section 2).

    mb2po-data train-behavior --env hopper --workdir runs/behavior/hopper --total_steps 1000000

D4RL's recipe, from one SAC run per environment: `expert` = the fully trained policy, `medium` = the same
run's policy at about one third of the expert's return, `medium-replay` = every transition the replay
buffer held from the start of training until the medium policy.

Resumable. Run the same command again and it continues from the newest checkpoint, exactly: a resumed run
produces the same transitions, parameters and evaluations as an uninterrupted one (tested). A checkpoint
holds the SAC state, the training environment's complete state (MuJoCo integration state via
`mj_getState`, or the `state` array of classic-control envs, plus its numpy RNG, current observation and
episode counters); all per-step randomness is `fold_in(key, env_step)`, so no PRNG key needs carrying.
A killed run loses at most `checkpoint_every` environment steps.

The replay buffer is not in the checkpoint. With capacity >= total_steps (the default) it is append-only,
so every transition is written once to `replay/<start>-<end>.npz` segments at each checkpoint, and a
resumed run rebuilds the device buffer from them (the newest `capacity` rows when it is smaller). The
segments are therefore also the run's exact transition record: the true medium-replay data is
`rundir.load_replay_log(workdir, 0, medium_step)`. The workdir layout is in `rundir`.

A finished run's expert and medium policies (`rundir.select_policies`, D4RL's rule) become the shipped
assets with `export.export_assets` (`mb2po-data export-behavior`), and the dataset kinds are made from
those by `generation.generate` (`mb2po-data generate --kind medium`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax.behavior import sac
from mb2po_jax.behavior.policies import save_actor
from mb2po_jax.behavior.rundir import (
    REPLAY_FIELDS,
    STAGE,
    load_replay_log,
    read_run,
    segment_files,
    select_policies,
    truncate_metrics,
    write_segment,
)
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data import registry
from mb2po_jax.data.envs import env_spaces, make_env
from mb2po_jax.evaluation import evaluate
from mb2po_jax.logger import MetricsWriter, Progress


@dataclasses.dataclass(frozen=True)
class BehaviorConfig:
    """The online SAC run. Defaults: SAC's usual MuJoCo protocol (1 M steps, 10 k random warm-up steps)."""

    total_steps: int = 1_000_000
    start_steps: int = 10_000  # uniform random actions and no updates before this many env steps
    # k env steps with a fixed policy, then k updates in one compiled scan (1 update per env step on
    # average). Measured on 2 CPU cores, hopper, 256x256: k=1 11 ms/update (dispatch-bound), k=10 6 ms,
    # k=20 5 ms. The acting policy is up to k updates stale, negligible at k <= 20 next to tau = 0.005.
    steps_per_call: int = 10
    eval_every: int = 5_000  # evaluation + actor snapshot
    eval_episodes: int = 10
    checkpoint_every: int = 10_000  # multiple of eval_every
    replay_capacity: int | None = None  # None: total_steps (the buffer never drops a transition)
    max_episode_steps: int = 1000
    sac: sac.SACConfig = sac.SACConfig()

    def validate(self) -> None:
        k = self.steps_per_call
        for name in ("start_steps", "eval_every", "checkpoint_every", "total_steps"):
            if getattr(self, name) % k:
                raise ValueError(
                    f"BehaviorConfig.{name}={getattr(self, name)} must be a multiple of steps_per_call={k}")
        if self.checkpoint_every % self.eval_every:
            raise ValueError("BehaviorConfig.checkpoint_every must be a multiple of eval_every")
        if self.start_steps < self.sac.batch_size:
            raise ValueError("BehaviorConfig.start_steps must be at least the batch size")


# ------------------------------------------------------------------------------------- environment state
def _physics(env) -> np.ndarray:
    """Everything that determines the simulator's future given actions, as float64 [n]."""
    u = env.unwrapped
    data = getattr(u, "data", None)
    if data is not None and hasattr(u, "model"):  # MuJoCo
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(u.model, spec), np.float64)
        mujoco.mj_getState(u.model, data, state, spec)
        return state
    if getattr(u, "state", None) is not None:  # classic control (Pendulum, ...)
        return np.asarray(u.state, np.float64).ravel().copy()
    raise NotImplementedError(f"cannot save the state of {type(u).__name__} for an exact resume")


def _set_physics(env, state: np.ndarray) -> None:
    u = env.unwrapped
    data = getattr(u, "data", None)
    if data is not None and hasattr(u, "model"):
        import mujoco

        mujoco.mj_setState(u.model, data, np.asarray(state, np.float64), mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(u.model, data)  # derived quantities; does not change the integration state
    else:
        u.state = np.asarray(state, np.float64).reshape(np.shape(u.state)).copy()


# Settings that decide the training trajectory; the others (evaluation and checkpoint cadence, and
# total_steps, so a run can be extended) may change between a run and its resumption.
_TRAJECTORY_KEYS = ("start_steps", "steps_per_call", "max_episode_steps", "sac")


def _capacity(cfg: dict) -> int:
    return cfg.get("replay_capacity") or cfg["total_steps"]


def _check_same_run(workdir: str, saved: dict, current: dict, step: int) -> None:
    saved_cfg, cfg = saved.get("config", {}), json.loads(json.dumps(current["config"]))
    diffs = [f"{k}: {saved.get(k)!r} -> {current[k]!r}"
             for k in ("env_id", "seed") if saved.get(k) != current[k]]
    diffs += [f"{k}: {saved_cfg.get(k)!r} -> {cfg[k]!r}"
              for k in _TRAJECTORY_KEYS if k in saved_cfg and saved_cfg[k] != cfg[k]]
    # Sampling is uniform over rows [0, size) until the ring wraps, so a larger buffer is the same run as
    # long as the old one has not wrapped yet.
    old, new = _capacity(saved_cfg), _capacity(cfg)
    if new != old and not (new > old and step <= old):
        diffs.append(f"replay capacity: {old} -> {new} after {step} steps")
    if diffs:
        raise ValueError(f"{workdir}: the checkpoint is of a run with other settings ({'; '.join(diffs)}); "
                         "use another --workdir")


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _rng_state_to_json(state: dict) -> dict:
    return json.loads(json.dumps(state))  # ints (128-bit PCG64 words included) and strings only


def _rebuild_buffer(workdir: str, step: int, capacity: int, obs_dim: int, act_dim: int) -> sac.ReplayBuffer:
    """Device replay buffer as it was after `step` env steps: transition s sits at row s % capacity."""
    first = max(0, step - capacity)
    rows = load_replay_log(workdir, first, step)
    data = {}
    for name, shape in (("observations", (obs_dim,)), ("actions", (act_dim,)), ("rewards", ()),
                        ("next_observations", (obs_dim,)), ("terminals", ())):
        a = np.zeros((capacity, *shape), np.float32)
        if step > first:
            a[np.arange(first, step) % capacity] = rows[name]
        data[name] = jnp.asarray(a)
    return sac.ReplayBuffer(data=data, ptr=jnp.asarray(step % capacity, jnp.int32),
                            size=jnp.asarray(min(step, capacity), jnp.int32))


# ------------------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class _Run:
    """What one `train_behavior` call holds fixed: where, what, and the bare training environment."""

    env_name: str
    env_id: str
    workdir: str
    seed: int
    config: BehaviorConfig
    env: Any  # unwrapped: wrappers keep hidden state (TimeLimit's counter) that a checkpoint would miss
    obs_dim: int
    act_dim: int
    to_env: Callable[[np.ndarray], np.ndarray]  # (-1, 1) actions -> the env's bounds
    run_meta: dict  # run.json, and the checkpoints' record of the run they belong to


@dataclasses.dataclass
class _Loop:
    """The training loop's state: what a checkpoint saves (state, obs, host counters), the device replay
    buffer, and what accumulates between evaluations and checkpoints."""

    state: sac.SACState
    buffer: sac.ReplayBuffer
    obs: np.ndarray
    host: dict  # step, ep_len, ep_return, episodes, recent_returns, last_eval (JSON, in the checkpoint)
    t: int
    pending: list = dataclasses.field(default_factory=list)  # rows since the last checkpoint (replay log)
    train_metrics: dict = dataclasses.field(default_factory=dict)  # SAC losses since the last evaluation
    t_eval_start: float = dataclasses.field(default_factory=time.monotonic)


class _Steps(NamedTuple):
    """The compiled device calls of the loop; per-step randomness is fold_in(key, env step)."""

    act: Callable  # (params, env step, obs) -> stochastic action
    explore: Callable  # env step -> uniform action in [-1, 1] (warm-up)
    greedy: Callable  # (params, obs) -> deterministic action (evaluation)
    online_step: Callable  # (state, buffer, rows, key) -> (state, buffer, metrics)
    k_update: jax.Array


def _compile_steps(run: _Run, k_act: jax.Array, k_update: jax.Array) -> _Steps:
    act_dim = run.act_dim
    return _Steps(
        act=jax.jit(lambda params, i, o: sac.sample_action(params, jax.random.fold_in(k_act, i), o)),
        explore=jax.jit(
            lambda i: jax.random.uniform(jax.random.fold_in(k_act, i), (act_dim,), minval=-1.0, maxval=1.0)),
        greedy=jax.jit(sac.deterministic_action),
        online_step=sac.make_online_step(run.config.sac),
        k_update=k_update,
    )


def _start(run: _Run, ckpt: Checkpointer, k_init: jax.Array) -> _Loop:
    """The loop at its first step: fresh, or resumed from the newest checkpoint (the device replay buffer
    rebuilt from the replay log). Drops output written after that checkpoint, and writes run.json."""
    state = sac.init_sac(k_init, run.obs_dim, run.act_dim, run.config.sac)
    obs, _ = run.env.reset(seed=run.seed)
    host = {"step": 0, "ep_len": 0, "ep_return": 0.0, "episodes": 0, "recent_returns": [], "last_eval": None}
    start = ckpt.latest_step()
    if start is not None:
        state, obs, host = _restore(run, ckpt, start, state)
    # Output written after the checkpoint we start from (by a process killed before its next checkpoint)
    # is dropped: this run writes it again, identically.
    for seg_start, _, path in segment_files(run.workdir):
        if seg_start >= (start or 0):
            os.remove(path)
    truncate_metrics(run.workdir, start or 0)
    capacity = run.config.replay_capacity or run.config.total_steps
    if start is not None:
        buffer = _rebuild_buffer(run.workdir, start, capacity, run.obs_dim, run.act_dim)
        print(f"[{run.env_name}] resumed from step {start} in {run.workdir}", file=sys.stderr, flush=True)
    else:
        buffer = sac.replay_buffer_init(capacity, run.obs_dim, run.act_dim)
    with open(os.path.join(run.workdir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run.run_meta, f, indent=2)
    return _Loop(state=state, buffer=buffer, obs=obs, host=host, t=host["step"])


def _restore(run: _Run, ckpt: Checkpointer, start: int, state: sac.SACState) -> tuple:
    """(SAC state, observation, host counters) of checkpoint `start`; the environment's state and RNG are
    set to the checkpoint's. ValueError if it is of a run with other settings."""
    target = {"sac": state, "obs": np.zeros(run.obs_dim, np.float64), "physics": _physics(run.env)}
    try:
        restored, meta = ckpt.restore(target, start)
        _check_same_run(run.workdir, meta["run"], run.run_meta, start)
    except BaseException:
        ckpt.close()
        raise
    _set_physics(run.env, restored["physics"])
    run.env.unwrapped.np_random.bit_generator.state = meta["np_random"]
    return restored["sac"], restored["obs"], meta["host"]


def _act_in_env(run: _Run, loop: _Loop, steps: _Steps) -> dict[str, np.ndarray]:
    """Env steps t .. t + k - 1 with the current actor (uniform actions during warm-up): their rows."""
    k, config, host = run.config.steps_per_call, run.config, loop.host
    rows = {
        "observations": np.empty((k, run.obs_dim), np.float32),
        "actions": np.empty((k, run.act_dim), np.float32),
        "rewards": np.empty((k,), np.float32),
        "next_observations": np.empty((k, run.obs_dim), np.float32),
        "terminals": np.zeros((k,), np.float32),
        "timeouts": np.zeros((k,), bool),
    }
    params = loop.state.actor.params
    for i in range(k):
        t = loop.t + i
        if t < config.start_steps:
            a = np.asarray(steps.explore(t))
        else:
            a = np.asarray(steps.act(params, t, jnp.asarray(loop.obs, jnp.float32)))
        next_obs, reward, terminated, _, _ = run.env.step(run.to_env(a))
        host["ep_len"] += 1
        host["ep_return"] += float(reward)
        truncated = host["ep_len"] >= config.max_episode_steps and not terminated
        rows["observations"][i] = loop.obs
        rows["actions"][i] = a
        rows["rewards"][i] = reward
        rows["next_observations"][i] = next_obs
        rows["terminals"][i] = float(terminated)
        rows["timeouts"][i] = truncated
        if terminated or truncated:
            host["recent_returns"] = (host["recent_returns"] + [host["ep_return"]])[-10:]
            host["episodes"] += 1
            host["ep_len"], host["ep_return"] = 0, 0.0
            loop.obs, _ = run.env.reset()
        else:
            loop.obs = next_obs
    return rows


def _learn(run: _Run, loop: _Loop, steps: _Steps, rows: dict[str, np.ndarray]) -> None:
    """Inserts the rows of env steps up to `loop.t` into the device buffer; after warm-up, as many updates."""
    loop.pending.append(rows)
    device_rows = {name: rows[name] for name in sac.REPLAY_FIELDS}
    if loop.t <= run.config.start_steps:
        loop.buffer = sac.replay_buffer_add_jit(loop.buffer, device_rows)
    else:
        loop.state, loop.buffer, m = steps.online_step(loop.state, loop.buffer, device_rows,
                                                       jax.random.fold_in(steps.k_update, loop.t))
        for name, v in m.items():
            loop.train_metrics.setdefault(name, []).append(v)


def _evaluate(run: _Run, loop: _Loop, steps: _Steps, metrics_writer: MetricsWriter) -> None:
    """Deterministic episodes of the current actor, its snapshot, and one metrics.jsonl record."""
    t, config, host = loop.t, run.config, loop.host
    params = loop.state.actor.params
    t_eval = time.monotonic()
    res = evaluate(lambda o: run.to_env(steps.greedy(params, jnp.asarray(o))), run.env_id, num_seeds=1,
                   num_episodes=config.eval_episodes, seed=run.seed + 100_000,
                   max_episode_steps=config.max_episode_steps)
    returns = res.returns[0]
    ret = float(returns.mean())
    snap = os.path.join(run.workdir, "snapshots", f"actor_{t:09d}.npz")
    save_actor(snap, params, step=t, env_step=t, eval_return=ret)
    record = {
        "return": ret,
        "return_std": float(returns.std()),
        "returns": returns,
        "normalized_score": float(registry.normalized_score(run.env_id, ret)),
        "episode_length": float(res.lengths.mean()),
        "train_return": float(np.mean(host["recent_returns"])) if host["recent_returns"] else None,
        "episodes": host["episodes"],
        "updates": int(loop.state.step),
        "eval_seconds": time.monotonic() - t_eval,  # evaluation alone
        "interval_seconds": time.monotonic() - loop.t_eval_start,  # since the previous evaluation
        **{name: float(np.mean(jax.device_get(v))) for name, v in loop.train_metrics.items()},
    }
    metrics_writer.write(STAGE, t, record)
    host["last_eval"] = {"step": t, "return": ret, "normalized_score": _finite(record["normalized_score"])}
    loop.train_metrics = {}
    loop.t_eval_start = time.monotonic()


def _checkpoint(run: _Run, loop: _Loop, ckpt: Checkpointer) -> None:
    """Appends the pending rows to the replay log, then saves the SAC state, observation, env state and RNG."""
    seg_start = loop.t - run.config.steps_per_call * len(loop.pending)
    write_segment(run.workdir, seg_start,
                  {n: np.concatenate([r[n] for r in loop.pending]) for n in REPLAY_FIELDS})
    loop.pending = []
    loop.host["step"] = loop.t
    meta = {"run": run.run_meta, "host": loop.host,
            "np_random": _rng_state_to_json(run.env.unwrapped.np_random.bit_generator.state)}
    # Host copies: saves are asynchronous and the device state is donated to the next update.
    tree = {"sac": jax.tree.map(np.array, loop.state), "obs": np.array(loop.obs, np.float64),
            "physics": _physics(run.env)}
    ckpt.save(loop.t, tree, meta)


def _report(progress: Progress, loop: _Loop) -> None:
    last = loop.host["last_eval"] or {}
    recent = loop.host["recent_returns"]
    progress.update(loop.t, eval_return=last.get("return", float("nan")),
                    norm=last.get("normalized_score") or float("nan"),
                    train_return=float(np.mean(recent)) if recent else float("nan"),
                    episodes=loop.host["episodes"])


def _open_run(env_name: str, workdir: str, seed: int, config: BehaviorConfig) -> _Run:
    env_id = registry.env_id_for(env_name)
    os.makedirs(os.path.join(workdir, "replay"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "snapshots"), exist_ok=True)
    # The bare environment: wrappers keep hidden state (TimeLimit's step counter) that a checkpoint would
    # miss; the time limit is applied here (`max_episode_steps`, truncation, not termination).
    env = make_env(env_id, disable_env_checker=True).unwrapped
    return _Run(env_name=env_name, env_id=env_id, workdir=workdir, seed=seed, config=config, env=env,
                obs_dim=int(env.observation_space.shape[0]), act_dim=int(env.action_space.shape[0]),
                to_env=env_spaces(env_id).from_unit_actions,
                run_meta={"env_id": env_id, "seed": seed, "config": dataclasses.asdict(config)})


def train_behavior(
    env_name: str,
    workdir: str,
    *,
    total_steps: int | None = None,
    seed: int = 0,
    config: BehaviorConfig = BehaviorConfig(),
    progress_interval_s: float = 30.0,
    stop_at: int | None = None,
) -> dict:
    """Trains (or resumes) SAC on `env_name` ('hopper', 'Hopper-v5', 'Pendulum-v1', ...) in `workdir`.

    `stop_at` ends this call early after that many env steps (with a checkpoint; for tests of resuming).
    Returns {"step", "state" (SACState), "last_eval"}; at the end of training also writes behavior.json.
    """
    if total_steps is not None:
        config = dataclasses.replace(config, total_steps=int(total_steps))
    config.validate()
    run = _open_run(env_name, workdir, seed, config)
    k_init, k_act, k_update = _run_keys(seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    loop = _start(run, ckpt, k_init)
    steps = _compile_steps(run, k_act, k_update)
    metrics_writer = MetricsWriter(workdir, tensorboard=False)
    progress = Progress(config.total_steps, f"sac {env_name}", start_step=loop.t, min_interval_s=progress_interval_s)
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    loop.t_eval_start = time.monotonic()
    try:
        while loop.t < end:
            rows = _act_in_env(run, loop, steps)
            loop.t += config.steps_per_call
            _learn(run, loop, steps, rows)
            if loop.t % config.eval_every == 0:
                _evaluate(run, loop, steps, metrics_writer)
            if loop.t % config.checkpoint_every == 0 or loop.t == end:
                _checkpoint(run, loop, ckpt)
            _report(progress, loop)
    finally:
        ckpt.close()
        metrics_writer.close()
        progress.close()
        run.env.close()

    if loop.t >= config.total_steps:
        summary = select_policies(workdir, run.env_id)
        with open(os.path.join(workdir, "behavior.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return {"step": loop.t, "state": loop.state, "last_eval": loop.host["last_eval"]}


def _run_keys(seed: int) -> jax.Array:
    """(init, act, update) keys of the run with `seed`."""
    return jax.random.split(jax.random.PRNGKey(seed), 3)


def initial_actor(env_id: str, seed: int, config: BehaviorConfig = BehaviorConfig()) -> Any:
    """Actor parameters of `train_behavior(env_id, seed=seed, config=config)` before its first update: the
    "randomly initialized policy" of D4RL's random datasets (same network and initialisation as the run)."""
    spaces = env_spaces(registry.env_id_for(env_id))
    state = sac.init_sac(_run_keys(seed)[0], spaces.obs_dim, spaces.act_dim, config.sac)
    return jax.device_get(state.actor.params)


def read_run_settings(workdir: str) -> tuple[str, int, BehaviorConfig] | None:
    """(env_id, seed, BehaviorConfig) of the run in `workdir`, None if none was started there.

    What resuming needs: `mb2po-data train-behavior` continues a run with the settings it was started with
    instead of flag defaults, which `train_behavior` would refuse as another run (or would silently extend
    to, for total_steps).
    """
    if not os.path.isfile(os.path.join(workdir, "run.json")):
        return None
    run = read_run(workdir)
    fields = {f.name for f in dataclasses.fields(BehaviorConfig)}
    cfg = {k: v for k, v in run["config"].items() if k in fields}
    sac_fields = {f.name for f in dataclasses.fields(sac.SACConfig)}
    sac_cfg = {k: v for k, v in cfg.pop("sac", {}).items() if k in sac_fields}
    if "hidden_dims" in sac_cfg:  # JSON has lists; the config is a static (hashable) jit argument
        sac_cfg["hidden_dims"] = tuple(sac_cfg["hidden_dims"])
    return run["env_id"], int(run["seed"]), BehaviorConfig(**cfg, sac=sac.SACConfig(**sac_cfg))

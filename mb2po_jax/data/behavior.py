"""Behaviour-policy training: the long online SAC run behind the D4RL-style datasets (SPEC section 2).

    python -m mb2po_jax.data.behavior --env hopper --workdir runs/behavior/hopper --total_steps 1000000

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
`load_replay_log(workdir, 0, medium_step)`.

Workdir layout:
  checkpoints/          orbax checkpoints (`mb2po_jax.checkpoint`), newest two
  replay/               every transition in order (observations, actions, rewards, next_observations,
                        terminals, timeouts), float32/bool
  snapshots/actor_<step>.npz   actor parameters (float32, self-describing: `sac.actor_module`) with the
                        step and evaluation return, one per evaluation (the policy acting from that step on)
  metrics.jsonl         one record per evaluation: step, return (10 deterministic episodes), returns,
                        normalized_score, training-episode returns and the SAC losses
  run.json              env id, seed and `BehaviorConfig`
  behavior.json         at the end: the expert and medium choice (`select_policies`)

Medium-replay that ships with the package (design). The exact data is a run's replay log (hopper: about
30 floats x the medium step, ~30-60 MB as float32): too big for git. Two ways to rebuild it from a clean
checkout were weighed:
  1. a deterministic re-run of SAC up to the medium step: 0.1-0.4 M updates at ~5 ms on 2 CPU cores is
     10-40 minutes, not "minutes", and it is only bit-exact on the same CPU kind, XLA version and thread
     count (XLA's CPU kernels differ between AVX2 and AVX-512, and SAC amplifies last-bit differences);
  2. actor snapshots along the run: the stochastic policy of the snapshot taken at step s (acting policy of
     env steps (s, s + eval_every]) is rolled out for those steps, uniform random actions for the
     warm-up steps [0, start_steps). Cost: one actor forward pass + one MuJoCo step per transition, about a
     minute for 300 k transitions; size: ~70 k parameters per snapshot (~140 KB as float16), so a snapshot
     every 10-20 k steps up to medium is a few MB per environment.
We use (2). It is an approximation of the true buffer: the same sequence of behaviour policies at the
snapshot granularity (in training the acting policy changes every `steps_per_call` steps; here every
`replay_every` steps), with fresh environment randomness instead of the training run's; episodes run
across policy switches as in training. Measured: hopper, 40 k transitions regenerated in 18 s.

Shipping: `export_assets(workdir, out_dir)` writes expert.npz, medium.npz (float32), replay_<step>.npz
(float16) and manifest.json; `asset_policy` and `medium_replay_policy` turn them into host policies with
the signature of `generation.rollout`, so each dataset kind is one rollout:
  expert / medium:  generation.rollout(env_id, asset_policy(dir, kind, seed), size, seed)
  medium-replay:    policy, size = medium_replay_policy(dir, seed); generation.rollout(env_id, policy, size, seed)
Choosing the expert and medium snapshots of a finished run: `select_policies` (D4RL's rule, documented there).
The dataset kinds are made from the assets by `generation.generate` (`mb2po-data generate --kind medium`), which
looks them up in $MB2PO_BEHAVIOR_DIR/<env>/ or the shipped mb2po_jax/assets/behavior/<env>/; the whole chain is
`mb2po-data train-behavior`, `mb2po-data export-behavior`, `mb2po-data generate`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax import sac
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data import registry
from mb2po_jax.data.envs import env_spaces, make_env
from mb2po_jax.evaluation import evaluate
from mb2po_jax.logger import MetricsWriter, Progress

STAGE = "behavior"
REPLAY_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


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


# ------------------------------------------------------------------------------------- snapshots
def save_actor(path: str, params: Any, **info: Any) -> None:
    """Actor parameters as a flat .npz ("MLP_0/Dense_0/kernel", ...) plus scalar `info` (step, return)."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    meta = {f"info/{k}": np.asarray(v) for k, v in info.items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat, **meta)
    os.replace(tmp, path)


def load_actor(path: str, dtype=np.float32) -> tuple[dict, dict]:
    """(params nested dict usable with `sac.sample_action`, info dict) from a `save_actor` file."""
    params: dict = {}
    info = {}
    with np.load(path) as z:
        for name in z.files:
            if name.startswith("info/"):
                info[name[5:]] = z[name].item() if z[name].ndim == 0 else z[name]
                continue
            node = params
            *parents, last = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = z[name].astype(dtype)
    return params, info


# ------------------------------------------------------------------------------------- replay log
def _segment_files(workdir: str) -> list[tuple[int, int, str]]:
    out = []
    for path in glob.glob(os.path.join(workdir, "replay", "*.npz")):
        m = re.fullmatch(r"(\d+)-(\d+)\.npz", os.path.basename(path))
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)


def _write_segment(workdir: str, start: int, rows: dict[str, np.ndarray]) -> None:
    end = start + len(rows["rewards"])
    path = os.path.join(workdir, "replay", f"{start:09d}-{end:09d}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **rows)
    os.replace(tmp, path)


def load_replay_log(workdir: str, start: int = 0, end: int | None = None) -> dict[str, np.ndarray]:
    """Transitions [start, end) of a run, in order (end None: all that were written)."""
    segments = _segment_files(workdir)
    if end is None:
        end = segments[-1][1] if segments else 0
    parts: dict[str, list] = {k: [] for k in REPLAY_FIELDS}
    covered = start
    for s, e, path in segments:
        if e <= start or s >= end:
            continue
        if s > covered:
            raise FileNotFoundError(f"{workdir}/replay: transitions [{covered}, {s}) are missing")
        with np.load(path) as z:
            for k in REPLAY_FIELDS:
                parts[k].append(z[k][max(start - s, 0): min(end, e) - s])
        covered = min(end, e)
    if covered < end:
        raise FileNotFoundError(f"{workdir}/replay: transitions [{covered}, {end}) are missing")
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


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


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drops metrics.jsonl records written after checkpoint `step` (a resumed run writes them again)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # torn last line
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_evaluations(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("stage") == STAGE and "return" in rec:
                out.append(rec)
    return out


# ------------------------------------------------------------------------------------- training
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
    env_id = registry.env_id_for(env_name)
    os.makedirs(os.path.join(workdir, "replay"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "snapshots"), exist_ok=True)
    k = config.steps_per_call
    capacity = config.replay_capacity or config.total_steps

    # The bare environment: wrappers keep hidden state (TimeLimit's step counter) that a checkpoint would
    # miss; the time limit is applied here (`max_episode_steps`, truncation, not termination).
    env = make_env(env_id, disable_env_checker=True).unwrapped
    obs_dim = int(env.observation_space.shape[0])
    act_dim = int(env.action_space.shape[0])
    to_env = env_spaces(env_id).from_unit_actions

    k_init, k_act, k_update = _run_keys(seed)
    state = sac.init_sac(k_init, obs_dim, act_dim, config.sac)
    obs, _ = env.reset(seed=seed)
    host = {"step": 0, "ep_len": 0, "ep_return": 0.0, "episodes": 0, "recent_returns": [], "last_eval": None}

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    run_meta = {"env_id": env_id, "seed": seed, "config": dataclasses.asdict(config)}
    start = ckpt.latest_step()
    if start is not None:
        target = {"sac": state, "obs": np.zeros(obs_dim, np.float64), "physics": _physics(env)}
        try:
            restored, meta = ckpt.restore(target, start)
            _check_same_run(workdir, meta["run"], run_meta, start)
        except BaseException:
            ckpt.close()
            raise
        state, obs = restored["sac"], restored["obs"]
        _set_physics(env, restored["physics"])
        env.unwrapped.np_random.bit_generator.state = meta["np_random"]
        host = meta["host"]
    # Output written after the checkpoint we start from (by a process killed before its next checkpoint)
    # is dropped: this run writes it again, identically.
    for seg_start, _, path in _segment_files(workdir):
        if seg_start >= (start or 0):
            os.remove(path)
    _truncate_metrics(workdir, start or 0)
    if start is not None:
        buffer = _rebuild_buffer(workdir, start, capacity, obs_dim, act_dim)
        print(f"[{env_name}] resumed from step {start} in {workdir}", file=sys.stderr, flush=True)
    else:
        buffer = sac.replay_buffer_init(capacity, obs_dim, act_dim)
    with open(os.path.join(workdir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run_meta, f, indent=2)
    t = host["step"]

    online_step = sac.make_online_step(config.sac)
    act = jax.jit(lambda params, i, o: sac.sample_action(params, jax.random.fold_in(k_act, i), o))
    explore = jax.jit(
        lambda i: jax.random.uniform(jax.random.fold_in(k_act, i), (act_dim,), minval=-1.0, maxval=1.0))
    greedy = jax.jit(sac.deterministic_action)
    metrics_writer = MetricsWriter(workdir, tensorboard=False)
    progress = Progress(config.total_steps, f"sac {env_name}", start_step=t, min_interval_s=progress_interval_s)

    pending: list[dict[str, np.ndarray]] = []  # rows since the last checkpoint, for the replay log
    train_metrics: dict[str, list] = {}
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    t_eval_start = time.monotonic()
    try:
        while t < end:
            rows = {
                "observations": np.empty((k, obs_dim), np.float32),
                "actions": np.empty((k, act_dim), np.float32),
                "rewards": np.empty((k,), np.float32),
                "next_observations": np.empty((k, obs_dim), np.float32),
                "terminals": np.zeros((k,), np.float32),
                "timeouts": np.zeros((k,), bool),
            }
            params = state.actor.params
            for i in range(k):
                if t + i < config.start_steps:
                    a = np.asarray(explore(t + i))
                else:
                    a = np.asarray(act(params, t + i, jnp.asarray(obs, jnp.float32)))
                next_obs, reward, terminated, _, _ = env.step(to_env(a))
                host["ep_len"] += 1
                host["ep_return"] += float(reward)
                truncated = host["ep_len"] >= config.max_episode_steps and not terminated
                rows["observations"][i] = obs
                rows["actions"][i] = a
                rows["rewards"][i] = reward
                rows["next_observations"][i] = next_obs
                rows["terminals"][i] = float(terminated)
                rows["timeouts"][i] = truncated
                if terminated or truncated:
                    host["recent_returns"] = (host["recent_returns"] + [host["ep_return"]])[-10:]
                    host["episodes"] += 1
                    host["ep_len"], host["ep_return"] = 0, 0.0
                    obs, _ = env.reset()
                else:
                    obs = next_obs
            t += k
            pending.append(rows)
            device_rows = {name: rows[name] for name in sac.REPLAY_FIELDS}
            if t <= config.start_steps:
                buffer = sac.replay_buffer_add_jit(buffer, device_rows)
            else:
                state, buffer, m = online_step(state, buffer, device_rows, jax.random.fold_in(k_update, t))
                for name, v in m.items():
                    train_metrics.setdefault(name, []).append(v)

            if t % config.eval_every == 0:
                params = state.actor.params
                t_eval = time.monotonic()
                res = evaluate(lambda o: to_env(greedy(params, jnp.asarray(o))), env_id, num_seeds=1,
                               num_episodes=config.eval_episodes, seed=seed + 100_000,
                               max_episode_steps=config.max_episode_steps)
                returns = res.returns[0]
                ret = float(returns.mean())
                snap = os.path.join(workdir, "snapshots", f"actor_{t:09d}.npz")
                save_actor(snap, params, step=t, env_step=t, eval_return=ret)
                record = {
                    "return": ret,
                    "return_std": float(returns.std()),
                    "returns": returns,
                    "normalized_score": float(registry.normalized_score(env_id, ret)),
                    "episode_length": float(res.lengths.mean()),
                    "train_return": float(np.mean(host["recent_returns"])) if host["recent_returns"] else None,
                    "episodes": host["episodes"],
                    "updates": int(state.step),
                    "eval_seconds": time.monotonic() - t_eval,  # evaluation alone
                    "interval_seconds": time.monotonic() - t_eval_start,  # since the previous evaluation
                    **{name: float(np.mean(jax.device_get(v))) for name, v in train_metrics.items()},
                }
                metrics_writer.write(STAGE, t, record)
                host["last_eval"] = {"step": t, "return": ret,
                                     "normalized_score": _finite(record["normalized_score"])}
                train_metrics = {}
                t_eval_start = time.monotonic()

            if t % config.checkpoint_every == 0 or t == end:
                seg_start = t - k * len(pending)
                _write_segment(workdir, seg_start,
                               {n: np.concatenate([r[n] for r in pending]) for n in REPLAY_FIELDS})
                pending = []
                host["step"] = t
                meta = {"run": run_meta, "host": host,
                        "np_random": _rng_state_to_json(env.unwrapped.np_random.bit_generator.state)}
                # Host copies: saves are asynchronous and the device state is donated to the next update.
                tree = {"sac": jax.tree.map(np.array, state), "obs": np.array(obs, np.float64),
                        "physics": _physics(env)}
                ckpt.save(t, tree, meta)

            last = host["last_eval"] or {}
            recent = host["recent_returns"]
            progress.update(t, eval_return=last.get("return", float("nan")),
                            norm=last.get("normalized_score") or float("nan"),
                            train_return=float(np.mean(recent)) if recent else float("nan"),
                            episodes=host["episodes"])
    finally:
        ckpt.close()
        metrics_writer.close()
        progress.close()
        env.close()

    if t >= config.total_steps:
        summary = select_policies(workdir, env_id)
        with open(os.path.join(workdir, "behavior.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return {"step": t, "state": state, "last_eval": host["last_eval"]}


def _run_keys(seed: int) -> jax.Array:
    """(init, act, update) keys of the run with `seed`."""
    return jax.random.split(jax.random.PRNGKey(seed), 3)


def initial_actor(env_id: str, seed: int, config: BehaviorConfig = BehaviorConfig()) -> Any:
    """Actor parameters of `train_behavior(env_id, seed=seed, config=config)` before its first update: the
    "randomly initialized policy" of D4RL's random datasets (same network and initialisation as the run)."""
    spaces = env_spaces(registry.env_id_for(env_id))
    state = sac.init_sac(_run_keys(seed)[0], spaces.obs_dim, spaces.act_dim, config.sac)
    return jax.device_get(state.actor.params)


# ------------------------------------------------------------------------------------- selection
def select_policies(workdir: str, env_id: str, *, expert_window: float = 0.2,
                    medium_band: tuple[float, float] = (25.0, 50.0), medium_tolerance: float = 0.15,
                    smoothing: int = 1) -> dict:
    """Expert and medium snapshots of a finished run, from its evaluations.

    expert: the best-evaluated snapshot in the last `expert_window` of training (a fully trained policy;
      the window guards against a final evaluation that caught a dip).
    medium: D4RL stops training when the policy reaches about one third of the expert's return: the first
      snapshot whose return, and the mean return of the `smoothing` evaluations on either side of it, are
      within `medium_tolerance` of expert/3 (and whose normalised score lies in `medium_band` when the env
      has reference scores). Early SAC evaluations swing widely (hopper: 240, 1090, 950, 600 at 35-50 k
      steps); the neighbours make "reached" mean a level the run holds, not one lucky evaluation.
      If no snapshot qualifies: the in-band snapshot closest to expert/3 (own and neighbourhood return).
    medium-replay: transitions [0, medium step) (`load_replay_log`); for regeneration, the snapshots up to
      the medium step.
    """
    evals = read_evaluations(workdir)
    if not evals:
        raise ValueError(f"{workdir}: no evaluations")
    last_step = evals[-1]["step"]
    late = [e for e in evals if e["step"] >= (1.0 - expert_window) * last_step]
    expert = max(late, key=lambda e: e["return"])
    target = expert["return"] / 3.0
    has_ref = registry.has_reference_score(env_id)
    returns = np.asarray([e["return"] for e in evals])
    around = [float(returns[max(0, i - smoothing): i + smoothing + 1].mean()) for i in range(len(evals))]

    def in_band(i):
        return (not has_ref) or medium_band[0] <= evals[i]["normalized_score"] <= medium_band[1]

    def miss(i):  # relative distance of the snapshot and of its neighbourhood from the target
        return max(abs(returns[i] - target), abs(around[i] - target)) / abs(target)

    candidates = [i for i, e in enumerate(evals) if e["step"] < expert["step"] and in_band(i)]
    near = [i for i in candidates if miss(i) <= medium_tolerance]
    if near:
        medium = evals[near[0]]
    else:
        medium = evals[min(candidates, key=miss)] if candidates else None

    def describe(e):
        if e is None:
            return None
        return {"step": e["step"], "return": e["return"], "normalized_score": e["normalized_score"],
                "snapshot": os.path.join("snapshots", f"actor_{e['step']:09d}.npz")}

    return {"env_id": env_id, "expert": describe(expert), "medium": describe(medium),
            "medium_target_return": target,
            "medium_replay": None if medium is None else {
                "transitions": medium["step"],
                "snapshots": [describe(e)["snapshot"] for e in evals if e["step"] < medium["step"]]}}


def policy_fn(params: Any, seed: int):
    """Host policy `obs [obs_dim] -> (action [act_dim] float64 in (-1, 1), log pi(a|s))` of a snapshot's
    stochastic actor, the signature `generation.rollout` takes. Call i draws with `fold_in(PRNGKey(seed), i)`:
    reproducible. Scaling to an env's bounds is the caller's (`EnvSpaces.from_unit_actions`).
    """
    key = jax.random.PRNGKey(seed)
    draw = jax.jit(lambda p, i, o: sac.sample_action_and_log_prob(p, jax.random.fold_in(key, i), o))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    count = [0]

    def act(obs: np.ndarray):
        a, log_prob = draw(params, count[0], jnp.asarray(obs, jnp.float32))
        count[0] += 1
        return np.asarray(a, np.float64), float(log_prob)

    return act


def export_assets(workdir: str, out_dir: str, *, replay_every: int = 10_000, replay_dtype=np.float16) -> dict:
    """Writes what rebuilding the datasets needs to `out_dir` (e.g. mb2po_jax/assets/behavior/hopper):
    expert.npz and medium.npz (float32, exactly the evaluated policies), replay_<step>.npz (the actors
    of medium-replay, every `replay_every` env steps up to the medium step, `replay_dtype`), manifest.json,
    and training_curve.json (the run's evaluations, `write_training_curve`).

    Medium-replay regeneration (an approximation of the true replay buffer, see the module docstring):
    steps [0, start_steps) uniform random actions; then for each listed snapshot at step s, its stochastic
    policy for env steps [max(s, start_steps), next snapshot's step or `transitions`).
    """
    summary = select_policies(workdir, registry.env_id_for(_read_run(workdir)["env_id"]))
    if summary["medium"] is None:
        raise ValueError(f"{workdir}: no medium policy found: {summary}")
    run = _read_run(workdir)
    os.makedirs(out_dir, exist_ok=True)
    for kind in ("expert", "medium"):
        params, info = load_actor(os.path.join(workdir, summary[kind]["snapshot"]))
        save_actor(os.path.join(out_dir, f"{kind}.npz"), params, **info)
    medium_step = summary["medium"]["step"]
    start_steps = run["config"]["start_steps"]
    replay = []
    for step in range(start_steps, medium_step, replay_every):
        path = os.path.join(workdir, "snapshots", f"actor_{step:09d}.npz")
        if not os.path.exists(path):  # the run saves a snapshot at every evaluation; warm-up has none
            continue
        params, info = load_actor(path, dtype=replay_dtype)
        name = f"replay_{step:09d}.npz"
        save_actor(os.path.join(out_dir, name), params, **info)
        replay.append({"step": step, "file": name})
    if not replay or replay[0]["step"] > start_steps:
        raise ValueError(f"{workdir}: no snapshot at the end of warm-up (step {start_steps})")
    manifest = {
        "env_id": summary["env_id"],
        "seed": run["seed"],
        "expert": {**summary["expert"], "file": "expert.npz"},
        "medium": {**summary["medium"], "file": "medium.npz"},
        "medium_target_return": summary["medium_target_return"],
        "medium_replay": {"transitions": medium_step, "random_steps": start_steps, "snapshots": replay},
        "sac_config": run["config"]["sac"],
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    write_training_curve(workdir, os.path.join(out_dir, "training_curve.json"))
    return manifest


def write_training_curve(workdir: str, path: str) -> None:
    """The run's evaluation curve (step, return, normalised score, wall seconds since the previous
    evaluation), rounded to 0.1: the record of how the shipped policies were reached, kept beside them."""
    run = _read_run(workdir)
    config = run["config"]

    def point(e):
        out = {"step": e["step"], "return": round(float(e["return"]), 1)}
        for key in ("normalized_score", "interval_seconds"):
            if e.get(key) is not None:
                out[key] = round(float(e[key]), 1)
        return out

    curve = {"env_id": registry.env_id_for(run["env_id"]),
             "evaluation": f"{config['eval_episodes']} deterministic episodes every {config['eval_every']} env steps",
             "curve": [point(e) for e in read_evaluations(workdir)]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(curve, f, indent=1)


def read_manifest(asset_dir: str) -> dict:
    with open(os.path.join(asset_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def asset_policy(asset_dir: str, kind: str, seed: int):
    """Stochastic host policy (`policy_fn`) of the exported `expert` or `medium` actor in `asset_dir`."""
    manifest = read_manifest(asset_dir)
    params, _ = load_actor(os.path.join(asset_dir, manifest[kind]["file"]))
    return policy_fn(params, seed)


def medium_replay_policy(asset_dir: str, seed: int):
    """(policy, size): one host policy that replays the training run's sequence of behaviour policies.

    Call i (= env step i of one continuous rollout of `size` steps, e.g. `generation.rollout`) acts uniformly
    at random for i < random_steps (log-prob -act_dim log 2), then with the stochastic policy of the newest
    exported snapshot whose step is <= i. Episodes run across snapshot switches, as in training.
    """
    manifest = read_manifest(asset_dir)
    mr = manifest["medium_replay"]
    snaps = sorted(mr["snapshots"], key=lambda s: s["step"])
    actors = [load_actor(os.path.join(asset_dir, s["file"]))[0] for s in snaps]
    policies = [policy_fn(p, seed + j + 1) for j, p in enumerate(actors)]
    steps = np.asarray([s["step"] for s in snaps])
    act_dim = sac.actor_module(actors[0]).action_dim
    uniform_log_prob = -act_dim * float(np.log(2.0))  # density 2^-act_dim on [-1, 1]^act_dim
    rng = np.random.default_rng(seed)
    count = [0]

    def act(obs: np.ndarray):
        i = count[0]
        count[0] += 1
        if i < mr["random_steps"]:
            return rng.uniform(-1.0, 1.0, act_dim), uniform_log_prob
        return policies[int(np.searchsorted(steps, i, side="right")) - 1](obs)

    return act, int(mr["transitions"])


def _read_run(workdir: str) -> dict:
    """The run's settings (env_id, seed, config), written to run.json when training starts."""
    with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
        return json.load(f)


def read_run_settings(workdir: str) -> tuple[str, int, BehaviorConfig] | None:
    """(env_id, seed, BehaviorConfig) of the run in `workdir`, None if none was started there.

    What resuming needs: `mb2po-data train-behavior` continues a run with the settings it was started with
    instead of flag defaults, which `train_behavior` would refuse as another run (or would silently extend
    to, for total_steps).
    """
    if not os.path.isfile(os.path.join(workdir, "run.json")):
        return None
    run = _read_run(workdir)
    fields = {f.name for f in dataclasses.fields(BehaviorConfig)}
    cfg = {k: v for k, v in run["config"].items() if k in fields}
    sac_fields = {f.name for f in dataclasses.fields(sac.SACConfig)}
    sac_cfg = {k: v for k, v in cfg.pop("sac", {}).items() if k in sac_fields}
    if "hidden_dims" in sac_cfg:  # JSON has lists; the config is a static (hashable) jit argument
        sac_cfg["hidden_dims"] = tuple(sac_cfg["hidden_dims"])
    return run["env_id"], int(run["seed"]), BehaviorConfig(**cfg, sac=sac.SACConfig(**sac_cfg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mb2po_jax.data.behavior", description=__doc__.split("\n")[0])
    p.add_argument("--env", required=True, help="hopper, halfcheetah, walker2d or a Gymnasium id")
    p.add_argument("--workdir", required=True)
    p.add_argument("--total_steps", type=int, default=BehaviorConfig.total_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps_per_call", type=int, default=BehaviorConfig.steps_per_call)
    p.add_argument("--stop_at", type=int, default=None, help="end this process after this many env steps")
    args = p.parse_args(argv)
    config = BehaviorConfig(total_steps=args.total_steps, steps_per_call=args.steps_per_call)
    out = train_behavior(args.env, args.workdir, seed=args.seed, config=config, stop_at=args.stop_at)
    print(json.dumps({"step": out["step"], "last_eval": out["last_eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

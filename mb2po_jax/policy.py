"""A trained policy out of a `mb2po-train` workdir: `load_policy(workdir, stage, seed)` -> obs -> env action.

    policy = mb2po_jax.load_policy("runs/hmr")                 # the MB2PO policy if that stage finished
    action = policy(obs)                                       # [obs_dim] -> [act_dim], deterministic
    actions = policy(batch_of_obs, jax.random.PRNGKey(0))      # [N, obs_dim] -> [N, act_dim], sampled

What is read: config.json (the AWAC network settings, the environment, the number of seeds) and, from the
stage's newest checkpoint, the actor's parameters and the observation normaliser only (a partial restore;
`load_agent(source, critics=True)` adds the critics and target critics, for experiments/critic_check.py).
An MB2PO checkpoint also holds the model ring, about 40 GB at the paper preset: it stays on disk, as do
the critics and optimiser states. Actions come out in the environment's units: the tanh policy acts in
[-1, 1], mapped onto the environment's Box bounds as training's evaluation maps them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax import awac
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data.envs import env_spaces
from mb2po_jax.errors import ConfigError, WorkdirError

POLICY_STAGES = ("online", "mb2po", "awac")  # the stages whose checkpoint holds an agent, newest first


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """Which checkpoint a policy comes from, and what a caller needs to run it (`find_policy`)."""

    workdir: str
    stage: str  # "awac", "mb2po" or "online"
    seed: int  # index among the run's seeds
    step: int  # the checkpoint's step: AWAC steps or MB2PO iterations
    env_id: str
    config: dict  # config.json's "config": the resolved RunConfig as a dict
    final: dict | None  # the checkpoint meta's "final": the stage's final scores and episodes; None before

    @property
    def finished(self) -> bool:
        """The stage's final checkpoint (it holds the stage's final evaluation)."""
        return self.final is not None

    @property
    def num_seeds(self) -> int:
        return int(self.config.get("num_seeds", 1))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: cannot read ({' '.join(str(e).split())})") from None


def _newest(workdir: str, stage: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest checkpoint of `stage`, or None when the stage has no checkpoint."""
    directory = os.path.join(workdir, "checkpoints", stage)
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory, max_to_keep=None, read_only=True)
    try:
        step = ckpt.latest_step()
        return None if step is None else (step, ckpt.read_meta(step))
    finally:
        ckpt.close()


def find_policy(workdir: str, stage: str | None = None, seed: int = 0) -> PolicySource:
    """Resolves (workdir, stage, seed) to a checkpoint without reading any array. stage None: the newest
    finished stage with an agent (online, else mb2po, else awac), or the newest unfinished one if none has
    finished."""
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir}: no such directory")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise WorkdirError(f"{workdir}: not a mb2po-train workdir (no config.json)")
    recorded = _read_json(config_path)
    config = recorded.get("config") or {}
    env_id = (recorded.get("identity") or {}).get("env")
    if env_id is None and os.path.isfile(os.path.join(workdir, "results.json")):
        env_id = _read_json(os.path.join(workdir, "results.json")).get("env")
    if not env_id:
        raise WorkdirError(f"{config_path}: names no environment (identity.env)")
    if stage is not None and stage not in POLICY_STAGES:
        raise ConfigError(f"stage must be one of {', '.join(POLICY_STAGES)} (the stages with a policy), "
                          f"got {stage!r}")
    newest = {s: _newest(workdir, s) for s in ([stage] if stage else POLICY_STAGES)}
    if stage is None:
        have = [s for s in POLICY_STAGES if newest[s] is not None]
        if not have:
            raise WorkdirError(f"{workdir}: no AWAC, MB2PO or online checkpoint in {os.path.join(workdir, 'checkpoints')}"
                               "; train one first (mb2po-train --workdir ...)")
        stage = next((s for s in have if newest[s][1].get("final") is not None), have[0])
    elif newest[stage] is None:
        raise WorkdirError(f"{workdir}: the {stage} stage has not been run (no checkpoint in "
                           f"{os.path.join(workdir, 'checkpoints', stage)})")
    num_seeds = int(config.get("num_seeds", 1))
    if not 0 <= seed < num_seeds:
        raise ConfigError(f"seed {seed} is out of range: {workdir} trained {num_seeds} seed(s), "
                          f"0 to {num_seeds - 1}")
    step, meta = newest[stage]
    return PolicySource(workdir=workdir, stage=stage, seed=int(seed), step=int(step), env_id=env_id,
                        config=config, final=meta.get("final"))


def awac_config(config: dict) -> awac.AWACConfig:
    """The AWACConfig a workdir's config.json records (lists back to tuples; fields it lacks: defaults)."""
    fields = {f.name for f in dataclasses.fields(awac.AWACConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (config.get("awac") or {}).items()
              if k in fields}
    return awac.AWACConfig(**values)


def load_agents(source: PolicySource, critics: bool = False) -> awac.AWACState:
    """Every seed's actor of `source`'s checkpoint, read once, as one AWACState whose arrays lead with the
    seed axis [S]: `actor_params` and `normalizer`, plus `critic_params` and `target_critic_params` with
    `critics=True` (to inspect the value estimates); the rest (optimiser states, key, and the critics by
    default) is None: acting does not read it. `source.seed` is not read."""
    cfg = awac_config(source.config)
    spaces = env_spaces(source.env_id)
    one = jax.eval_shape(lambda: awac.init(jax.random.PRNGKey(0), spaces.obs_dim, spaces.act_dim, cfg))
    seeds = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((source.num_seeds, *x.shape), x.dtype), tree)
    fields = ("actor_params", "normalizer") + (("critic_params", "target_critic_params") if critics else ())
    target = {name: seeds(getattr(one, name)) for name in fields}
    if source.stage in ("mb2po", "online"):  # MB2POState/OnlineState(agent, buffer, ...): not the ring
        target = {"agent": target}
    ckpt = Checkpointer(os.path.join(source.workdir, "checkpoints", source.stage), max_to_keep=None,
                        read_only=True)
    try:
        restored, _ = ckpt.restore(target, step=source.step, partial=True)
    except FileNotFoundError:  # a running training kept only its newest checkpoints
        raise WorkdirError(f"{ckpt.directory}: checkpoint {source.step} is gone (a running training replaced "
                           "it); load the policy again") from None
    finally:
        ckpt.close()
    restored = restored.get("agent", restored)
    return awac.AWACState(actor_params=restored["actor_params"], critic_params=restored.get("critic_params"),
                          target_critic_params=restored.get("target_critic_params"),
                          actor_opt_state=None, critic_opt_state=None, normalizer=restored["normalizer"],
                          key=None, step=None, config=cfg, action_dim=spaces.act_dim)


def seed_of(agents: awac.AWACState, seed: int) -> awac.AWACState:
    """Seed `seed` of `load_agents`' [S] state (its None fields stay None)."""
    return jax.tree.map(lambda x: x[seed], agents)


def load_agent(source: PolicySource, critics: bool = False) -> awac.AWACState:
    """Seed `source.seed` of `load_agents(source, critics)`."""
    return seed_of(load_agents(source, critics), source.seed)


@jax.jit
def _act_env(agent: awac.AWACState, low: jax.Array, high: jax.Array, obs: jax.Array,
             key: jax.Array | None) -> jax.Array:
    """obs [..., obs_dim] -> the environment's action [..., act_dim]: the policy's [-1, 1] onto [low, high]."""
    action = awac.act(agent, obs, key)
    return low + (action + 1.0) * 0.5 * (high - low)


_act_seeds = jax.jit(awac.act_seeds)  # deterministic actions, state [S], obs [S, N, o]


def evaluation_act_fn(agents: awac.AWACState, spaces) -> Callable[[np.ndarray], np.ndarray]:
    """`evaluation.evaluate`'s act_fn for agents [S]: obs [S, N, o] -> the environment's actions [S, N, a],
    the deterministic action rescaled in float64 (`EnvSpaces.from_unit_actions`). Training's evaluations
    and `mb2po-eval` both act through it, so mb2po-eval reproduces a recorded score exactly: `make_policy`
    rescales in float32, and over a long walker2d episode that last-bit difference makes another episode
    (seed 1 of a walker2d-medium AWAC run: 44.6 against the recorded 40.5)."""
    return lambda obs: spaces.from_unit_actions(np.asarray(_act_seeds(agents, jnp.asarray(obs))))


def make_policy(source: PolicySource) -> Callable[..., jax.Array]:
    """`source`'s actor as `policy(obs, key=None)`, one jitted call: obs [obs_dim] or [N, obs_dim] ->
    actions [act_dim] or [N, act_dim] in the environment's units; deterministic (tanh of the most probable
    mixture component's mean, as training evaluates) without a key, a sample of the policy with one."""
    agent = load_agent(source)
    spaces = env_spaces(source.env_id)
    low, high = jnp.asarray(spaces.act_low, jnp.float32), jnp.asarray(spaces.act_high, jnp.float32)

    def policy(obs, key: jax.Array | None = None) -> jax.Array:
        if np.shape(obs)[-1:] != (spaces.obs_dim,):
            raise ValueError(f"policy of {source.env_id}: observations must be [{spaces.obs_dim}] or "
                             f"[N, {spaces.obs_dim}], got shape {np.shape(obs)}")
        return _act_env(agent, low, high, obs, key)

    return policy


def load_policy(workdir: str, stage: str | None = None, seed: int = 0) -> Callable[..., jax.Array]:
    """The trained policy of seed `seed` of a workdir's `stage` ("online", "mb2po" or "awac"; None: the newest
    finished one) as `policy(obs, key=None) -> action` in the environment's units (`make_policy`). Reads
    the actor alone from the stage's newest checkpoint; errors (`Mb2poError`) name what is missing."""
    return make_policy(find_policy(workdir, stage, seed))

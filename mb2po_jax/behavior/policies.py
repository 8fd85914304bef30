"""Behaviour actors on disk and the host policies made from them.

Actor files (`save_actor` / `load_actor`) are flat .npz files of SAC actor parameters plus scalar info (step,
evaluation return); they are self-describing (`sac.actor_module` reads the network off the shapes). A training
run writes one per evaluation (`train.train_behavior`); `export.export_assets` copies the expert, medium and
medium-replay ones, with manifest.json, into an asset directory such as the shipped
mb2po_jax/behavior/assets/<env>/. `asset_policy` and `medium_replay_policy` turn an asset directory into host
policies with the signature of `generation.rollout`, so each dataset kind is one rollout:
  expert / medium:  generation.rollout(env_id, asset_policy(dir, kind, seed), size, seed)
  medium-replay:    policy, size = medium_replay_policy(dir, seed); generation.rollout(env_id, policy, size, seed)
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mb2po_jax.behavior import sac
from mb2po_jax.data import registry

BEHAVIOR_DIR_VAR = "MB2PO_BEHAVIOR_DIR"
# The behaviour policies that ship with the package, one directory per environment key (hopper, ...).
PACKAGE_BEHAVIOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def behavior_asset_dir(env_id: str) -> str:
    """Where the behaviour-policy assets of `env_id` are looked up.

    $MB2PO_BEHAVIOR_DIR/<env>, when the variable is set, replaces the shipped mb2po_jax/behavior/assets/<env>
    rather than adding to it: which policies made a dataset should never depend on what else is installed.
    """
    root = os.environ.get(BEHAVIOR_DIR_VAR) or PACKAGE_BEHAVIOR_DIR
    return os.path.join(root, registry.env_key(env_id) or env_id)


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

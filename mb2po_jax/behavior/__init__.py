"""Behaviour-policy tooling: the online SAC runs that D4RL-style datasets are rolled out from.

Separate from the paper's algorithm (AWAC + MB2PO): nothing outside this package and the `mb2po-data`
command line needs it, except for making datasets. Modules, each importing only those above it:

  sac         soft actor-critic: networks' losses, updates, the device replay buffer (pure JAX)
  policies    actor files (`save_actor` / `load_actor`), host policies of them, where assets are looked up
  rundir      a run's directory: replay log, metrics, run.json, the expert/medium choice (`select_policies`)
  train       `train_behavior`: the resumable online SAC run (`mb2po-data train-behavior`)
  export      `export_assets`: a finished run as the small shipped assets (`mb2po-data export-behavior`)
  generation  the D4RL-style dataset kinds, rolled out from those assets (`mb2po-data generate`)
  assets/     the shipped behaviour policies, one directory per environment (manifest.json, actor files)

Imports flow one way: this package imports `mb2po_jax.data` (names, environments, file formats) and
`mb2po_jax.data` never imports it.
"""

from mb2po_jax.behavior.export import export_assets, write_training_curve
from mb2po_jax.behavior.policies import (
    BEHAVIOR_DIR_VAR,
    PACKAGE_BEHAVIOR_DIR,
    asset_policy,
    behavior_asset_dir,
    load_actor,
    medium_replay_policy,
    policy_fn,
    read_manifest,
    save_actor,
)
from mb2po_jax.behavior.rundir import REPLAY_FIELDS, load_replay_log, read_evaluations, select_policies
from mb2po_jax.behavior.train import BehaviorConfig, initial_actor, read_run_settings, train_behavior

__all__ = [
    "BehaviorConfig", "train_behavior", "initial_actor", "read_run_settings",
    "REPLAY_FIELDS", "load_replay_log", "read_evaluations", "select_policies",
    "save_actor", "load_actor", "policy_fn", "read_manifest", "asset_policy", "medium_replay_policy",
    "behavior_asset_dir", "PACKAGE_BEHAVIOR_DIR", "BEHAVIOR_DIR_VAR",
    "export_assets", "write_training_curve",
]

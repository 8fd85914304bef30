"""`mb2po-train`: the absl CLI. Maps flags onto RunConfig (mb2po_jax.config) and runs the pipeline.

    mb2po-train --preset smoke                                   # built-in default dataset, no download
    mb2po-train --dataset hopper-medium-replay-v2 --workdir runs/hmr --preset cpu --num_seeds 2
    mb2po-train --dataset my.hdf5 --env Hopper-v5 --awac_steps 200000 --temperature 0.5

Rerunning with the same --workdir resumes; SIGTERM saves a checkpoint and exits 0 (rerun to resume).

Several hosts: run the same command on every host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=i (or --distributed on a cluster JAX detects: SLURM, Open MPI, Cloud TPU, Kubernetes), and a
--workdir on a filesystem every host sees.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from mb2po_jax import config as config_lib
from mb2po_jax.errors import ConfigError, Mb2poError

FLAGS = flags.FLAGS
_LIBRARY_FLAGS = frozenset(FLAGS)  # defined by absl and the libraries imported above; the rest are ours

flags.DEFINE_string("dataset", None, "D4RL name (hopper-medium-replay-v2), local name "
                    "(hopper-random-local), Minari id, or path to a D4RL-layout HDF5 file. "
                    "Default: the built-in local dataset, generated on first use.")
flags.DEFINE_string("env", None, "Gymnasium env id overriding the one implied by the dataset.")
flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists). "
                    "Default: workdirs/<dataset>_<preset>_seed<seed>, with _<hash> of the settings added "
                    "when flags change what the run is (e.g. --penalty_share; not step counts).")
flags.DEFINE_string("preset", "smoke", f"One of {sorted(config_lib.PRESETS)}.")
flags.DEFINE_list("stages", ["awac"], f"Stages to run, from {','.join(config_lib.STAGES)}.")
flags.DEFINE_integer("seed", 0, "Base seed; seed axis s uses key split(PRNGKey(seed), num_seeds)[s].")
flags.DEFINE_integer("num_seeds", None, "Seeds trained side by side in one program (preset default).")
# Run schedule (defaults from the preset).
flags.DEFINE_integer("awac_steps", None, "AWAC gradient steps (paper: 500000).")
flags.DEFINE_integer("steps_per_call", None, "Updates fused into one compiled call.")
flags.DEFINE_integer("eval_every", None, "Evaluate every this many AWAC steps.")
flags.DEFINE_integer("eval_episodes", None, "Evaluation episodes per seed.")
flags.DEFINE_integer("final_eval_episodes", None, "Episodes per seed of each stage's last evaluation, its final "
                     "score (default: --eval_episodes; the cpu and paper presets: 100).")
flags.DEFINE_integer("max_episode_steps", None, "Episode length (time limit) of evaluations and of the "
                     "online stage's environments.")
flags.DEFINE_integer("checkpoint_every", None, "Checkpoint every this many steps.")
# AWAC hyperparameters (defaults in AWACConfig).
flags.DEFINE_integer("batch_size", None, "AWAC minibatch size.")
flags.DEFINE_float("actor_lr", None, "Actor Adam learning rate.")
flags.DEFINE_float("critic_lr", None, "Critic Adam learning rate.")
flags.DEFINE_float("gamma", None, "Discount.")
flags.DEFINE_float("tau", None, "Polyak rate of the target critics.")
flags.DEFINE_float("temperature", None, "AWAC alpha in exp(A / alpha) (paper: 1.0).")
flags.DEFINE_float("max_weight", None, "Clamp of the advantage weights (paper: 20).")
flags.DEFINE_integer("num_components", None, "Mixture components of the tanh-GMM actor (paper: 5).")
flags.DEFINE_list("actor_hidden_dims", None, "Actor hidden layer widths, e.g. 256,256,256.")
flags.DEFINE_list("critic_hidden_dims", None, "Critic hidden layer widths, e.g. 256,256,256.")
flags.DEFINE_boolean("normalize_observations", None, "Standardise observations with dataset stats.")
flags.DEFINE_enum("critic", None, ["twin", "quantile"], "Twin critics (clipped double-Q), or twin "
                  "distributional critics of --num_quantiles quantiles (quantile Huber loss).")
flags.DEFINE_integer("num_quantiles", None, "Quantiles per critic with --critic=quantile (default 32).")
flags.DEFINE_boolean("value_transform", None, "Critics predict h(Q), h(x) = sign(x)(sqrt(|x|+1)-1) + eps x "
                     "(Pohlen et al.), with targets h(r + gamma h^-1(Q')).")
flags.DEFINE_float("value_transform_eps", None, "The eps of the value transform (default 0.01).")
# Dynamics ensemble (defaults in DynamicsConfig: MBPO/MOPO's).
flags.DEFINE_integer("dynamics_steps", None, "Ensemble gradient-step budget (paper: 100000).")
flags.DEFINE_boolean("dynamics_early_stopping", None, "Stop when no member's holdout MSE improved for "
                     "--max_epochs_since_improvement epochs (MBPO); off: train the whole budget.")
flags.DEFINE_integer("num_members", None, "Ensemble members N (default 5, the paper's; MOPO: 7).")
flags.DEFINE_integer("num_elites", None, "Members with the lowest holdout MSE, used by rollouts with "
                     "--rollout_members=elites (default 5).")
flags.DEFINE_list("dynamics_hidden_dims", None, "Member hidden widths (default 200,200,200,200).")
flags.DEFINE_list("dynamics_weight_decay", None, "L2 coefficient per member layer (hidden layers + 1).")
flags.DEFINE_float("dynamics_lr", None, "Ensemble Adam learning rate.")
flags.DEFINE_integer("dynamics_batch_size", None, "Minibatch per member.")
flags.DEFINE_float("holdout_fraction", None, "Fraction of D_beta held out for early stopping/elites.")
flags.DEFINE_integer("max_holdout", None, "Cap on holdout rows.")
flags.DEFINE_integer("max_epochs_since_improvement", None, "Early-stopping patience in epochs.")
# MB2PO (defaults in MB2POConfig; horizon and penalty_coef per task from mb2po_jax/configs/tasks.json).
flags.DEFINE_integer("mb2po_iterations", None, "MB2PO iterations (paper: 500).")
flags.DEFINE_integer("imagined_steps", None, "Imagined steps per iteration (paper: 1000000).")
flags.DEFINE_integer("updates_per_iteration", None, "AWAC updates per iteration (paper: 1000).")
flags.DEFINE_integer("num_slots", None, "Iterations kept in the model ring (paper: 100).")
flags.DEFINE_float("omega", None, "Fraction of each batch from the offline data (paper preset 0.05, "
                   "smoke/cpu 0.5).")
flags.DEFINE_integer("horizon", None, "Rollout horizon h (default: per task, MOPO's table).")
flags.DEFINE_float("penalty_coef", None, "Uncertainty penalty lambda (default: per task, MOPO's table); refused "
                   "while --penalty_share > 0 (the smoke/cpu presets: add --penalty_share=0 to use it, and "
                   "--max_penalty_share=0 so that their cap does not lower it).")
flags.DEFINE_float("max_penalty_share", None, "Cap on lambda (smoke/cpu presets 0.5; paper preset 0 = "
                   "off): lambda is lowered per seed so that lambda * mean u on the dataset's own pairs is at "
                   "most this share of the data's mean |r| (rollout.capped_penalty_coef; DESIGN.md).")
flags.DEFINE_float("penalty_share", None, "When > 0 (smoke/cpu presets 0.5; paper preset 0), lambda is set per "
                   "seed so that lambda * mean u on the dataset's own pairs is this share of the data's mean |r|, "
                   "in place of --penalty_coef (rollout.capped_penalty_coef; DESIGN.md).")
flags.DEFINE_enum("penalty", None, ["max_std", "max_aleatoric", "ensemble_disagreement"],
                  "Uncertainty u(s,a): the paper's max_std, or MOPO's variants.")
flags.DEFINE_enum("rollout_members", None, ["all", "elites"], "Members a rollout draws its model from "
                  "and takes the penalty's max over: all N (default, the paper's) or the elites (MOPO's).")
flags.DEFINE_enum("buffer_dtype", None, ["float32", "bfloat16"], "Storage dtype of the model ring.")
flags.DEFINE_integer("rollout_chunk_size", None, "Trajectories per rollout chunk (default: by backend).")
flags.DEFINE_integer("mb2po_eval_every", None, "Evaluate every this many MB2PO iterations.")
flags.DEFINE_integer("cpu_devices", None, "XLA host devices a CPU run uses (single process; same numbers): "
                     "several seeds, a multiple of it, are split over them; otherwise each MB2PO rollout is, "
                     "and the rest stays on the first. Default: 2 on a CPU with 2+ cores when --stages has "
                     "mb2po, or awac or online with an even --num_seeds; else 1. Ignored on accelerators unless given.")
flags.DEFINE_integer("mb2po_checkpoint_every", None, "Checkpoint (ring included) every this many iterations.")
# Online fine-tuning (defaults in online.OnlineConfig).
flags.DEFINE_integer("online_steps", None, "Environment steps of the online stage per seed, over its "
                     "--online_envs environments (default 250000).")
flags.DEFINE_integer("online_envs", None, "Environments each seed acts in, side by side (default 1).")
flags.DEFINE_float("online_ratio", None, "Fraction of each AWAC batch from the online buffer, the rest from "
                   "the offline data (default 0.5, as RLPD; 0 and 1 allowed).")
flags.DEFINE_integer("utd", None, "AWAC updates per environment step (default 1).")
flags.DEFINE_integer("online_buffer_size", None, "Online replay ring capacity per seed (transitions).")
flags.DEFINE_integer("online_warmup_steps", None, "Anti-collapse option (b): environment steps of the "
                     "pretrained policy stored in the online buffer before any update (default 0).")
flags.DEFINE_float("online_ratio_start", None, "Anti-collapse option (c): the online ratio at step 0 when "
                   "--online_ratio_anneal_steps > 0, annealed linearly to --online_ratio (default 0).")
flags.DEFINE_integer("online_ratio_anneal_steps", None, "Anti-collapse option (c): environment steps over which "
                     "the online ratio goes from --online_ratio_start to --online_ratio (default 0: off).")
flags.DEFINE_boolean("online_model", None, "MB2PO arm of the online stage: every --online_steps_per_call "
                     "environment steps, --imagined_steps imagined steps (--horizon, MB2PO's lambda) from online "
                     "states into a ring of --num_slots; needs a finished dynamics stage (default off).")
flags.DEFINE_float("model_ratio", None, "With --online_model: fraction of each AWAC batch from the model ring "
                   "(default 0.25; --online_ratio + --model_ratio <= 1, the rest is offline data).")
flags.DEFINE_integer("model_refit_every", None, "With --online_model: environment steps between refits of the "
                     "ensembles on offline + online data (default 10000).")
flags.DEFINE_integer("model_refit_epochs", None, "With --online_model: dynamics epochs per refit (default 5).")
flags.DEFINE_integer("online_steps_per_call", None, "Environment steps per host call of the online stage "
                     "(one log line each).")
flags.DEFINE_integer("online_eval_every", None, "Evaluate every this many online environment steps.")
flags.DEFINE_integer("online_checkpoint_every", None, "Checkpoint (online buffer and environments included) "
                     "every this many online environment steps.")
flags.DEFINE_enum("restart_from", None, list(config_lib.STAGES), "Delete the checkpoints, results and metrics "
                  "of this stage and of the stages after it, then run: what extending a stage whose later "
                  "stages have already run requires (e.g. --awac_steps=N --restart_from=mb2po).")
# Several processes (multi-host): jax.distributed.initialize before anything else.
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator, the same on every "
                    "process (default: $JAX_COORDINATOR_ADDRESS with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.DEFINE_boolean("distributed", False, "Initialise jax.distributed, detecting values not given by "
                     "flags from the cluster environment (SLURM, Open MPI, Cloud TPU, Kubernetes).")
flags.DEFINE_string("task_config", None, "JSON table of per-task horizon/penalty_coef "
                    "(default: the package's mb2po_jax/configs/tasks.json).")
flags.DEFINE_boolean("print_config", False, "Print the resolved configuration (preset + task table + flags), "
                     "the dataset and the env id it is evaluated in as JSON, and exit: no data loaded.")


LIST_FLAGS = {"actor_hidden_dims": int, "critic_hidden_dims": int, "dynamics_hidden_dims": int,
              "dynamics_weight_decay": float}  # comma-separated lists, and the type of their items


def _overrides() -> dict:
    """Every configuration flag's value by flag name (None: not given, the preset or default applies);
    the flags are those the config tables name (`config.field_defaults`)."""
    values = {name: getattr(FLAGS, name) for name in config_lib.field_defaults() if name not in LIST_FLAGS}
    for name, kind in LIST_FLAGS.items():
        if getattr(FLAGS, name) is not None:
            try:
                values[name] = tuple(kind(w) for w in getattr(FLAGS, name))
            except ValueError:
                raise ConfigError(f"--{name}={','.join(getattr(FLAGS, name))} is not a comma-separated list "
                                  f"of {'integers' if kind is int else 'numbers'}") from None
    values["seed"] = FLAGS.seed
    values["stages"] = tuple(FLAGS.stages)
    return values


def _print_config(dataset: str, task: dict, config: config_lib.RunConfig) -> int:
    from mb2po_jax.data.loader import dataset_env_id

    env_id = dataset_env_id(dataset, FLAGS.env)
    print(json.dumps({"dataset": dataset, "env": env_id, "env_id": env_id, "preset": FLAGS.preset,
                      "task": task, "config": config_lib.to_dict(config)}, indent=2))
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # orbax logs every save at INFO through absl; keep the terminal for progress (--verbosity=0 shows it).
        logging.set_verbosity(logging.WARNING)
    from mb2po_jax import sharding

    try:  # config first: the host device count depends on it, and is fixed before any JAX call
        dataset_name = FLAGS.dataset
        from mb2po_jax.data import DEFAULT_DATASET

        task = config_lib.task_defaults(dataset_name or DEFAULT_DATASET, FLAGS.task_config)
        config = config_lib.make_config(FLAGS.preset, _overrides(), task)
        if FLAGS["penalty_coef"].present and config.mb2po.penalty_share > 0:
            # A lambda given by hand would be silently replaced by the share rule's (rollout.capped_penalty_coef).
            source = "as given" if FLAGS["penalty_share"].present else f"the {FLAGS.preset} preset's rule"
            raise ConfigError(f"--penalty_coef={FLAGS.penalty_coef} would not be used: --penalty_share="
                              f"{config.mb2po.penalty_share} ({source}; DESIGN.md) sets lambda from the data; "
                              "add --penalty_share=0 to set lambda by hand (and --max_penalty_share=0 so that no "
                              "cap lowers it)")
        if FLAGS.print_config:  # before any JAX device is set up or touched
            return _print_config(dataset_name or DEFAULT_DATASET, task, config)
        several_processes = bool(FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.distributed)
        cpu_devices = FLAGS.cpu_devices
        if cpu_devices is None:
            cpu_devices = 1 if several_processes else sharding.auto_cpu_devices(config.num_seeds, config.stages)
        if cpu_devices > 1:
            sharding.request_cpu_devices(cpu_devices)
        sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                      auto=FLAGS.distributed)
    except Mb2poError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from mb2po_jax import pipeline  # heavy imports after flag parsing, so --help is fast

    try:
        workdir = FLAGS.workdir or config_lib.default_workdir(dataset_name or "default", FLAGS.preset, config,
                                                              task, FLAGS.env)
        layout = sharding.cpu_layout(config.num_seeds, cpu_devices, strict=FLAGS.cpu_devices is not None)
        run = pipeline.Run(workdir, dataset_name, FLAGS.env, config, preset=FLAGS.preset, layout=layout,
                           restart_from=FLAGS.restart_from)
        results = run()
    except pipeline.Stopped as stopped:
        print(stopped, file=sys.stderr)
        return 0
    except Mb2poError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not run.is_chief:  # process 0 prints the summary
        return 0
    summary = {stage: {k: v for k, v in r.items() if k in ("return", "normalized_score")}
               for stage, r in results["final"].items()}
    print(json.dumps({"workdir": run.workdir, "final": summary}))
    return 0


# `-h/--help`: this program's flags only, by stage. Flags of this module not named here print under "other".
HELP_GROUPS = {
    "data and run": ["dataset", "env", "workdir", "preset", "stages", "seed", "num_seeds", "task_config",
                     "print_config", "restart_from"],
    "AWAC": ["awac_steps", "steps_per_call", "batch_size", "actor_lr", "critic_lr", "gamma", "tau", "temperature",
             "max_weight", "num_components", "actor_hidden_dims", "critic_hidden_dims", "normalize_observations",
             "critic", "num_quantiles", "value_transform", "value_transform_eps"],
    "dynamics": ["dynamics_steps", "dynamics_early_stopping", "num_members", "num_elites", "dynamics_hidden_dims",
                 "dynamics_weight_decay", "dynamics_lr", "dynamics_batch_size", "holdout_fraction", "max_holdout",
                 "max_epochs_since_improvement"],
    "MB2PO": ["mb2po_iterations", "imagined_steps", "updates_per_iteration", "num_slots", "omega", "horizon",
              "penalty_coef", "max_penalty_share", "penalty_share", "penalty", "rollout_members", "buffer_dtype",
              "rollout_chunk_size"],
    "online": ["online_steps", "online_envs", "online_ratio", "utd", "online_buffer_size", "online_warmup_steps",
               "online_ratio_start", "online_ratio_anneal_steps", "online_model", "model_ratio", "model_refit_every",
               "model_refit_epochs", "online_steps_per_call"],
    "evaluation and checkpoints": ["eval_every", "eval_episodes", "final_eval_episodes", "max_episode_steps",
                                   "checkpoint_every", "mb2po_eval_every", "mb2po_checkpoint_every",
                                   "online_eval_every", "online_checkpoint_every"],
    "devices and hosts": ["cpu_devices", "coordinator_address", "num_processes", "process_id", "distributed"],
}


def _value_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def help_text() -> str:
    """The grouped help: each flag with its help, its default (the dataclass default where the flag's own
    default is "take it from the preset") and what each preset sets."""
    defaults = config_lib.field_defaults()
    ours = [name for name in FLAGS if name not in _LIBRARY_FLAGS and FLAGS[name].name == name]
    listed = {name for names in HELP_GROUPS.values() for name in names}
    groups = {**HELP_GROUPS, "other": sorted(set(ours) - listed)}
    lines = ["usage: mb2po-train [--flag=value ...]   (-h/--help: this list; --helpfull: every library's "
             "flags; --flagfile=FILE: flags from a file, one per line)", ""]
    for group, names in groups.items():
        names = [n for n in names if n in ours]
        if not names:
            continue
        lines.append(f"{group}:")
        for name in names:
            flag = FLAGS[name]
            default = flag.default if flag.default is not None else defaults.get(name)
            lines.append(f"  --{name}" + (f" (default: {_value_text(default)})" if default is not None else ""))
            lines.append(f"      {flag.help}")
            presets = [f"{preset}={_value_text(values[name])}" for preset, values in config_lib.PRESETS.items()
                       if name in values]
            if presets:
                lines.append(f"      presets: {', '.join(presets)}")
        lines.append("")
    return "\n".join(lines)


def run():
    if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in sys.argv[1:]):
        FLAGS.mark_as_parsed()  # reading defaults needs no command line
        print(help_text())
        sys.exit(0)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()

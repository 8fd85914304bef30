"""`mb2po-data`: validate, inspect and generate datasets.

    mb2po-data validate PATH|NAME [--env ID]          one summary line, exit 0; or one error line, exit 1
    mb2po-data info PATH|NAME [--env ID] [--json]
    mb2po-data generate --env hopper --kind random|uniform|medium|medium-replay|expert|medium-expert
                        [--size N] [--seed S] [--out PATH] [--force]
    mb2po-data train-behavior --env hopper --workdir W [--total_steps N] [--seed S]
    mb2po-data export-behavior W --out DIR [--replay_every N]

The SAC-based kinds are rollouts of one online SAC run's policies (`mb2po_jax.behavior`):
`train-behavior` trains them (resumable: run it again to continue), `export-behavior` writes the small
assets that `generate` reads from $MB2PO_BEHAVIOR_DIR/<env>/ or the shipped mb2po_jax/behavior/assets/<env>/.
This command line is the one entry point to the behaviour tooling, so it imports `mb2po_jax.behavior` (which
imports `mb2po_jax.data`, never the other way round).

Bad input never shows a traceback: the problem is printed as one line `error: ...` on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

from mb2po_jax import behavior
from mb2po_jax.behavior import generation
from mb2po_jax.data import registry
from mb2po_jax.data.loader import load_dataset
from mb2po_jax.errors import ConfigError, DataError, Mb2poError


def _summary(ds) -> str:
    dropped = ds.num_rows - ds.num_transitions
    extra = f" ({dropped} rows without a known next state dropped)" if dropped else ""
    return (
        f"{ds.name}: {ds.num_transitions} transitions{extra}, {ds.num_episodes} episodes, "
        f"obs_dim {ds.obs_dim}, act_dim {ds.act_dim}, env {ds.env_id}"
    )


def _cmd_validate(args) -> int:
    ds = load_dataset(args.dataset, args.env, validate=True)
    print(f"ok {_summary(ds)}")
    return 0


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _cmd_info(args) -> int:
    validation_error = None
    try:
        ds = load_dataset(args.dataset, args.env, validate=True)
    except DataError as e:
        # Show what can be shown of a file that fails the value/environment checks; structural problems
        # (and missing files) make this load fail too, and the error propagates.
        validation_error = str(e)
        ds = load_dataset(args.dataset, args.env, validate=False)
    returns = ds.episode_returns
    normalized = registry.normalized_score(ds.env_id, returns)
    size_bytes = None
    if os.path.isfile(ds.path):
        size_bytes = os.path.getsize(ds.path)
    info = {
        "name": ds.name,
        "path": ds.path,
        "env": ds.env_id,
        "env_id": ds.env_id,
        "transitions": ds.num_transitions,
        "rows": ds.num_rows,
        "episodes": ds.num_episodes,
        "obs_dim": ds.obs_dim,
        "act_dim": ds.act_dim,
        "terminals": int(ds.transitions.terminals.sum()),
        "file_bytes": size_bytes,
        "return_mean": _finite_or_none(float(np.mean(returns))),
        "return_min": _finite_or_none(float(np.min(returns))),
        "return_max": _finite_or_none(float(np.max(returns))),
        "normalized_return_mean": _finite_or_none(float(np.mean(normalized))),
        "normalized_return_min": _finite_or_none(float(np.min(normalized))),
        "normalized_return_max": _finite_or_none(float(np.max(normalized))),
        "valid": validation_error is None,
        "validation_error": validation_error,
        "metadata": {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in ds.metadata.items()},
    }
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        lines = [
            f"dataset      {info['name']}",
            f"path         {info['path']}" + (f" ({size_bytes / 2**20:.1f} MiB)" if size_bytes else ""),
            f"env          {info['env']} (obs_dim {info['obs_dim']}, act_dim {info['act_dim']})",
            f"transitions  {info['transitions']} of {info['rows']} rows, {info['terminals']} terminal",
            f"episodes     {info['episodes']} (lengths {int(ds.episode_lengths.min())}..."
            f"{int(ds.episode_lengths.max())}, last one may be partial)",
            f"return       mean {returns.mean():.2f}, min {returns.min():.2f}, max {returns.max():.2f}",
        ]
        if info["normalized_return_mean"] is not None:
            lines.append(
                f"normalized   mean {info['normalized_return_mean']:.1f}, min {info['normalized_return_min']:.1f}, "
                f"max {info['normalized_return_max']:.1f} (D4RL reference scores)"
            )
        elif registry.has_reference_score(ds.env_id):
            # Hopper etc. have a reference score: n/a here means the returns are NaN or infinite (a file
            # that fails validation), which must not read as a missing reference score.
            lines.append("normalized   n/a (returns are not finite)")
        else:
            lines.append("normalized   n/a (no D4RL reference score for this environment)")
        lines.append("validation   ok" if validation_error is None else f"validation   FAILED: {validation_error}")
        for key, value in sorted(info["metadata"].items()):
            lines.append(f"metadata     {key} = {value}")
        print("\n".join(lines))
    if validation_error is not None:
        print(f"error: {validation_error}", file=sys.stderr)
        return 1
    return 0


def _cmd_generate(args) -> int:
    local = registry.local_name_for(args.env, args.kind)
    target = args.out or local.path
    if os.path.exists(target) and not args.force:
        raise DataError(f"{target} already exists; pass --force to regenerate it")
    path = generation.generate(args.env, args.kind, size=args.size, seed=args.seed, path=args.out)
    ds = load_dataset(path, validate=True)
    if args.out is None:  # name it as users pass it to --dataset ("hopper-random-local"), not by file stem
        ds = dataclasses.replace(ds, name=local.name)
    print(f"wrote {path}: {_summary(ds)}")
    return 0


def _cmd_train_behavior(args) -> int:
    env_id = registry.env_id_for(args.env)
    saved = behavior.read_run_settings(args.workdir)  # resuming: the run's own settings, not flag defaults
    _, seed, config = saved or (env_id, 0, behavior.BehaviorConfig())
    seed = seed if args.seed is None else args.seed  # another seed is another run: train_behavior refuses it
    if args.total_steps is not None:
        config = dataclasses.replace(config, total_steps=args.total_steps)
    what = "resuming" if saved else "starting"
    print(f"mb2po-data: {what} SAC on {env_id} in {args.workdir} ({config.total_steps} env steps, seed {seed})",
          file=sys.stderr, flush=True)
    try:
        out = behavior.train_behavior(args.env, args.workdir, seed=seed, config=config)
    except ValueError as e:  # another run's workdir, settings that do not fit together
        raise ConfigError(str(e)) from e
    last = out["last_eval"] or {}
    line = (f"trained SAC on {env_id} to step {out['step']} in {args.workdir}: last evaluation return "
            f"{_number(last.get('return'))} (normalized {_number(last.get('normalized_score'))})")
    chosen = os.path.join(args.workdir, "behavior.json")
    if os.path.isfile(chosen):
        with open(chosen, encoding="utf-8") as f:
            summary = json.load(f)
        medium = summary["medium"]
        line += f"; expert step {summary['expert']['step']}, " + (
            f"medium step {medium['step']}; next: mb2po-data export-behavior {args.workdir} --out "
            f"{behavior.behavior_asset_dir(env_id)}"
            if medium else "no medium policy (no evaluation near a third of the expert's return)")
    print(line)
    return 0


def _number(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _cmd_export_behavior(args) -> int:
    if not os.path.isfile(os.path.join(args.workdir, "run.json")):
        raise DataError(f"{args.workdir}: no behaviour run there (no run.json); train one with "
                        f"`mb2po-data train-behavior --env ENV --workdir {args.workdir}`")
    try:
        m = behavior.export_assets(args.workdir, args.out, replay_every=args.replay_every)
    except ValueError as e:  # no evaluations yet, no medium policy, no warm-up snapshot
        raise DataError(str(e)) from e
    mr = m["medium_replay"]
    policies = ", ".join(f"{kind} step {m[kind]['step']} return {_number(m[kind]['return'])} (normalized "
                         f"{_number(m[kind]['normalized_score'])})" for kind in ("expert", "medium"))
    print(f"wrote {args.out}: {m['env_id']} SAC seed {m['seed']}: {policies}; medium-replay "
          f"{mr['transitions']} transitions ({mr['random_steps']} random, then {len(mr['snapshots'])} actors); "
          f"{_use_assets_hint(args.out, m['env_id'])}")
    return 0


def _use_assets_hint(out: str, env_id: str) -> str:
    """How `generate` finds assets written to `out`: it looks in <root>/<env>/ only."""
    env = registry.env_key(env_id) or env_id
    out = os.path.abspath(out)
    command = f"mb2po-data generate --env {env} --kind medium"
    if out == os.path.join(behavior.PACKAGE_BEHAVIOR_DIR, env):
        return f"generate with `{command}`"
    if os.path.basename(out) == env:
        return f"generate with `{behavior.BEHAVIOR_DIR_VAR}={os.path.dirname(out)} {command}`"
    return f"generate looks in ${behavior.BEHAVIOR_DIR_VAR}/{env}/: move or link the directory there"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mb2po-data", description="Validate, inspect and generate datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    dataset_help = "an .hdf5 file, a D4RL name (hopper-medium-replay-v2), a local name, or a Minari id"
    env_help = "Gymnasium environment id (default: from the file's metadata or the dataset name)"

    p = sub.add_parser("validate", help="check a dataset; one summary line, exit 0, or one error line, exit 1")
    p.add_argument("dataset", help=dataset_help)
    p.add_argument("--env", default=None, help=env_help)
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("info", help="size, episodes, returns and validation status")
    p.add_argument("dataset", help=dataset_help)
    p.add_argument("--env", default=None, help=env_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("generate", help="make a D4RL-style dataset in the real environment")
    p.add_argument("--env", required=True, help="hopper, halfcheetah, walker2d, or any Gymnasium id")
    kinds = [k for k in registry.LOCAL_KINDS if k in generation.GENERATORS]
    p.add_argument("--kind", required=True, choices=kinds,
                   help="random: the behaviour SAC actor at initialisation (D4RL's randomly initialised policy); "
                        "uniform: uniform random actions; medium, expert: the behaviour SAC run's medium / expert "
                        "policy; medium-replay: its policies up to medium, as its replay buffer held them; "
                        "medium-expert: medium rows then expert rows. All but random and uniform need "
                        "behaviour-policy assets (see train-behavior, export-behavior)")
    p.add_argument("--size", type=int, default=None,
                   help="transitions (default: D4RL's: 1,000,000; medium-expert 2,000,000, half each; "
                        "medium-replay all of the run's steps up to the medium policy, the most it can have)")
    p.add_argument("--seed", type=int, default=generation.DEFAULT_SEED)
    p.add_argument("--out", default=None, help="output file (default: the local name's file in "
                                                "$MB2PO_DATA_DIR or ~/.cache/mb2po_jax/datasets)")
    p.add_argument("--force", action="store_true",
                   help="overwrite the output file if it exists (default: refuse, keeping the cached dataset)")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("train-behavior", help="train the behaviour policies: online SAC, resumable (hours)")
    p.add_argument("--env", required=True, help="hopper, halfcheetah, walker2d, or a Gymnasium id")
    p.add_argument("--workdir", required=True, help="run directory; the same command again resumes it")
    p.add_argument("--total_steps", type=int, default=None,
                   help="environment steps (default: the run's own when resuming, else 1,000,000)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's own when resuming, else 0")
    p.set_defaults(fn=_cmd_train_behavior)

    p = sub.add_parser("export-behavior", help="write a trained run's expert, medium and medium-replay actors "
                                                "as the assets `generate` reads")
    p.add_argument("workdir", help="a train-behavior run directory")
    p.add_argument("--out", required=True, help="asset directory, named after the env: $MB2PO_BEHAVIOR_DIR/hopper")
    p.add_argument("--replay_every", type=int, default=10_000,
                   help="env steps between the medium-replay actors (each one ~140 KB)")
    p.set_defaults(fn=_cmd_export_behavior)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (argparse usage errors exit 2 through SystemExit)."""
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except Mb2poError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permission denied while writing
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())

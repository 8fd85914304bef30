"""Expand a sweep spec (tasks x seeds x hyperparameters) into independent `mb2po-train` commands.

    python experiments/sweep.py SPEC.json print              # one shell-quoted command per line
    python experiments/sweep.py SPEC.json list-workdirs      # one workdir per line
    python experiments/sweep.py SPEC.json array --out job.sh # bash job-array script (Slurm or plain loop)

Why separate commands rather than one multi-run program: each combination is a plain `mb2po-train` run
that owns its workdir, so a killed or preempted job is resumed by rerunning the same command, a failed
one can be rerun alone, and any scheduler (Slurm arrays, xargs -P, a for loop) can run them. Workdir
names are derived deterministically from the swept values so that rerunning the sweep finds its runs.

Spec (JSON, or a Python literal such as a dict with True/None):
    {"name": "hopper-mr",                                  # required: the sweep's folder under the root
     "base": {"preset": "cpu", "stages": "awac,dynamics"}, # optional: flags shared by every run
     "grid": {"dataset": [...], "seed": [0, 1, 2]},        # required: flag -> list of values (product)
     "workdir_root": "runs/sweeps"}                        # optional, default runs/sweeps

The executable is `mb2po-train`, or the words of $MB2PO_TRAIN (split on whitespace) when that is set,
both when printing and when the generated array script runs.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import re
import shlex
import sys

DEFAULT_ROOT = "runs/sweeps"
KEYS = {"name", "base", "grid", "workdir_root"}
TRAIN_ENV = "MB2PO_TRAIN"


class SpecError(Exception):
    """A problem with the spec file; main() prints it as one line naming the file."""


def load_spec(path: str) -> dict:
    """Read and validate a spec, so that every later step can trust its shape."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror or e}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        try:  # Python literals allow comments, True/None and trailing commas
            spec = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise SpecError(f"invalid JSON (line {e.lineno} column {e.colno}: {e.msg}) "
                            "and not a Python literal either") from None
    if not isinstance(spec, dict):
        raise SpecError(f"the spec must be an object/dict, got {type(spec).__name__}")
    unknown = sorted(set(map(str, spec)) - KEYS)
    if unknown:
        raise SpecError(f"unknown top-level key(s) {unknown}; allowed: {sorted(KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or name in ("", ".", "..") or _safe(name) != name:
        raise SpecError(f"'name' must be a non-empty string of [A-Za-z0-9._,=+-], got {name!r}")
    root = spec.get("workdir_root", DEFAULT_ROOT)
    if not isinstance(root, str) or not root:
        raise SpecError(f"'workdir_root' must be a non-empty string, got {root!r}")
    base, grid = spec.get("base", {}), spec.get("grid")
    if not isinstance(base, dict):
        raise SpecError(f"'base' must be an object of flag: value, got {type(base).__name__}")
    if not isinstance(grid, dict) or not grid:
        raise SpecError("'grid' is required: a non-empty object of flag: [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid value for {key!r} must be a non-empty list, got {values!r}")
        for v in values:
            _check_value(key, v)
    for key, v in base.items():
        _check_value(key, v)
    for key in [*grid, *base]:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpecError(f"flag name {key!r} is not a valid flag name")
    if "workdir" in grid or "workdir" in base:
        raise SpecError("'workdir' is set by the sweep (workdir_root/name/...); remove it")
    both = sorted(set(grid) & set(base))
    if both:
        raise SpecError(f"flag(s) {both} appear in both 'base' and 'grid'")
    return {"name": name, "base": base, "grid": grid, "workdir_root": root}


def _check_value(key, value) -> None:
    ok = (str, int, float, bool)
    if not (isinstance(value, ok) or (isinstance(value, list) and all(isinstance(v, ok) for v in value))):
        raise SpecError(f"value {value!r} for {key!r} must be a string, number, bool or list of them")


def flag_value(value) -> str:
    """How a value is written on the command line: absl booleans as true/false, lists comma-joined."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(flag_value(v) for v in value)
    return str(value)


def _safe(text: str) -> str:
    """Filesystem-safe path component: '/' (and anything else outside a small safe set) becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)


def expand(spec: dict) -> list[dict]:
    """Every grid combination, in grid order (the first key varies slowest): its flags and workdir.

    The workdir is <root>/<name>/<part>__<part>..., one part per grid key: the value alone for `dataset`
    (the most readable name of a run), key+value for the others (seed0, penalty_coef0.5)."""
    runs, seen = [], {}
    keys = list(spec["grid"])
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        parts = [_safe(flag_value(v)) if k == "dataset" else _safe(f"{k}{flag_value(v)}")
                 for k, v in zip(keys, values)]
        leaf = "__".join(parts)
        if leaf.startswith("."):  # never '.', '..' or a hidden folder
            leaf = "_" + leaf[1:]
        workdir = os.path.join(spec["workdir_root"], spec["name"], leaf)
        flags = {**dict(zip(keys, values)), **spec["base"]}
        if workdir in seen:
            raise SpecError(f"combinations {seen[workdir]} and {flags} map to the same workdir {workdir}")
        seen[workdir] = flags
        runs.append({"flags": flags, "workdir": workdir})
    return runs


def train_args(run: dict) -> list[str]:
    """The flags of one run, grid keys first, then base, then --workdir (without the executable)."""
    return [f"--{k}={flag_value(v)}" for k, v in run["flags"].items()] + [f"--workdir={run['workdir']}"]


def train_executable() -> list[str]:
    return os.environ.get(TRAIN_ENV, "mb2po-train").split() or ["mb2po-train"]


def array_script(runs: list[dict], spec_path: str, name: str) -> str:
    """A bash script that runs command number $SLURM_ARRAY_TASK_ID, $TASK_ID or $1.

    The #SBATCH lines make `sbatch job.sh` submit the whole array; `exec` hands the task's exit status
    (and SIGTERM from the scheduler, which mb2po-train turns into a checkpoint) to the run itself."""
    n = len(runs)
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{n - 1}",
        f"# Generated by experiments/sweep.py from {spec_path}: {n} tasks, numbered 0-{n - 1}.",
        "# Run task i with: sbatch job.sh | TASK_ID=i bash job.sh | bash job.sh i",
        f"# Override the executable with {TRAIN_ENV}='python -m mb2po_jax.train' (split on spaces).",
        "set -euo pipefail",
        'TASK="${SLURM_ARRAY_TASK_ID:-${TASK_ID:-${1:-}}}"',
        'if [[ -z "$TASK" ]]; then',
        f'  echo "usage: set SLURM_ARRAY_TASK_ID or TASK_ID, or pass a task number (0-{n - 1})" >&2',
        "  exit 2",
        "fi",
        f'read -r -a TRAIN <<< "${{{TRAIN_ENV}:-mb2po-train}}"',
        'case "$TASK" in',
    ]
    for i, run in enumerate(runs):
        lines.append(f'  {i}) exec "${{TRAIN[@]}}" {shlex.join(train_args(run))} ;;')
    lines += [f'  *) echo "task $TASK is not in 0-{n - 1}" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep spec file (JSON or Python literal)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("print", help="print one shell-quoted mb2po-train command per line")
    sub.add_parser("list-workdirs", help="print one workdir per line")
    array = sub.add_parser("array", help="write a bash job-array script")
    array.add_argument("--out", help="script path (default: stdout)")
    args = parser.parse_args(argv)

    try:
        spec = load_spec(args.spec)
        runs = expand(spec)
    except SpecError as e:
        print(f"error: {args.spec}: {e}", file=sys.stderr)
        return 1
    if args.command == "print":
        exe = train_executable()
        for run in runs:
            print(shlex.join(exe + train_args(run)))
    elif args.command == "list-workdirs":
        for run in runs:
            print(run["workdir"])
    else:
        script = array_script(runs, args.spec, spec["name"])
        if args.out:
            try:
                with open(args.out, "w", encoding="utf-8") as f:
                    f.write(script)
                os.chmod(args.out, 0o755)
            except OSError as e:
                print(f"error: {args.out}: cannot write: {e.strerror or e}", file=sys.stderr)
                return 1
        else:
            sys.stdout.write(script)
        target = args.out or "job.sh"
        print(f"{len(runs)} tasks (0-{len(runs) - 1}): sbatch --array=0-{len(runs) - 1} {target}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

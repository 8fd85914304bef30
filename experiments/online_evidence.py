"""Offline-to-online evidence (issue 22): offline agents fine-tuned in the real environment, beside SAC from
scratch, on the benchmark's workdirs, in two commands.

    python experiments/online_evidence.py run --base_root runs/benchmark --workdir runs/online
    python experiments/online_evidence.py report --workdir runs/online --out results
    python experiments/online_evidence.py report --from results/online_runs --out results   # from the copies

`run`: per dataset (default hopper and walker2d medium-replay, local), the *base* is BASE_ROOT/<dataset>: the
`mb2po-train --stages=awac,dynamics,mb2po --preset=BUDGET --num_seeds=SEEDS --seed=0` workdir that
`experiments/benchmark.py run` makes. A finished base is reused as it is; a missing or unfinished one is
trained (or resumed) first with the benchmark's own command. Each arm but SAC is a branch of the base: a copy
(`shutil.copytree`, made once, without `.lock`) at WORKDIR/<dataset>/<arm>, then one `mb2po-train
--stages=online` command there with the base's flags, `--online_steps` and the arm's own flags:

    awac_online           --restart_from=mb2po (the copy's MB2PO stage is deleted: the online stage continues
                          the AWAC agent; see `needs_restart` for when the flag is passed)
    mb2po_online          (the online stage continues the AWAC+MB2PO agent)
    mb2po_online_model    --online_model
    mb2po_online_warmup   --online_warmup_steps=WARMUP_STEPS                            (option arm, --arms)
    mb2po_online_anneal   --online_ratio_start=ANNEAL_RATIO_START --online_ratio_anneal_steps=ANNEAL_STEPS
                                                                                         (option arm, --arms)
    sac_scratch           `mb2po-data train-behavior --env ENV --workdir WORKDIR/<dataset>/sac_scratch/sac_seed<s>
                          --total_steps ONLINE_STEPS --seed s` per seed: our SAC from scratch, the floor

Every command resumes when rerun, and a finished arm (results.json with final.online and this configuration;
for SAC, a checkpoint at ONLINE_STEPS) is skipped. SIGTERM/SIGINT go to the running command as SIGTERM
(mb2po-train saves a checkpoint and exits; train-behavior stops and resumes from its last checkpoint);
rerun the same command to go on. Progress lines go to stdout and WORKDIR/online_evidence.log.
`$MB2PO_TRAIN` replaces the mb2po-train executable and `$MB2PO_DATA_CLI` the mb2po-data one (split on
whitespace; tests use stand-ins).

`report`: copies each arm's results.json, config.json, online_evidence.json (the commits that ran it) and the
online stage's evaluation lines of metrics.jsonl (evals.jsonl), and for SAC each seed's run.json and
evaluation records, to OUT/online_runs/<dataset>/<arm>/, then writes OUT/online.md from those copies alone
(`report --from OUT/online_runs` regenerates it byte for byte) and one PNG per dataset,
OUT/online_<dataset>.png (normalised score against online environment steps; needs matplotlib: without it,
one error line after the table is written, exit status 1; --no_plots skips the plots). The PNG of a dataset
with no evaluations among the copies is removed, so that an older figure is not left looking current.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time

import benchmark  # experiments/benchmark.py (this script's folder is on sys.path when run as a script)
from benchmark import BenchmarkError, _agrees, _duration, _num, _read_json, _write_json

SEED = 0  # the base's --seed (the benchmark's default): the arms must match the base's identity
DEFAULT_DATASETS = ("hopper-medium-replay-local", "walker2d-medium-replay-local")
BUDGETS = ("smoke", "cpu", "paper")
LOG_FILE = "online_evidence.log"
LAUNCH_FILE = "online_evidence.json"  # written by `run` into each arm's directory: its settings and commits
EVALS_FILE = "evals.jsonl"
CURVE_FILE = "online_{}.png"  # one figure per dataset, beside online.md
RUN_FILE = "run.json"  # train-behavior's settings (env id, seed, BehaviorConfig)
COPIED = ("results.json", "config.json", LAUNCH_FILE, EVALS_FILE, RUN_FILE)
SAC_PREFIX = "sac_seed"
TRAIN_ENV = benchmark.TRAIN_ENV  # MB2PO_TRAIN: replaces mb2po-train
DATA_ENV = "MB2PO_DATA_CLI"  # replaces mb2po-data (train-behavior)
COPYING = ".copying"  # suffix of a copy being made (renamed when complete, so a killed copy is redone)

# The option arms' settings (issue 22 item 4). Choices, not tuned: a warm-up of 5 % and an anneal over 20 %
# of the cpu preset's 100k online steps, from offline data only (ratio 0) to the default --online_ratio.
WARMUP_STEPS = 5_000
ANNEAL_RATIO_START = 0.0
ANNEAL_STEPS = 20_000


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    label: str  # table row and legend
    source: str | None  # the agent the online stage continues ("awac", "mb2po"); None: SAC from scratch
    flags: tuple[tuple[str, object], ...] = ()  # mb2po-train flags beyond the common ones

    def flag_args(self) -> list[str]:
        return [f"--{k}" if v is True else f"--{k}={v}" for k, v in self.flags]


ARMS = {arm.name: arm for arm in (  # the table's row order
    Arm("awac_online", "AWAC -> online", "awac"),
    Arm("mb2po_online", "AWAC+MB2PO -> online", "mb2po"),
    Arm("mb2po_online_model", "AWAC+MB2PO -> online, --online_model", "mb2po", (("online_model", True),)),
    Arm("mb2po_online_warmup", f"AWAC+MB2PO -> online, warm-up {WARMUP_STEPS:,} steps", "mb2po",
        (("online_warmup_steps", WARMUP_STEPS),)),
    Arm("mb2po_online_anneal", f"AWAC+MB2PO -> online, ratio annealed from {ANNEAL_RATIO_START} over "
        f"{ANNEAL_STEPS:,} steps", "mb2po",
        (("online_ratio_start", ANNEAL_RATIO_START), ("online_ratio_anneal_steps", ANNEAL_STEPS))),
    Arm("sac_scratch", "SAC from scratch", None),
)}
DEFAULT_ARMS = ("awac_online", "mb2po_online", "mb2po_online_model", "sac_scratch")
OPTION_ARMS = ("mb2po_online_warmup", "mb2po_online_anneal")


def _has_steps(directory: str) -> bool:
    """Whether a checkpoint directory holds a step (as pipeline._has_steps: a directory named by digits)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _latest_step(directory: str) -> int | None:
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


# ------------------------------------------------------------------------------------------------- run
def datasets_for(args) -> list[str]:
    names = [n for n in args.datasets.split(",") if n]
    bad = [n for n in names if benchmark.parse_name(n) is None]
    if bad or not names:
        raise BenchmarkError(f"--datasets: {', '.join(bad) or 'empty'}: not <env>-<kind>-local with env one of "
                             f"{', '.join(benchmark.ENVS)} and kind one of {', '.join(benchmark.KINDS)}")
    return list(dict.fromkeys(names))


def arms_for(args) -> list[str]:
    names = [n for n in args.arms.split(",") if n]
    bad = [n for n in names if n not in ARMS]
    if bad or not names:
        raise BenchmarkError(f"--arms: {', '.join(bad) or 'empty'}; choose from {', '.join(ARMS)}")
    chosen = set(names)
    return [n for n in ARMS if n in chosen]  # the table's order


def data_executable() -> list[str]:
    return os.environ.get(DATA_ENV, "").split() or [sys.executable, "-m", "mb2po_jax.data.cli"]


def base_namespace(args) -> argparse.Namespace:
    """benchmark.py's arguments for the base run: its command, finished check and launch record."""
    return argparse.Namespace(budget=args.budget, seeds=args.seeds, seed=SEED, workdir=args.base_root)


def arm_dir(args, dataset: str, arm: str) -> str:
    return os.path.join(args.workdir, dataset, arm)


def sac_dir(args, dataset: str, seed: int) -> str:
    return os.path.join(arm_dir(args, dataset, "sac_scratch"), f"{SAC_PREFIX}{seed}")


def needs_restart(workdir: str) -> bool:
    """The awac_online rule: pass --restart_from=mb2po as long as the copy has no online checkpoint. Until
    then the restart deletes only what must go (the MB2PO stage's checkpoints, results.json entry and metrics
    records, and an online attempt killed before its first checkpoint), so passing it again after a kill
    loses nothing; once the online stage has a checkpoint it is never passed, and the stage resumes. (Keying
    it on "the copy still holds checkpoints/mb2po" would not redo the rest of a restart killed half-way,
    and the copy leaves checkpoints/mb2po out anyway.) A copy with both stages' checkpoints is refused."""
    ckpt = os.path.join(workdir, "checkpoints")
    online_started = _has_steps(os.path.join(ckpt, "online"))
    if online_started and _has_steps(os.path.join(ckpt, "mb2po")):
        raise BenchmarkError(f"{workdir}: the awac_online branch holds both an MB2PO and an online checkpoint, "
                             "so its online stage may have continued the MB2PO agent; delete the branch and "
                             "rerun")
    return not online_started


def arm_command(dataset: str, arm: Arm, args, restart: bool) -> list[str]:
    return (benchmark.train_executable()
            + [f"--dataset={dataset}", "--stages=online", f"--preset={args.budget}", f"--num_seeds={args.seeds}",
               f"--seed={SEED}", f"--online_steps={args.online_steps}", *arm.flag_args(),
               *(["--restart_from=mb2po"] if restart else []), f"--workdir={arm_dir(args, dataset, arm.name)}"])


def sac_command(dataset: str, seed: int, args) -> list[str]:
    env, _ = benchmark.parse_name(dataset)
    return data_executable() + ["train-behavior", "--env", env, "--workdir", sac_dir(args, dataset, seed),
                                "--total_steps", str(args.online_steps), "--seed", str(seed)]


def expected_config(dataset: str, arm: Arm, args) -> dict:
    """The configuration mb2po-train resolves for the arm's command (JSON view, as results.json has it)."""
    from mb2po_jax import config as config_lib

    overrides = {"num_seeds": args.seeds, "seed": SEED, "stages": ("online",), "online_steps": args.online_steps,
                 **dict(arm.flags)}
    cfg = config_lib.make_config(args.budget, overrides, config_lib.task_defaults(dataset))
    return json.loads(json.dumps(config_lib.to_dict(cfg)))


def arm_finished(dataset: str, arm: Arm, args) -> bool:
    """True when the arm's results.json has final.online for the configuration this run asks for (and, for
    awac_online, no MB2PO stage: its online stage continued the AWAC agent)."""
    from mb2po_jax import config as config_lib

    results = _read_json(os.path.join(arm_dir(args, dataset, arm.name), "results.json"))
    final = (results or {}).get("final", {})
    if "online" not in final or (arm.source == "awac" and "mb2po" in final):
        return False
    recorded = config_lib.with_added_fields(results.get("config"))
    return (results.get("dataset") == dataset and results.get("preset") == args.budget
            and _agrees(recorded, expected_config(dataset, arm, args)))


def sac_finished(dataset: str, seed: int, args) -> bool:
    """True when the seed's train-behavior run has a checkpoint at --online_steps (its last one)."""
    step = _latest_step(os.path.join(sac_dir(args, dataset, seed), "checkpoints"))
    return step is not None and step >= args.online_steps


def branch(base: str, target: str, arm: Arm) -> None:
    """Copy the base workdir to `target` (without .lock; awac_online without checkpoints/mb2po, which its
    restart deletes), through a temporary name renamed when complete."""
    tmp = target + COPYING
    shutil.rmtree(tmp, ignore_errors=True)
    skip_mb2po = arm.source == "awac"

    def ignore(directory, names):  # copytree calls it with `base` and os.path.join()s of it
        out = {".lock"} if directory == base else set()
        if skip_mb2po and directory == os.path.join(base, "checkpoints"):
            out.add("mb2po")
        return out & set(names)

    shutil.copytree(base, tmp, symlinks=True, ignore=ignore)
    os.replace(tmp, target)


def record_launch(path: str, dataset: str, arm: str, args) -> None:
    """Add this launch (commit and settings) to the arm's online_evidence.json, as benchmark.json does."""
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, LAUNCH_FILE)
    launches = list((_read_json(file) or {}).get("launches", []))
    launch = {"commit": benchmark.git_commit(), "budget": args.budget, "seeds": args.seeds, "seed": SEED,
              "online_steps": args.online_steps, "flags": ARMS[arm].flag_args()}
    if launch not in launches:
        launches.append(launch)
    _write_json(file, {"dataset": dataset, "arm": arm, "launches": launches})


class Log(benchmark.Log):
    """benchmark.py's progress lines, into WORKDIR/online_evidence.log."""

    def __init__(self, workdir: str, enabled: bool):
        super().__init__(workdir, enabled)
        self.path = os.path.join(workdir, LOG_FILE) if enabled else None


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _online_line(results: dict) -> str:
    online = results["final"]["online"]
    seeds = len(online.get("normalized_score", []))
    return (f"start {_mean(online.get('start_score', [])):.1f} -> final {_mean(online['normalized_score']):.1f}, "
            f"collapse depth {_mean(online.get('collapse_depth', [])):.1f} (means of normalised scores over "
            f"{seeds} seed{'s' * (seeds != 1)})")


class Runner:
    """Runs commands one at a time through benchmark.Child, with progress lines; counts the outcome."""

    def __init__(self, args):
        self.args = args
        self.log = Log(args.workdir, enabled=not args.dry_run)
        self.child = benchmark.Child()
        self.counts = {"finished": 0, "skipped": 0}
        self.failed: list[str] = []

    def stopped(self, tag: str, when: str) -> int | None:
        """128 + the signal when one arrived (the log line says how to go on), else None."""
        if self.child.signal is None:
            return None
        self.log(f"{tag}: stopped by signal {self.child.signal} {when}; rerun the same command to go on",
                 error=True)
        return 128 + self.child.signal

    def execute(self, tag: str, what: str, command: list[str], done) -> tuple[str, str]:
        """Run `command`: ("ok", took) when it exits 0 and `done()`, ("failed", why) otherwise, ("signal", took)
        after a signal."""
        self.log(f"{tag}: started: {shlex.join(command)}")
        t0 = time.time()
        status, last = self.child.run(command)
        took = _duration(time.time() - t0)
        if self.child.signal is not None:
            return "signal", took
        if status != 0 or not done():
            why = f"exited with status {status}: {last}" if status else f"ended without {what}"
            return "failed", f"{why} (after {took}; rerun to resume)"
        return "ok", took

    def fail(self, name: str, message: str) -> bool:
        """Log the failure; True when the run stops here (no --keep_going)."""
        self.failed.append(name)
        self.log(f"error: {name}: {message}", error=True)
        return not self.args.keep_going


def _ensure_base(run: Runner, tag: str, dataset: str) -> int | None:
    """The base workdir finished (trained or resumed first, its dataset generated if missing): None, or the
    exit status to stop with; "failed" bases return -1 (the dataset's branches are skipped)."""
    args, log = run.args, run.log
    ns = base_namespace(args)
    command = benchmark.train_executable() + benchmark.train_args(dataset, ns)
    if benchmark.finished(dataset, ns):
        if args.dry_run:
            print(f"# {dataset}: base finished, reused: {shlex.join(command)}")
        else:
            log(f"{tag}: base {os.path.join(args.base_root, dataset)} finished (final.mb2po with this "
                "configuration), reused")
        return None
    from mb2po_jax.data import registry  # where local datasets live: $MB2PO_DATA_DIR or the default

    data_path = registry.parse_local_name(dataset).path
    if not os.path.isfile(data_path):
        generate = benchmark.generate_command(dataset, None)
        if args.dry_run:
            print(shlex.join(generate))
        else:
            log(f"{tag}: generating the dataset ({data_path} is missing)")
            outcome, detail = run.execute(tag, "the dataset", generate, lambda: os.path.isfile(data_path))
            if outcome == "signal":
                return run.stopped(tag, "while generating the dataset")
            if outcome == "failed":
                return 1 if run.fail(dataset, f"dataset generation {detail}") else -1
            log(f"{tag}: dataset generated in {detail}")
    if args.dry_run:
        print(shlex.join(command))
        return None
    benchmark.record_launch(dataset, ns)  # the base is a benchmark workdir: its launch record too
    base_results = os.path.join(args.base_root, dataset, "results.json")
    outcome, detail = run.execute(f"{tag} base", "results.json final.mb2po", command,
                                  lambda: "mb2po" in ((_read_json(base_results) or {}).get("final") or {}))
    if outcome == "signal":
        return run.stopped(f"{tag} base", f"after {detail} (mb2po-train saves a checkpoint)")
    if outcome == "failed":
        return 1 if run.fail(f"{dataset} base", f"mb2po-train {detail}") else -1
    log(f"{tag} base: finished in {detail}: {benchmark._final_line(_read_json(base_results))}")
    return None


def _run_arm(run: Runner, tag: str, dataset: str, arm: Arm) -> int | None:
    args, log = run.args, run.log
    workdir = arm_dir(args, dataset, arm.name)
    if arm_finished(dataset, arm, args):
        run.counts["skipped"] += 1
        if args.dry_run:
            print(f"# {dataset} {arm.name}: finished, skipped")
        else:
            log(f"{tag}: skipped (finished: results.json has final.online with this configuration)")
        return None
    base = os.path.join(args.base_root, dataset)
    copied = os.path.isdir(workdir)
    if not copied:
        if args.dry_run:
            print(f"# copy {base} -> {workdir}")
        else:
            t0 = time.time()
            branch(base, workdir, arm)
            log(f"{tag}: copied the base to {workdir} in {_duration(time.time() - t0)}")
            if (code := run.stopped(tag, "after copying the base")) is not None:
                return code
    restart = arm.source == "awac" and (not copied or needs_restart(workdir))
    command = arm_command(dataset, arm, args, restart)
    if args.dry_run:
        print(shlex.join(command))
        return None
    record_launch(workdir, dataset, arm.name, args)
    results = os.path.join(workdir, "results.json")
    outcome, detail = run.execute(tag, "results.json final.online", command,
                                  lambda: "online" in ((_read_json(results) or {}).get("final") or {}))
    if outcome == "signal":
        return run.stopped(tag, f"after {detail} (mb2po-train saves a checkpoint)")
    if outcome == "failed":
        return 1 if run.fail(f"{dataset} {arm.name}", f"mb2po-train {detail}") else None
    run.counts["finished"] += 1
    log(f"{tag}: finished in {detail}: {_online_line(_read_json(results))}")
    return None


def _run_sac(run: Runner, tag: str, dataset: str) -> int | None:
    args, log = run.args, run.log
    for seed in range(args.seeds):
        seed_tag = f"{tag} seed {seed}"
        if (code := run.stopped(seed_tag, "before it started")) is not None:
            return code
        command = sac_command(dataset, seed, args)
        if sac_finished(dataset, seed, args):
            run.counts["skipped"] += 1
            if args.dry_run:
                print(f"# {dataset} sac_scratch seed {seed}: finished, skipped: {shlex.join(command)}")
            else:
                log(f"{seed_tag}: skipped (finished: a checkpoint at step {args.online_steps})")
            continue
        if args.dry_run:
            print(shlex.join(command))
            continue
        record_launch(arm_dir(args, dataset, "sac_scratch"), dataset, "sac_scratch", args)
        outcome, detail = run.execute(seed_tag, f"a checkpoint at step {args.online_steps}", command,
                                      lambda: sac_finished(dataset, seed, args))
        if outcome == "signal":
            return run.stopped(seed_tag, f"after {detail} (train-behavior resumes from its last checkpoint)")
        if outcome == "failed":
            if run.fail(f"{dataset} sac_scratch seed {seed}", f"train-behavior {detail}"):
                return 1
            continue
        run.counts["finished"] += 1
        evals = _sac_evals(os.path.join(sac_dir(args, dataset, seed), "metrics.jsonl"))
        last = f"last evaluation: normalised score {_num(evals[-1]['normalized_score'])} at step " \
               f"{evals[-1]['step']:,}" if evals else "no evaluation"
        log(f"{seed_tag}: finished in {detail}: {last}")
    return None


def cmd_run(args) -> int:
    datasets, arms = datasets_for(args), arms_for(args)
    if "sac_scratch" in arms:
        from mb2po_jax.behavior import BehaviorConfig

        every = BehaviorConfig().eval_every
        if args.online_steps % every:
            raise BenchmarkError(f"--online_steps={args.online_steps}: with the sac_scratch arm it must be a "
                                 f"multiple of train-behavior's evaluation interval ({every}), so that SAC's "
                                 "curve ends at the last step")
    run = Runner(args)
    if not args.dry_run:
        run.log(f"online evidence: {len(datasets)} dataset(s) x arms {','.join(arms)}; budget {args.budget}, "
                f"{args.seeds} seed(s), {args.online_steps:,} online steps; bases in {args.base_root}, "
                f"workdir {args.workdir}")
    run.child.install()
    started = time.time()
    for i, dataset in enumerate(datasets, 1):
        tag = f"[{i}/{len(datasets)}] {dataset}"
        if (code := run.stopped(tag, "before it started")) is not None:
            return code
        base_ok = True
        if any(ARMS[a].source for a in arms):
            code = _ensure_base(run, tag, dataset)
            if code is not None and code >= 0:
                return code
            base_ok = code is None
        for arm in arms:
            arm_tag = f"{tag} {arm}"
            if (code := run.stopped(arm_tag, "before it started")) is not None:
                return code
            if ARMS[arm].source is None:
                code = _run_sac(run, arm_tag, dataset)
            elif not base_ok:
                run.failed.append(f"{dataset} {arm}")
                run.log(f"error: {dataset} {arm}: not started (the base did not finish)", error=True)
                continue
            else:
                code = _run_arm(run, arm_tag, dataset, ARMS[arm])
            if code is not None:
                return code
    if args.dry_run:
        return 0
    summary = (f"online evidence: {run.counts['finished']} finished, {run.counts['skipped']} skipped, "
               f"{len(run.failed)} failed in {_duration(time.time() - started)}")
    if run.failed:
        run.log(f"error: {summary}: {', '.join(run.failed)}", error=True)
        return 1
    run.log(f"{summary}; next: python experiments/online_evidence.py report --workdir {args.workdir} --out results")
    return 0


# ---------------------------------------------------------------------------------------------- report
def _records(path: str) -> list[tuple[str, dict]]:
    """(line, record) of a metrics.jsonl or evals.jsonl; [] when it is missing."""
    from mb2po_jax.logger import json_lines  # how the library reads metrics.jsonl

    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json_lines(f)


def _online_eval_lines(path: str) -> list[str]:
    """The online stage's evaluation lines (stage online, with normalized_score), verbatim."""
    return [line for line, r in _records(path) if r.get("stage") == "online" and "normalized_score" in r]


def _sac_eval_lines(path: str) -> list[str]:
    """train-behavior's evaluation records (stage behavior, with return), verbatim."""
    from mb2po_jax.behavior.rundir import STAGE

    return [line for line, r in _records(path) if r.get("stage") == STAGE and "return" in r]


def _sac_evals(path: str) -> list[dict]:
    found = {}
    for line in _sac_eval_lines(path):
        record = json.loads(line)
        found[record["step"]] = record  # a repeated evaluation (a resumed run): the last one
    return [found[s] for s in sorted(found)]


def _is_arm(path: str) -> bool:
    return os.path.isdir(path) and (
        any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "results.json", LAUNCH_FILE))
        or bool(_seed_dirs(path)))


def _seed_dirs(path: str) -> list[tuple[int, str]]:
    """(seed, directory) of a sac_scratch arm's sac_seed<s> directories, by seed."""
    out = []
    for name in os.listdir(path) if os.path.isdir(path) else []:
        seed = name[len(SAC_PREFIX):]
        if name.startswith(SAC_PREFIX) and seed.isdigit() and os.path.isdir(os.path.join(path, name)):
            out.append((int(seed), os.path.join(path, name)))
    return sorted(out)


def _layout(root: str) -> dict[str, list[str]]:
    """dataset -> its arm directories' names, of a workdir root or an earlier report's copies."""
    out = {}
    for dataset in sorted(os.listdir(root)):
        path = os.path.join(root, dataset)
        if os.path.isdir(path) and not dataset.endswith(COPYING):
            arms = [a for a in sorted(os.listdir(path)) if not a.endswith(COPYING) and _is_arm(os.path.join(path, a))]
            if arms:
                out[dataset] = arms
    return out


def _only_copies(path: str) -> bool:
    """Whether a copy directory holds nothing but what a report writes (safe to replace)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            if not (name.startswith(SAC_PREFIX) and _only_copies(full)):
                return False
        elif name not in COPIED:
            return False
    return True


def _copy_files(src: str, dst: str, files: tuple[str, ...]) -> None:
    for file in files:
        if os.path.isfile(os.path.join(src, file)):
            shutil.copyfile(os.path.join(src, file), os.path.join(dst, file))


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def sync_copies(source: str, runs: str) -> None:
    """Copy each arm under `source` (WORKDIR/<dataset>/<arm>, or an earlier copy) to `runs`/<dataset>/<arm>/:
    results.json, config.json, online_evidence.json and the online evaluation lines (evals.jsonl); for SAC,
    each seed's run.json and evaluation records (sac_seed<s>/). Copies no longer in `source` are removed
    when they hold nothing else."""
    layout = _layout(source)
    existing = _layout(runs) if os.path.isdir(runs) else {}
    for dataset, arms in layout.items():
        for arm in arms:
            src, dst = os.path.join(source, dataset, arm), os.path.join(runs, dataset, arm)
            if os.path.isdir(dst):
                if not _only_copies(dst):
                    raise BenchmarkError(f"{dst} holds files a report does not write; move them and rerun")
                shutil.rmtree(dst)
            os.makedirs(dst)
            _copy_files(src, dst, ("results.json", "config.json", LAUNCH_FILE))
            seeds = _seed_dirs(src)
            if seeds:
                for seed, path in seeds:
                    out = os.path.join(dst, f"{SAC_PREFIX}{seed}")
                    os.makedirs(out)
                    _copy_files(path, out, (RUN_FILE,))
                    metrics = os.path.join(path, "metrics.jsonl")
                    _write_lines(os.path.join(out, EVALS_FILE), _sac_eval_lines(
                        metrics if os.path.isfile(metrics) else os.path.join(path, EVALS_FILE)))
            else:
                metrics = os.path.join(src, "metrics.jsonl")
                _write_lines(os.path.join(dst, EVALS_FILE), _online_eval_lines(
                    metrics if os.path.isfile(metrics) else os.path.join(src, EVALS_FILE)))
    for dataset, arms in existing.items():
        for arm in sorted(set(arms) - set(layout.get(dataset, []))):
            path = os.path.join(runs, dataset, arm)
            if _only_copies(path):
                shutil.rmtree(path)
            else:
                print(f"warning: {path} is not an arm in {source} and holds other files; left alone",
                      file=sys.stderr)
        path = os.path.join(runs, dataset)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def load_arm(path: str, name: str, dataset: str) -> dict:
    """An arm's copies, with per-seed figures: start, final, depth, recover (lists, None where unknown), its
    curve (steps, per-seed normalised scores), status and settings."""
    arm = {"name": name, "launch": _read_json(os.path.join(path, LAUNCH_FILE)), "curve": ([], [])}
    seeds = _seed_dirs(path)
    if name == "sac_scratch" or seeds:
        return _load_sac(arm, seeds, dataset)
    results, config = _read_json(os.path.join(path, "results.json")), _read_json(os.path.join(path, "config.json"))
    settings = (config or {}).get("config") or (results or {}).get("config") or {}
    found = {}
    for line in _online_eval_lines(os.path.join(path, EVALS_FILE)):
        record = json.loads(line)
        found[record["step"]] = record  # a repeated evaluation: the last one
    evals = [found[s] for s in sorted(found)]
    total = (settings.get("online") or {}).get("steps")
    final = ((results or {}).get("final") or {}).get("online")
    done = bool(final and (config is None or config.get("config") == results.get("config")))
    # A copy whose online stage has not run yet still holds the base's settings (stages without online).
    started = "online" in settings.get("stages", ()) or bool(evals)
    arm.update(settings=settings, preset=(config or results or {}).get("preset"), total=total, kind="online",
               started=started, done=done,
               curve=([e["step"] for e in evals], [_floats(e["normalized_score"]) for e in evals]))
    if done:
        figures = _collapse_figures(arm["curve"], total) or final
        arm.update(start=figures.get("start_score"), final=final.get("normalized_score"),
                   depth=figures.get("collapse_depth"), recover=figures.get("steps_to_recover"), recover_known=True)
    else:
        start = _floats(found[0]["normalized_score"]) if 0 in found else None
        arm.update(start=start, final=None, depth=None, recover=None, recover_known=False)
    arm["status"] = _status(arm, evals[-1]["step"] if evals else None, "online")
    return arm


def _collapse_figures(curve, total) -> dict | None:
    """Per-seed lists of `online.collapse_figures` from the copied evaluation curve, so the table uses the
    library's current definition whichever commit ran the arm (results.json keeps the figures of the commit
    that ran it); None without a step-0 evaluation or the run's step count (then results.json's figures)."""
    from mb2po_jax import online

    steps, scores = curve
    if not steps or steps[0] != 0 or not total:
        return None
    per_seed = [online.collapse_figures(steps, [row[s] for row in scores], total) for s in range(len(scores[0]))]
    return {k: [f[k] for f in per_seed] for k in per_seed[0]}


def _floats(value) -> list[float]:
    items = value if isinstance(value, list) else [value]
    return [math.nan if v is None else float(v) for v in items]


def _load_sac(arm: dict, seeds: list[tuple[int, str]], dataset: str) -> dict:
    """SAC from scratch: each seed's curve, normalised from its returns with the library's D4RL reference
    scores; the final score is each seed's evaluation at its last step."""
    from mb2po_jax.data import normalized_score

    runs = [(_read_json(os.path.join(p, RUN_FILE)) or {}, _sac_evals(os.path.join(p, EVALS_FILE))) for _, p in seeds]
    env = next((r.get("env_id") for r, _ in runs if r.get("env_id")), None) or dataset
    totals = [(r.get("config") or {}).get("total_steps") for r, _ in runs]
    curves = [{e["step"]: float(normalized_score(env, e["return"])) for e in evals} for _, evals in runs]
    steps = sorted({s for c in curves for s in c})
    done = bool(runs) and all(t is not None and c and max(c) >= t for t, c in zip(totals, curves))
    arm.update(settings={}, preset=None, total=totals[0] if totals and len(set(totals)) == 1 else None,
               kind="sac", started=bool(runs), done=done, num_seeds=len(runs),
               curve=(steps, [[c.get(s, math.nan) for c in curves] for s in steps]),
               start=None, final=[c[max(c)] for c in curves] if done else None, depth=None, recover=None,
               recover_known=False, totals=totals,
               schedule=[((r.get("config") or {}).get("start_steps"), (r.get("config") or {}).get("eval_every"),
                          (r.get("config") or {}).get("eval_episodes")) for r, _ in runs])
    last = min((max(c) if c else 0) for c in curves) if curves else None
    arm["status"] = _status(arm, last, "sac")
    return arm


def _status(arm: dict, last_step: int | None, unit: str) -> str:
    if arm["done"]:
        return "done"
    if not arm["started"]:
        return "not started"
    if last_step is None:
        return "running"
    return f"running ({unit} {last_step:,}/{arm['total']:,})" if arm.get("total") else f"running ({unit} {last_step:,})"


def _score_cell(scores) -> str:
    if not scores or all(s is None for s in scores):  # a collapse depth nothing was evaluated for
        return "-"
    scores = [math.nan if s is None else float(s) for s in scores]
    return benchmark._cell(scores)


def _steps_cell(values: list) -> str:
    """Steps to recover per seed (None: never): mean ± std over the seeds that recovered, then each seed."""
    each = ", ".join("never" if v is None else f"{int(v):,}" for v in values)
    recovered = [float(v) for v in values if v is not None]
    if not recovered:
        return "never" + (f" ({each})" if len(values) > 1 else "")
    text = f"{statistics.fmean(recovered):,.0f}"
    if len(recovered) > 1:
        text += f" ± {statistics.stdev(recovered):,.0f}"
    if len(values) > 1:
        text += f" ({each}" + (f"; mean of the {len(recovered)} that recovered)" if len(recovered) < len(values)
                               else ")")
    return text


def _row(arm: dict) -> list[str]:
    if arm["kind"] == "sac":
        pending = "running" if arm["started"] else "-"
        return ["-", _score_cell(arm["final"]) if arm["done"] else pending, "-", "-"]
    if arm["done"]:
        return [_score_cell(arm["start"]), _score_cell(arm["final"]), _score_cell(arm["depth"]),
                _steps_cell(arm["recover"]) if arm["recover"] is not None else "-"]
    pending = "running" if arm["started"] else "-"
    return [_score_cell(arm["start"]) if arm["start"] else pending, pending, pending, pending]


def _arm_label(name: str) -> str:
    arm = ARMS.get(name)
    return f"{arm.label} (`{name}`)" if arm else f"`{name}`"


def _arm_order(names) -> list[str]:
    order = list(ARMS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _dataset_order(names) -> list[str]:
    def key(name):
        parsed = benchmark.parse_name(name)
        if not parsed:
            return (1, 0, 0, name)
        return (0, benchmark.ENVS.index(parsed[0]), benchmark.KINDS.index(parsed[1]), name)

    return sorted(names, key=key)


def _commits(arms: list[dict]) -> list[str]:
    out = []
    for arm in arms:
        for launch in (arm["launch"] or {}).get("launches", []):
            if launch.get("commit") and launch["commit"] not in out:
                out.append(launch["commit"])
    return out


def _sac_note(arms: list[dict]) -> str:
    """SAC's schedule from its runs' run.json (train-behavior's defaults where none records it)."""
    from mb2po_jax.behavior import BehaviorConfig

    default = BehaviorConfig()
    recorded = [s for a in arms if a["kind"] == "sac" for s in a["schedule"]]
    start, every, episodes = (benchmark._counted([s[i] for s in recorded if s[i] is not None] or [fallback])
                              for i, fallback in enumerate((default.start_steps, default.eval_every,
                                                            default.eval_episodes)))
    return (f"- SAC from scratch: a randomly initialised policy, {start} uniformly random action steps before its "
            f"first update, evaluated every {every} steps ({episodes} deterministic episodes), first after "
            f"{every}: it has no step-0 score and no collapse to measure (`-`); its final score is its "
            "evaluation at the last step, normalised from its return with the library's D4RL reference scores.")


def render(table: dict[str, dict[str, dict]]) -> str:
    """online.md: settings and notes, then per dataset one row per arm."""
    arms = [a for rows in table.values() for a in rows.values() if a["started"]]
    trained = [a for a in arms if a["kind"] == "online"]
    presets = [a["preset"] for a in trained]
    seeds = [a["settings"].get("num_seeds") for a in trained] + [a["num_seeds"] for a in arms if a["kind"] == "sac"]
    steps = [a["total"] for a in arms]
    every = [(a["settings"].get("online") or {}).get("eval_every") for a in trained]
    episodes = [a["settings"].get("eval_episodes") for a in trained]
    commits = _commits(arms)
    one = lambda values, other: benchmark._counted(values) if len(set(map(str, values))) == 1 else other
    lines = [
        "# Offline-to-online: offline agents fine-tuned in the real environment (issue 22)",
        "",
        f"- Budget (`mb2po-train --preset`): {benchmark._counted(presets)}. Seeds: {benchmark._counted(seeds)} "
        f"(base seed {SEED}). Online environment steps per seed: {benchmark._counted(steps)}; evaluations every "
        f"{benchmark._counted(every)} steps, {benchmark._counted(episodes)} deterministic episodes per seed.",
        f"- Commits: {', '.join(commits) if commits else 'not recorded'}.",
        "- Arms: each mb2po-train arm is a copy of the dataset's finished benchmark workdir (`mb2po-train "
        "--stages=awac,dynamics,mb2po`, `experiments/benchmark.py`), continued with `--stages=online`: "
        "`awac_online` after `--restart_from=mb2po` (the AWAC agent), the others from the AWAC+MB2PO agent; "
        "`sac_scratch` is our SAC (`mb2po-data train-behavior`) from a random policy, the floor, one run per "
        "seed with the same number of environment steps.",
        "- Columns: normalised score at online step 0 (the agent the stage continues); at the end of the online "
        "steps; collapse depth = start score minus the lowest score evaluated in the first 10 % of the online "
        "steps (0 if none is lower; `-` if none was evaluated there); steps to recover = the first evaluated "
        "step whose score exceeds the start score, after the collapse's lowest point if there was one (`never` "
        "if none; the mean is over the seeds that recovered). Each: mean ± std over seeds (ddof=1), then each "
        "seed; the final score from `results.json` `final.online`, the others by `online.collapse_figures` from "
        "the copied evaluations (`evals.jsonl`).",
        _sac_note(arms),
    ]
    if any(n in OPTION_ARMS for rows in table.values() for n in rows):
        lines.append(f"- Option arms against collapse (issue 22 item 4): `--online_warmup_steps={WARMUP_STEPS}` "
                     f"and `--online_ratio_start={ANNEAL_RATIO_START} --online_ratio_anneal_steps={ANNEAL_STEPS}`, "
                     "settings chosen, not tuned.")
    lines += [
        f"- Made by `python experiments/online_evidence.py run --base_root runs/benchmark --workdir runs/online "
        f"--seeds {one(seeds, 'N')} --online_steps {one(steps, 'STEPS')}` and `python experiments/"
        "online_evidence.py report --workdir runs/online --out results`; `report --from results/online_runs "
        "--out results` regenerates this file from the copies in `online_runs/`.",
        "",
    ]
    for dataset, rows in table.items():
        lines += [f"## {dataset}", "",
                  "| arm | status | start score (step 0) | final normalised score | collapse depth "
                  "| steps to recover |",
                  "|---|---|---|---|---|---|"]
        for name, arm in rows.items():
            lines.append(f"| {_arm_label(name)} | {arm['status']} | " + " | ".join(_row(arm)) + " |")
        lines.append("")
        if any(arm["curve"][0] for arm in rows.values()):
            curve = CURVE_FILE.format(dataset)
            lines += [f"Curves: [{curve}]({curve}) (normalised score against online environment steps; mean over "
                      "seeds and min-max band).", ""]
    return "\n".join(lines)


def plot_dataset(plt, dataset: str, rows: dict[str, dict], path: str) -> None:
    """Normalised score against online environment steps: per arm the mean over seeds and the min-max band,
    one colour per arm (the same on every dataset's figure); the first 10 % of the steps shaded."""
    from mb2po_jax import plot as curves  # the library's band drawing (mb2po-plot's)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    order = list(ARMS)
    totals = [a["total"] for a in rows.values() if a["total"] and a["curve"][0]]
    if totals:
        ax.axvspan(0, 0.1 * max(totals), color="0.92", label="first 10 % (collapse window)")
    for name, arm in rows.items():
        steps, values = arm["curve"]
        if not steps:
            continue
        color = f"C{order.index(name) % 10}" if name in order else "0.5"
        curves.draw_band(ax, curves.Series([float(s) for s in steps], values), color, ARMS[name].label
                         if name in ARMS else name, marker="o", markersize=3)
    ax.set_xlabel("online environment steps per seed")
    ax.set_ylabel("D4RL-normalised score (mean, min-max over seeds)")
    ax.set_title(f"{dataset}: offline-to-online")
    ax.set_xlim(left=0)
    benchmark.save_figure(plt, fig, ax, path)


def cmd_report(args) -> int:
    source = args.source
    if not os.path.isdir(source):
        raise BenchmarkError(f"{source}: not a directory")
    runs_dir = os.path.join(args.out, "online_runs")
    if os.path.realpath(source) != os.path.realpath(runs_dir):
        sync_copies(source, runs_dir)
    layout = _layout(runs_dir) if os.path.isdir(runs_dir) else {}
    table = {}
    for dataset in _dataset_order(set(layout) | set(DEFAULT_DATASETS)):
        names = _arm_order(set(layout.get(dataset, [])) | set(DEFAULT_ARMS))
        table[dataset] = {n: load_arm(os.path.join(runs_dir, dataset, n), n, dataset) for n in names}
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "online.md")
    with open(md_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(table))
    done = sum(a["done"] for rows in table.values() for a in rows.values())
    total = sum(len(rows) for rows in table.values())
    print(f"wrote {md_path}: {done} of {total} arms finished; copies in {runs_dir}")
    curves = {d: os.path.join(args.out, CURVE_FILE.format(d)) for d, rows in table.items()
              if any(a["curve"][0] for a in rows.values())}
    benchmark.remove_stale(os.path.join(args.out, CURVE_FILE.format("*")), set(curves.values()),
                           f"no arm of that dataset with evaluations in {runs_dir}")
    if args.no_plots or not curves:
        return 0
    plt = benchmark.pyplot(md_path)
    for dataset, path in curves.items():
        plot_dataset(plt, dataset, table[dataset], path)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fine-tune each arm online on every dataset (resumable)")
    run.add_argument("--base_root", default="runs/benchmark",
                     help="the benchmark's workdir root: BASE_ROOT/<dataset> is each branch's base")
    run.add_argument("--workdir", default="runs/online", help="root of the arms' workdirs")
    run.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="comma-separated local names "
                                                                              "(default: %(default)s)")
    run.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                     help=f"comma-separated, from {','.join(ARMS)} (default: %(default)s)")
    run.add_argument("--online_steps", type=int, default=100_000,
                     help="environment steps per seed of every arm (default 100000)")
    run.add_argument("--seeds", type=int, default=3, help="seeds, in one program per arm (default 3)")
    run.add_argument("--budget", choices=BUDGETS, default="cpu",
                     help="mb2po-train --preset of the base and the arms (default cpu)")
    run.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--keep_going", action="store_true", help="after a failed command, go on to the next")
    run.set_defaults(fn=cmd_run)
    report = sub.add_parser("report", help="write OUT/online.md, the curves and the arms' copies")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", dest="source", help="the run's workdir root (runs/online)")
    source.add_argument("--from", dest="source", help="copies written by an earlier report (results/online_runs)")
    report.add_argument("--out", default="results", help="output directory (default: results)")
    report.add_argument("--no_plots", action="store_true", help="only the Markdown and the copies")
    report.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    if args.command == "run" and (args.seeds < 1 or args.online_steps < 1):
        parser.error("--seeds and --online_steps must be at least 1")
    return benchmark.run_command(args)


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark table: AWAC vs AWAC+MB2PO on the local D4RL-style datasets, in two commands.

    python experiments/benchmark.py run --budget cpu --seeds 3 --workdir runs/benchmark
    python experiments/benchmark.py report --workdir runs/benchmark --out results
    python experiments/benchmark.py report --from results/runs --out results    # from the committed copies

`run`: {hopper, walker2d, halfcheetah} x {medium-replay, medium, medium-expert} (`--kinds` adds random and
expert; `--datasets` picks names), each ONE `mb2po-train --stages=awac,dynamics,mb2po --preset=BUDGET
--num_seeds=SEEDS --workdir=WORKDIR/<dataset>` subprocess, seeds vmapped in one program as the library runs
them. A missing local dataset is generated first (`mb2po-data generate`, in $MB2PO_DATA_DIR or the library's
default). Every run is a mb2po-train workdir, so an interrupted benchmark resumes when rerun, and a finished
run (results.json with final.mb2po and the same configuration) is skipped. `--budget paper` is the paper's
protocol, for an accelerator. Progress lines go to stdout and WORKDIR/benchmark.log.

`report`: copies each run's results.json, config.json, benchmark.json (the commits that ran it) and the
evaluation lines of metrics.jsonl (as evals.jsonl) to OUT/runs/<dataset>/, then writes OUT/benchmark.md from
those copies alone, so `report --from OUT/runs` regenerates it byte for byte, and one PNG learning curve per
dataset (OUT/benchmark_<dataset>.png; needs matplotlib: pip install -e ".[plot]").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVS = ("hopper", "walker2d", "halfcheetah")
KINDS = ("random", "medium-replay", "medium", "medium-expert", "expert")  # row order of the table
DEFAULT_KINDS = ("medium-replay", "medium", "medium-expert")
BUDGETS = ("smoke", "cpu", "paper")  # mb2po-train presets
STAGES = ("awac", "dynamics", "mb2po")
LOG_FILE = "benchmark.log"
LAUNCH_FILE = "benchmark.json"  # written by `run` into each dataset's workdir: its settings and commits
EVALS_FILE = "evals.jsonl"
CURVE_FILE = "benchmark_{}.png"  # one learning curve per dataset, beside benchmark.md
COPIED = ("results.json", "config.json", LAUNCH_FILE, EVALS_FILE)
TRAIN_ENV = "MB2PO_TRAIN"  # as in sweep.py: replaces the training executable (split on whitespace)

# Paper Table 1 (SPEC section 4): D4RL v0 datasets, 3 seeds, "mixed" = medium-replay.
# (env, kind) -> (AWAC, AWAC+MB2PO); None where the paper prints "(degrades)" without a number.
PAPER_TABLE1 = {
    ("halfcheetah", "random"): (16.2, 31.2),
    ("halfcheetah", "medium"): (41.2, 45.5),
    ("halfcheetah", "medium-replay"): (41.5, 52.9),
    ("hopper", "medium-replay"): (29.0, 82.0),
    ("walker2d", "medium-replay"): (16.6, 66.6),
    ("halfcheetah", "expert"): (106.5, None),
    ("hopper", "expert"): (112.3, None),
    ("walker2d", "medium-expert"): (93.2, None),
}


class BenchmarkError(Exception):
    """Printed as one `error: ...` line, exit 1."""


def parse_name(name: str) -> tuple[str, str] | None:
    """('hopper', 'medium-replay') for 'hopper-medium-replay-local'; None for any other name."""
    if not name.endswith("-local"):
        return None
    stem = name[: -len("-local")]
    for kind in sorted(KINDS, key=len, reverse=True):  # "medium-expert" before "expert"
        if stem.endswith("-" + kind) and stem[: -len(kind) - 1] in ENVS:
            return stem[: -len(kind) - 1], kind
    return None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{path}: cannot read ({e})") from None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


# ------------------------------------------------------------------------------------------------- run
def datasets_for(args) -> list[str]:
    if args.datasets:
        names = [n for n in args.datasets.split(",") if n]
        bad = [n for n in names if parse_name(n) is None]
        if bad:
            raise BenchmarkError(f"--datasets: {', '.join(bad)} not <env>-<kind>-local with env one of "
                                 f"{', '.join(ENVS)} and kind one of {', '.join(KINDS)}")
        return list(dict.fromkeys(names))
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise BenchmarkError(f"--kinds: {', '.join(bad) or 'empty'}; choose from {', '.join(KINDS)}")
    return [f"{env}-{kind}-local" for env in ENVS for kind in dict.fromkeys(kinds)]


def train_executable() -> list[str]:
    return os.environ.get(TRAIN_ENV, "").split() or [sys.executable, "-m", "mb2po_jax.train"]


def train_args(dataset: str, args) -> list[str]:
    return [f"--dataset={dataset}", f"--stages={','.join(STAGES)}", f"--preset={args.budget}",
            f"--num_seeds={args.seeds}", f"--seed={args.seed}",
            f"--workdir={os.path.join(args.workdir, dataset)}"]


def generate_command(dataset: str, size: int | None) -> list[str]:
    env, kind = parse_name(dataset)
    return ([sys.executable, "-m", "mb2po_jax.data.cli", "generate", "--env", env, "--kind", kind]
            + ([] if size is None else ["--size", str(size)]))


def _agrees(recorded, expected) -> bool:
    """Equal, except that keys one side does not have are not compared (a run of an older version did not
    record settings added since; mb2po-train's own check on resuming has the same rule)."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        return all(_agrees(recorded[k], expected[k]) for k in recorded.keys() & expected.keys())
    return recorded == expected


def finished(dataset: str, args) -> bool:
    """True when WORKDIR/<dataset>/results.json has final.mb2po for the configuration this run asks for."""
    results = _read_json(os.path.join(args.workdir, dataset, "results.json"))
    if not results or "mb2po" not in results.get("final", {}):
        return False
    from mb2po_jax import config as config_lib  # the same resolution mb2po-train does for these flags

    overrides = {"num_seeds": args.seeds, "seed": args.seed, "stages": STAGES}
    expected = config_lib.make_config(args.budget, overrides, config_lib.task_defaults(dataset))
    expected = json.loads(json.dumps(config_lib.to_dict(expected)))
    return (results.get("dataset") == dataset and results.get("preset") == args.budget
            and _agrees(config_lib.with_added_fields(results.get("config")), expected))


def git_commit() -> str | None:
    """This checkout's HEAD (12 hex digits), '+dirty' when tracked files differ from it; None without git."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take the index lock of a shared checkout
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=30, env=env)
        if head.returncode:
            return None
        status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.returncode or status.stdout.strip() else "")


def record_launch(dataset: str, args) -> None:
    """Add this launch (commit and settings) to WORKDIR/<dataset>/benchmark.json: the report names the
    commits of the launches whose settings are the finished run's."""
    workdir = os.path.join(args.workdir, dataset)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LAUNCH_FILE)
    launches = list((_read_json(path) or {}).get("launches", []))
    launch = {"commit": git_commit(), "budget": args.budget, "seeds": args.seeds, "seed": args.seed}
    if launch not in launches:
        launches.append(launch)
    _write_json(path, {"dataset": dataset, "launches": launches})


class Log:
    """Progress lines on stdout (errors on stderr), each also appended to WORKDIR/benchmark.log."""

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, LOG_FILE) if enabled else None
        if self.path:
            os.makedirs(workdir, exist_ok=True)

    def __call__(self, msg: str, error: bool = False) -> None:
        print(msg, file=sys.stderr if error else sys.stdout, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


class Child:
    """The running subprocess; SIGTERM/SIGINT to the benchmark are passed on as SIGTERM, on which
    mb2po-train saves a checkpoint after its current compiled call and exits 0."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None

    def install(self) -> None:
        def handler(signum, frame):
            del frame
            self.signal = signum
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, handler)

    def run(self, command: list[str]) -> tuple[int, str]:
        """Run `command` with its stderr passed through; (exit status, its last `error:` or other line)."""
        tail = b""
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE)
        try:
            fd = self.proc.stderr.fileno()
            while chunk := os.read(fd, 1 << 16):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                tail = (tail + chunk)[-16384:]
            status = self.proc.wait()
        finally:
            self.proc.stderr.close()
            self.proc = None
        lines = [l.strip() for l in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines()]
        lines = [l for l in lines if l]
        errors = [l for l in lines if l.startswith("error:")]
        return status, (errors or lines or [""])[-1]


def _final_line(results: dict) -> str:
    means = {stage: statistics.fmean(results["final"][stage]["normalized_score"])
             for stage in ("awac", "mb2po") if stage in results.get("final", {})}
    seeds = results.get("num_seeds")
    return (f"AWAC {means.get('awac', float('nan')):.1f} -> AWAC+MB2PO {means.get('mb2po', float('nan')):.1f} "
            f"(mean normalised score over {seeds} seed{'s' * (seeds != 1)})")


def cmd_run(args) -> int:
    datasets = datasets_for(args)
    log = Log(args.workdir, enabled=not args.dry_run)
    from mb2po_jax.data import registry  # where local datasets live: $MB2PO_DATA_DIR or the default

    if not args.dry_run:
        log(f"benchmark: {len(datasets)} dataset(s), budget {args.budget}, {args.seeds} seed(s) "
            f"(base seed {args.seed}), workdir {args.workdir}, data {registry.local_data_dir()}")
    child, failed, counts, started = Child(), [], {"finished": 0, "skipped": 0}, time.time()
    child.install()
    for i, dataset in enumerate(datasets, 1):
        tag = f"[{i}/{len(datasets)}] {dataset}"
        if child.signal is not None:  # arrived between two runs
            log(f"{tag}: not started, stopped by signal {child.signal}; rerun the same command to go on", error=True)
            return 128 + child.signal
        command = train_executable() + train_args(dataset, args)
        if finished(dataset, args):
            counts["skipped"] += 1
            if args.dry_run:
                print(f"# {dataset}: finished, skipped: {shlex.join(command)}")
            else:
                log(f"{tag}: skipped (finished: results.json has final.mb2po with this configuration)")
            continue
        data_path = registry.parse_local_name(dataset).path
        if not os.path.isfile(data_path):
            generate = generate_command(dataset, args.data_size)
            if args.dry_run:
                print(shlex.join(generate))
            else:
                log(f"{tag}: generating the dataset ({data_path} is missing): {shlex.join(generate)}")
                t0 = time.time()
                status, last = child.run(generate)
                if child.signal is not None:
                    log(f"{tag}: stopped by signal {child.signal} while generating the dataset; rerun to go on",
                        error=True)
                    return 128 + child.signal
                if status != 0 or not os.path.isfile(data_path):
                    failed.append(dataset)
                    log(f"error: {dataset}: dataset generation exited with status {status}: {last}", error=True)
                    if args.keep_going:
                        continue
                    return 1
                log(f"{tag}: dataset generated in {_duration(time.time() - t0)}")
        if args.dry_run:
            print(shlex.join(command))
            continue
        record_launch(dataset, args)
        log(f"{tag}: started: {shlex.join(command)}")
        t0 = time.time()
        status, last = child.run(command)
        took = _duration(time.time() - t0)
        if child.signal is not None:
            log(f"{tag}: stopped by signal {child.signal} after {took} (mb2po-train saves a checkpoint); rerun "
                "the same command to resume", error=True)
            return 128 + child.signal
        results = _read_json(os.path.join(args.workdir, dataset, "results.json")) if status == 0 else None
        if status != 0 or not results or "mb2po" not in results.get("final", {}):
            failed.append(dataset)
            why = f"exited with status {status}: {last}" if status else "ended without results.json final.mb2po"
            log(f"error: {dataset}: mb2po-train {why} (after {took}; rerun to resume)", error=True)
            if args.keep_going:
                continue
            return 1
        counts["finished"] += 1
        log(f"{tag}: finished in {took}: {_final_line(results)}")
    if args.dry_run:
        return 0
    total = _duration(time.time() - started)
    summary = (f"benchmark: {counts['finished']} finished, {counts['skipped']} skipped, {len(failed)} failed "
               f"in {total}")
    if failed:
        log(f"error: {summary}: {', '.join(failed)}", error=True)
        return 1
    log(f"{summary}; next: python experiments/benchmark.py report --workdir {args.workdir} --out results")
    return 0


# ---------------------------------------------------------------------------------------------- report
def _eval_lines(path: str) -> list[str]:
    """The evaluation records (lines with normalized_score) of a metrics.jsonl or evals.jsonl, verbatim.
    A line that does not parse (the end of a file being written) is left out."""
    from mb2po_jax.logger import json_lines  # how the library reads metrics.jsonl

    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line for line, record in json_lines(f) if "normalized_score" in record]


def _run_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if any(
        os.path.isfile(os.path.join(root, d, f)) for f in ("config.json", "results.json", LAUNCH_FILE)))


def sync_copies(source: str, runs: str) -> None:
    """Copy each run under `source` (mb2po-train workdirs, or an earlier copy) to `runs`/<dataset>/:
    results.json, config.json, benchmark.json and the evaluation lines. Copies of runs no longer in
    `source` are removed when they hold nothing else, except a finished run's (results.json with
    final.mb2po): it is the record of a workdir that may since have been lost."""
    os.makedirs(runs, exist_ok=True)
    names = _run_dirs(source)
    for name in names:
        src, dst = os.path.join(source, name), os.path.join(runs, name)
        os.makedirs(dst, exist_ok=True)
        for file in ("results.json", "config.json", LAUNCH_FILE):
            if os.path.isfile(os.path.join(src, file)):
                shutil.copyfile(os.path.join(src, file), os.path.join(dst, file))
            elif os.path.exists(os.path.join(dst, file)):
                os.remove(os.path.join(dst, file))
        metrics = os.path.join(src, "metrics.jsonl")
        lines = _eval_lines(metrics if os.path.isfile(metrics) else os.path.join(src, EVALS_FILE))
        with open(os.path.join(dst, EVALS_FILE), "w", encoding="utf-8") as f:
            f.writelines(lines)
    for stale in sorted(set(_run_dirs(runs)) - set(names)):
        path = os.path.join(runs, stale)
        if ((_read_json(os.path.join(path, "results.json")) or {}).get("final") or {}).get("mb2po") is not None:
            print(f"note: kept the finished run {path}; its workdir is not in {source}", file=sys.stderr)
        elif set(os.listdir(path)) <= set(COPIED):
            shutil.rmtree(path)
        else:
            print(f"warning: {path} is not a run in {source} and holds other files; left alone", file=sys.stderr)


def _row_order(names: set[str]) -> list[str]:
    def key(name):
        parsed = parse_name(name)
        return (0, ENVS.index(parsed[0]), KINDS.index(parsed[1]), name) if parsed else (1, 0, 0, name)

    return sorted(names, key=key)


def load_run(path: str) -> dict:
    """A run's copies: results, config, launch (None when absent) and its evaluations in stage/step order."""
    run = {"results": _read_json(os.path.join(path, "results.json")),
           "config": _read_json(os.path.join(path, "config.json")),
           "launch": _read_json(os.path.join(path, LAUNCH_FILE))}
    evals = {}
    for line in _eval_lines(os.path.join(path, EVALS_FILE)):
        record = json.loads(line)
        evals[(record.get("stage"), record.get("step"))] = record  # a repeated evaluation: the last one
    order = {stage: i for i, stage in enumerate(STAGES)}
    run["evals"] = [evals[k] for k in sorted(evals, key=lambda k: (order.get(k[0], len(order)), k[1]))]
    cfg = (run["config"] or {}).get("config") or (run["results"] or {}).get("config") or {}
    run["settings"] = cfg
    results = run["results"]
    run["done"] = bool(results and "mb2po" in results.get("final", {}) and (
        run["config"] is None or run["config"].get("config") == results.get("config")))
    run["started"] = run["config"] is not None or results is not None
    return run


def _stage_scores(run: dict, stage: str) -> list[float] | None:
    """Final normalised scores of a stage: results.json's when done, else the evaluation at the stage's end."""
    if run["done"] and stage in run["results"]["final"]:
        return run["results"]["final"][stage]["normalized_score"]
    end = run["settings"].get("awac_steps") if stage == "awac" else _mb2po(run).get("iterations")
    last = [e for e in run["evals"] if e["stage"] == stage and e["step"] == end]
    return last[-1]["normalized_score"] if last else None


def _num(x: float, sign: bool = False) -> str:
    x = round(x, 1) + 0.0  # no "-0.0"
    if x != x:
        return "nan"
    return f"{x:+.1f}" if sign and x else f"{x:.1f}"


def _cell(scores: list[float], sign: bool = False) -> str:
    text = _num(statistics.fmean(scores), sign)
    if len(scores) > 1:
        text += f" ± {_num(statistics.stdev(scores))} ({', '.join(_num(s, sign) for s in scores)})"
    return text


def _paper_cell(name: str) -> str:
    parsed = parse_name(name)
    paper = PAPER_TABLE1.get(parsed) if parsed else None
    if paper is None:
        return "not in Table 1"
    awac, mb2po = paper
    if mb2po is None:
        return f"degrades (no number; AWAC {awac:.1f})"
    return f"{_num(mb2po - awac, sign=True)} ({awac:.1f} -> {mb2po:.1f})"


def _status(run: dict) -> str:
    if run["done"]:
        return "done"
    if not run["started"]:
        return "not started"
    if not run["evals"]:
        return "running"
    last, cfg = run["evals"][-1], run["settings"]
    total = cfg.get("awac_steps") if last["stage"] == "awac" else cfg.get("mb2po", {}).get("iterations")
    return f"running ({last['stage']} {last['step']}/{total})"


def _counted(values: list) -> str:
    """'cpu' when every started run agrees, else 'cpu (8), smoke (1)'."""
    values = [str(v) for v in values if v is not None]
    if not values:
        return "n/a"
    counts = {v: values.count(v) for v in sorted(set(values))}
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{v} ({n})" for v, n in counts.items())


def _final_episodes(run: dict) -> list:
    """Episodes per seed of each of a run's final scores: recorded with the score (`pipeline`), else (runs
    made before that) the run's --final_eval_episodes, else --eval_episodes."""
    from mb2po_jax import config as config_lib

    finals = ((run["results"] or {}).get("final") or {}) if run["done"] else {}
    return ([config_lib.recorded_final_episodes(run["settings"], final) for final in finals.values()]
            or [config_lib.recorded_final_episodes(run["settings"])])


def _commits(run: dict) -> list[str]:
    """Commits of the launches with this run's settings (benchmark.json), and any the run itself recorded."""
    settings = ((run["config"] or run["results"] or {}).get("preset"), run["settings"].get("num_seeds"),
                run["settings"].get("seed"))
    launches = (run["launch"] or {}).get("launches", [])
    found = [l.get("commit") for l in launches if (l.get("budget"), l.get("seeds"), l.get("seed")) == settings]
    found += [(run["results"] or {}).get(k) for k in ("commit", "git_commit")]
    return [c for c in found if c]


def _mb2po(run: dict) -> dict:
    """The MB2PO settings a run recorded ({} before it started)."""
    return run["settings"].get("mb2po", {})


def render(names: list[str], runs: dict[str, dict]) -> str:
    started = [runs[n] for n in names if runs[n]["started"]]
    presets = [(r["config"] or r["results"] or {}).get("preset") for r in started]
    seeds = [r["settings"].get("num_seeds") for r in started]
    base_seeds = [r["settings"].get("seed") for r in started]
    episodes = [r["settings"].get("eval_episodes") for r in started]
    final_episodes = [n for r in started for n in _final_episodes(r)]
    commits = []
    for r in started:
        for c in _commits(r):
            if c not in commits:
                commits.append(c)
    budget = _counted(presets)
    lines = [
        "# AWAC vs AWAC+MB2PO on the local D4RL-style datasets",
        "",
        f"- Budget (`mb2po-train --preset`): {budget}. Seeds per dataset: {_counted(seeds)} (base seed "
        f"{_counted(base_seeds)}), trained side by side in one `mb2po-train --num_seeds` run; "
        f"evaluation episodes per seed: {_counted(episodes)} (curves), {_counted(final_episodes)} (final scores, "
        "`--final_eval_episodes`).",
        f"- Commits: {', '.join(commits) if commits else 'not recorded'}.",
        "- Data: datasets made with `mb2po-data generate` (D4RL's recipe, Gymnasium v5 MuJoCo, the SAC "
        "behaviour policies shipped in the package), not the D4RL v0 files of the paper's Table 1: the paper "
        "column is a reference for the direction and size of the change, not a number to match.",
        *(["- h, lambda: MOPO's per-task table; `--max_penalty_share` (0.5 in the `cpu` preset) caps each seed's "
           "lambda so the penalty takes at most that share of the data's mean |r| on the data: where it bound, "
           "each seed's lambda is shown as `capped: ...`; runs made before the cap existed are marked so."]
          if any("max_penalty_share" in _mb2po(runs[n]) and not _mb2po(runs[n]).get("penalty_share")
                 for n in names) else []),
        *(["- h, lambda with `--penalty_share` (0.5 in the `cpu` preset since issue 18's rule): h from MOPO's "
           "per-task table; lambda set per seed so that the penalty takes that share of the data's mean |r| on "
           "the data, in place of the table's; "
           "shown as `set: ...`. The rule (with omega = 0.5 and 100k dynamics steps) was chosen among five "
           "candidates on the evaluation returns of walker2d-medium and the three medium-expert datasets; "
           "RESULTS.md, \"A rule across the four losing datasets\", reports every candidate tried."]
          if any(_mb2po(runs[n]).get("penalty_share") for n in names) else []),
        "- Scores: D4RL-normalised return of each stage's final policy, mean ± std over seeds (ddof=1), then "
        "each seed; MB2PO - AWAC is per seed (MB2PO fine-tunes that seed's AWAC policy).",
        f"- Made by `python experiments/benchmark.py run --budget {budget if len(set(presets)) == 1 else 'BUDGET'}"
        f" --seeds {_counted(seeds) if len(set(seeds)) == 1 else 'N'} --workdir WORKDIR` at the commits "
        "above (a preset means that commit's settings; each run's `config.json` records them) and "
        "`python experiments/benchmark.py report --workdir WORKDIR --out DIR`, DIR being this file's "
        "folder; `report --from DIR/runs --out DIR` regenerates this file from the copies in `DIR/runs/`.",
        "",
        "| dataset | status | h, lambda | AWAC | AWAC+MB2PO | MB2PO - AWAC | paper Table 1 (v0): MB2PO - AWAC |",
        "|---|---|---|---|---|---|---|",
    ]
    diffs = []  # (dataset, per-seed differences) of finished runs
    for name in names:
        run = runs[name]
        mcfg = _mb2po(run)
        hl = f"{mcfg['horizon']}, {mcfg['penalty_coef']}" if "horizon" in mcfg else ""
        used = run["results"]["final"].get("mb2po", {}).get("penalty_coef") if run["done"] else None
        if hl and mcfg.get("penalty_share"):
            hl = f"{mcfg['horizon']}, set" + (f": {', '.join(f'{x:.2g}' for x in used)}" if used else "")
        elif hl and "max_penalty_share" not in mcfg:
            hl += " (before the cap)"
        elif used and mcfg["max_penalty_share"] and any(x < mcfg["penalty_coef"] * (1 - 1e-6) for x in used):
            hl += f" (capped: {', '.join(f'{x:.2g}' for x in used)})"  # lambda read back as float32
        awac, mb2po = _stage_scores(run, "awac"), _stage_scores(run, "mb2po")
        status = _status(run)
        if run["done"] and awac and mb2po:
            diff = [m - a for a, m in zip(awac, mb2po)]
            diffs.append((name, diff))
            cells = [_cell(awac), _cell(mb2po), _cell(diff, sign=True)]
        else:
            pending = "running" if run["started"] else "-"
            cells = [_cell(awac) if awac else pending, pending, pending]
        lines.append(f"| {name} | {status} | {hl} | " + " | ".join(cells) + f" | {_paper_cell(name)} |")
    lines += ["", summary_line(diffs, len(names)), ""]
    curves = [n for n in names if runs[n]["evals"]]
    if curves:
        lines += ["Learning curves (normalised score against training progress, AWAC then MB2PO): "
                  + ", ".join(f"[{n}]({CURVE_FILE.format(n)})" for n in curves) + ".", ""]
    return "\n".join(lines)


def summary_line(diffs: list[tuple[str, list[float]]], num_rows: int) -> str:
    if not diffs:
        return f"**Summary:** none of the {num_rows} datasets has finished yet."
    means = [(statistics.fmean(d), name, d) for name, d in diffs]
    improved = [m for m in means if m[0] > 0]
    every_seed = [m for m in means if all(x > 0 for x in m[2])]
    worst = min(means)
    loss = (f"largest loss: {worst[1]} ({_num(worst[0], sign=True)})" if worst[0] < 0
            else "no dataset lost (largest loss: none)")
    agree = []
    for mean, name, _ in means:
        paper = PAPER_TABLE1.get(parse_name(name) or ("", ""))
        if paper is not None:
            paper_up = paper[1] is not None and paper[1] > paper[0]
            agree.append(paper_up == (mean > 0))
    direction = (f" The direction of the change agrees with the paper's Table 1 on {sum(agree)} of the "
                 f"{len(agree)} finished datasets it reports." if agree else "")
    return (f"**Summary:** MB2PO improved the mean normalised score on {len(improved)} of {len(means)} finished "
            f"datasets (every seed improved on {len(every_seed)}); {loss}.{direction}")


def plot_curve(plt, name: str, run: dict, path: str) -> None:
    """Normalised score against gradient steps: AWAC's steps, then each MB2PO iteration's AWAC updates."""
    from mb2po_jax import plot as curves  # the library's curve extraction and drawing (mb2po-plot's)

    cfg = run["settings"]
    awac_steps, per_iteration = curves.stage_boundary(run["evals"], cfg)
    iterations = cfg.get("mb2po", {}).get("iterations")
    series = curves.score_series(run["evals"], awac_steps, per_iteration)  # MB2PO's from AWAC's final point
    fig, ax = plt.subplots(figsize=(10, 4.5))
    num_seeds = 0
    for stage, color, label in (("awac", "C0", "AWAC"), ("mb2po", "C1", "AWAC+MB2PO")):
        if not series[stage]:
            continue
        num_seeds = max(num_seeds, *(len(s) for s in series[stage].values))
        curves.draw_band(ax, series[stage], color, f"{label}: mean over seeds", f"{label}: min-max over seeds",
                         marker="o", markersize=3)
    ax.axvline(awac_steps, color="0.3", linestyle="--", linewidth=1)
    for text, ha, dx in (("AWAC on the offline data", "right", -4), ("MB2PO in the model MDP", "left", 4)):
        ax.annotate(text, (awac_steps, 1), xycoords=("data", "axes fraction"), xytext=(dx, -4),
                    textcoords="offset points", ha=ha, va="top", fontsize=8, color="0.3")
    if iterations:  # the MB2PO part's own unit, on the top axis
        top = ax.secondary_xaxis("top", functions=(lambda x: (x - awac_steps) / per_iteration,
                                                   lambda i: awac_steps + i * per_iteration))
        top.set_xticks(sorted({round(iterations * f) for f in (0, 0.25, 0.5, 0.75, 1)}))
        top.set_xlabel("MB2PO iteration", fontsize=8, loc="right")
        top.tick_params(labelsize=8)
    paper = PAPER_TABLE1.get(parse_name(name) or ("", ""))
    if paper is not None:
        ax.axhline(paper[0], color="C0", linestyle=":", linewidth=1, label="paper AWAC (D4RL v0)")
        if paper[1] is not None:
            ax.axhline(paper[1], color="C1", linestyle=":", linewidth=1, label="paper AWAC+MB2PO (D4RL v0)")
    ax.set_xlabel(f"gradient steps: {awac_steps:,} AWAC steps, then MB2PO iterations "
                  f"({per_iteration:,} AWAC updates each)")
    ax.set_ylabel("D4RL-normalised score")
    preset = (run["config"] or run["results"] or {}).get("preset", "?")
    ax.set_title(f"{name} (preset {preset}, {num_seeds} seed{'s' * (num_seeds != 1)})")
    ax.set_xlim(left=0)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.1 * (high - low))  # room for the stage labels
    save_figure(plt, fig, ax, path)


def save_figure(plt, fig, ax, path: str) -> None:
    """The report figures' common finish: grid, legend outside the axes on the right, written and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot(written: str):
    """matplotlib.pyplot on the Agg backend; without matplotlib (an optional extra), an error that says
    `written` was written and how to do without the plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchmarkError(f"plots need matplotlib, which is not installed (pip install -e \".[plot]\"); "
                             f"{written} was written; --no_plots skips the plots") from None
    return plt


def remove_stale(pattern: str, drawn: set[str], why: str) -> None:
    """Remove the figures matching `pattern` that this report does not draw (a run whose copy is gone), so that
    no older figure is left beside the table looking current."""
    for stale in sorted(set(glob.glob(pattern)) - drawn):
        os.remove(stale)
        print(f"removed {stale}: {why}")


def cmd_report(args) -> int:
    source = args.source
    if not os.path.isdir(source):
        raise BenchmarkError(f"{source}: not a directory")
    runs_dir = os.path.join(args.out, "runs")
    if os.path.realpath(source) != os.path.realpath(runs_dir):
        sync_copies(source, runs_dir)
    found = set(_run_dirs(runs_dir)) if os.path.isdir(runs_dir) else set()
    names = _row_order(found | {f"{env}-{kind}-local" for env in ENVS for kind in DEFAULT_KINDS})
    runs = {n: load_run(os.path.join(runs_dir, n)) for n in names}
    md_path = os.path.join(args.out, "benchmark.md")
    with open(md_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(names, runs))
    done = sum(r["done"] for r in runs.values())
    print(f"wrote {md_path}: {done} of {len(names)} datasets finished; copies in {runs_dir}")
    curves = {name: os.path.join(args.out, CURVE_FILE.format(name)) for name in names if runs[name]["evals"]}
    remove_stale(os.path.join(args.out, CURVE_FILE.format("*")), set(curves.values()),
                 f"no run of that dataset in {runs_dir}")
    if args.no_plots or not curves:
        return 0
    plt = pyplot(md_path)
    for name, path in curves.items():
        plot_curve(plt, name, runs[name], path)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train AWAC, dynamics and MB2PO on every dataset (resumable)")
    run.add_argument("--budget", choices=BUDGETS, default="cpu", help="mb2po-train --preset (default cpu)")
    run.add_argument("--seeds", type=int, default=3, help="seeds per dataset, in one program (default 3)")
    run.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    run.add_argument("--workdir", default="runs/benchmark", help="root of the runs' workdirs")
    run.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                     help=f"dataset kinds for every env, from {','.join(KINDS)} (default: %(default)s)")
    run.add_argument("--datasets", help="comma-separated local names instead of the grid, "
                                        "e.g. hopper-medium-replay-local")
    run.add_argument("--data_size", type=int, help="transitions of a dataset generated here (mb2po-data "
                                                   "generate --size; default: D4RL's size for the kind)")
    run.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--keep_going", action="store_true", help="after a failed run, go on to the next")
    run.set_defaults(fn=cmd_run)
    report = sub.add_parser("report", help="write OUT/benchmark.md, the curves and the runs' copies")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", dest="source", help="the benchmark's workdir root (runs/benchmark)")
    source.add_argument("--from", dest="source", help="copies written by an earlier report (results/runs)")
    report.add_argument("--out", default="results", help="output directory (default: results)")
    report.add_argument("--no_plots", action="store_true", help="only the Markdown and the copies")
    report.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    if args.command == "run" and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return run_command(args)


def run_command(args) -> int:
    """`args.fn(args)`, with each expected failure as one `error:` line and exit status 1."""
    try:
        return args.fn(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a copy or a write that failed (disk full, permissions)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # the library's own one-line errors (a bad name, a bad preset)
        from mb2po_jax.errors import Mb2poError

        if not isinstance(e, Mb2poError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

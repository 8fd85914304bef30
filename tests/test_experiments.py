"""experiments/sweep.py and experiments/collect.py, run as the user runs them (subprocesses, no JAX)."""
import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"
COLLECT = ROOT / "experiments" / "collect.py"
EXAMPLE = ROOT / "experiments" / "sweeps" / "example.json"


def _run(script, *args, env=None, cwd=None):
    env = {**{k: v for k, v in os.environ.items() if k != "MB2PO_TRAIN"}, **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def _spec(tmp_path, obj, name="spec.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_example_expands_to_every_combination_with_exact_flags():
    out = _run(SWEEP, EXAMPLE, "print")
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(commands) == 2 * 3 * 2
    assert commands[0] == [
        "mb2po-train", "--dataset=hopper-medium-replay-local", "--seed=0", "--penalty_coef=0.5",
        "--preset=cpu", "--stages=awac,dynamics,mb2po", "--penalty_share=0", "--max_penalty_share=0",
        "--workdir=runs/sweeps/medium-replay-penalty/hopper-medium-replay-local__seed0__penalty_coef0.5",
    ]
    assert commands[-1][1:4] == ["--dataset=walker2d-medium-replay-local", "--seed=2", "--penalty_coef=1.0"]
    workdirs = _run(SWEEP, EXAMPLE, "list-workdirs").stdout.splitlines()
    assert len(set(workdirs)) == 12
    assert [c[-1] for c in commands] == [f"--workdir={w}" for w in workdirs]


def test_workdir_names_are_filesystem_safe_and_values_quoted(tmp_path):
    spec = _spec(tmp_path, {"name": "paths", "workdir_root": str(tmp_path / "r"),
                            "grid": {"dataset": ["data/my set.hdf5"], "normalize_observations": [True]},
                            "base": {"actor_hidden_dims": [64, 64]}})
    out = _run(SWEEP, spec, "print", env={"MB2PO_TRAIN": "python -m mb2po_jax.train"})
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert shlex.split(line) == [
        "python", "-m", "mb2po_jax.train", "--dataset=data/my set.hdf5",
        "--normalize_observations=true", "--actor_hidden_dims=64,64",
        f"--workdir={tmp_path / 'r' / 'paths' / 'data_my_set.hdf5__normalize_observationstrue'}",
    ]


def test_array_script_runs_the_selected_command(tmp_path):
    job = tmp_path / "job.sh"
    out = _run(SWEEP, EXAMPLE, "array", "--out", job)
    assert out.returncode == 0, out.stderr
    assert "12 tasks" in out.stderr and "--array=0-11" in out.stderr
    expected = shlex.split(_run(SWEEP, EXAMPLE, "print").stdout.splitlines()[7])[1:]  # flags of task 7
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_ARRAY_TASK_ID", "TASK_ID")}
    for how, extra_env, args in [("TASK_ID", {"TASK_ID": "7"}, []),
                                 ("slurm", {"SLURM_ARRAY_TASK_ID": "7", "TASK_ID": "1"}, []),
                                 ("argument", {}, ["7"])]:
        ran = subprocess.run(["bash", str(job), *args], capture_output=True, text=True, timeout=30,
                             env={**env, "MB2PO_TRAIN": "echo", **extra_env})
        assert ran.returncode == 0, (how, ran.stderr)
        assert ran.stdout.split() == expected, how  # echo printed the flags
    missing = subprocess.run(["bash", str(job), "12"], capture_output=True, text=True, timeout=30,
                             env={**env, "MB2PO_TRAIN": "echo"})
    assert missing.returncode != 0 and "not in 0-11" in missing.stderr


@pytest.mark.parametrize("content,problem", [
    (None, "cannot read"),
    ('{"name": "x", "grid": {', "invalid JSON"),
    ({"name": "x", "grid": {"seed": 3}}, "must be a non-empty list"),
    ({"name": "x", "grid": {"seed": [0]}, "tasks": []}, "unknown top-level key"),
])
def test_bad_spec_is_one_error_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.json" if content is None else _spec(tmp_path, content, "bad.json")
    out = _run(SWEEP, path, "print")
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], out.stderr


def test_python_literal_spec(tmp_path):
    spec = _spec(tmp_path, "{'name': 'lit', 'grid': {'seed': [0, 1],},  # trailing comma\n}", "s.py")
    out = _run(SWEEP, spec, "list-workdirs")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [os.path.join("runs/sweeps", "lit", f"seed{s}") for s in (0, 1)]


def _workdir(root, name, *, penalty, seed, results=True, dataset="hopper-medium-replay-local"):
    d = root / name
    d.mkdir(parents=True)
    config = {"seed": seed, "num_seeds": 2, "stages": ["awac", "mb2po"],
              "awac": {"tau": 0.005}, "mb2po": {"penalty_coef": penalty}}
    (d / "config.json").write_text(json.dumps({"identity": {}, "config": config}))
    if results:
        final = {stage: {"return": [100.0 * seed + off, 100.0 * seed + off + 10],
                         "normalized_score": [10.0 * seed + off, 10.0 * seed + off + 1]}
                 for stage, off in (("awac", 1.0), ("mb2po", 2.0))}
        (d / "results.json").write_text(json.dumps({
            "dataset": dataset, "env": "Hopper-v5", "num_seeds": 2, "seed": seed, "preset": "cpu",
            "stages": ["awac", "mb2po"], "final": final, "config": config, "wall_time_s": 1.0}))
    return d


def test_collect_round_trip(tmp_path):
    root = tmp_path / "sweep"
    _workdir(root, "a", penalty=0.5, seed=0)
    _workdir(root, "b", penalty=1.0, seed=3)
    unfinished = _workdir(root, "c", penalty=1.0, seed=4, results=False)
    csv_path, md_path = tmp_path / "out.csv", tmp_path / "out.md"
    out = _run(COLLECT, root, "--csv", csv_path, "--md", md_path)
    assert out.returncode == 0, out.stderr
    assert f"unfinished: {unfinished}" in out.stderr.splitlines()
    assert out.stdout == ""

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # penalty_coef varies; seed is its own column, tau and stages are constant
    assert reader.fieldnames == ["workdir", "dataset", "env", "stage", "seed", "return",
                                 "normalized_score", "mb2po.penalty_coef"]
    assert len(rows) == 2 * 2 * 2  # finished workdirs x stages x seeds
    assert {r["workdir"] for r in rows} == {str(root / "a"), str(root / "b")}
    b_mb2po = [r for r in rows if r["workdir"] == str(root / "b") and r["stage"] == "mb2po"]
    assert [(r["seed"], float(r["return"]), float(r["normalized_score"]), r["mb2po.penalty_coef"])
            for r in b_mb2po] == [("3", 302.0, 32.0, "1.0"), ("4", 312.0, 33.0, "1.0")]

    md = md_path.read_text()
    summary = md.split("## Per-seed results")[0]
    # hopper, mb2po, penalty 1.0: scores 32 and 33 -> mean 32.50, std 0.71
    assert "| hopper-medium-replay-local | mb2po | 1.0 | 2 | 32.50 | 0.71 |" in summary
    assert summary.count("| hopper-medium-replay-local |") == 4  # 2 stages x 2 penalties

    printed = _run(COLLECT, root)
    assert printed.returncode == 0 and printed.stdout == md


def test_collect_corrupt_results_names_the_file(tmp_path):
    _workdir(tmp_path, "a", penalty=0.5, seed=0)
    bad = _workdir(tmp_path, "b", penalty=1.0, seed=1) / "results.json"
    bad.write_text('{"final": ')
    out = _run(COLLECT, tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "corrupt" in lines[0]


def test_collect_overlapping_roots_count_each_workdir_once(tmp_path):
    """`collect.py runs runs/sweeps`, the same root twice, or a symlink to it: one workdir, one set of rows."""
    runs = tmp_path / "runs"
    _workdir(runs / "sweeps", "a", penalty=0.5, seed=0)
    _workdir(runs / "sweeps", "b", penalty=1.0, seed=0, results=False)
    (tmp_path / "link").symlink_to(runs, target_is_directory=True)
    csv_path = tmp_path / "out.csv"
    out = _run(COLLECT, "runs", "runs/sweeps", "runs", "link", "--csv", csv_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [f"unfinished: {os.path.join('runs', 'sweeps', 'b')}",
                                       "collected 1 finished run(s), 4 row(s); 1 unfinished"]
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2  # stages x seeds of workdir a, once

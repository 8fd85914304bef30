"""experiments/benchmark.py: the report on synthetic workdirs (known scores), the run command's commands,
skipping and failure lines (with a stand-in for mb2po-train), and one real smoke run (slow)."""
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "experiments" / "benchmark.py"
DEFAULT = [f"{env}-{kind}-local" for env in ("hopper", "walker2d", "halfcheetah")
           for kind in ("medium-replay", "medium", "medium-expert")]


def _run(*args, env=None, timeout=120):
    env = {**{k: v for k, v in os.environ.items() if k != "MB2PO_TRAIN"}, **(env or {})}
    return subprocess.run([sys.executable, str(BENCHMARK), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _fake_run(root, name, awac, mb2po=None, *, awac_evals=(2000, 4000), mb2po_evals=(2, 4), finished=True,
              preset="cpu", commit="abc123", cap=0.5, used=None, share=None, final_episodes=None,
              recorded_episodes=None):
    """A mb2po-train workdir with AWAC ending at `awac` and MB2PO at `mb2po` (per-seed normalised scores);
    cap: its --max_penalty_share (None: a run from before the cap), used: the lambda per seed it recorded;
    share: its --penalty_share, final_episodes: its --final_eval_episodes (None: runs from before them);
    recorded_episodes: (AWAC, MB2PO) episode counts stored with the final scores (None: not stored)."""
    workdir = root / name
    (workdir / "checkpoints" / "awac").mkdir(parents=True)
    (workdir / "checkpoints" / "awac" / "big.bin").write_bytes(b"\0" * 100)
    seeds = len(awac)
    config = {"awac_steps": 4000, "num_seeds": seeds, "seed": 0, "eval_episodes": 10,
              "mb2po": {"iterations": 4, "updates_per_iteration": 1000, "horizon": 5, "penalty_coef": 1.0,
                        **({} if cap is None else {"max_penalty_share": cap}),
                        **({} if share is None else {"penalty_share": share})},
              **({} if final_episodes is None else {"final_eval_episodes": final_episodes})}
    (workdir / "config.json").write_text(json.dumps({"identity": {"dataset": name}, "preset": preset,
                                                     "config": config}))
    lines = []
    for step in awac_evals:
        lines.append({"stage": "awac", "step": step, "critic_loss": [1.0] * seeds})
        lines.append({"stage": "awac", "step": step, "time": 1.5, "return": [1.0] * seeds,
                      "normalized_score": [a - (4000 - step) / 1000 for a in awac]})
    for it in mb2po_evals if mb2po else ():
        lines.append({"stage": "mb2po", "step": it, "time": 2.5, "return": [2.0] * seeds,
                      "normalized_score": [m - (4 - it) for m in mb2po]})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (workdir / "benchmark.json").write_text(json.dumps({"dataset": name, "launches": [
        {"commit": commit, "budget": preset, "seeds": seeds, "seed": 0},
        {"commit": "refused", "budget": "paper", "seeds": seeds, "seed": 0}]}))
    if finished:
        final = {"awac": {"normalized_score": awac, "return": [1.0] * seeds},
                 "mb2po": {"normalized_score": mb2po, "return": [2.0] * seeds,
                           **({} if used is None else {"penalty_coef": used})}}
        for stage, episodes in zip(("awac", "mb2po"), recorded_episodes or ()):
            final[stage]["episodes"] = episodes
        (workdir / "results.json").write_text(json.dumps({"dataset": name, "preset": preset, "num_seeds": seeds,
                                                          "final": final, "config": config}))


def _row(md, name):
    (row,) = [l for l in md.splitlines() if l.startswith(f"| {name} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_names_the_share_rule_and_the_final_episodes(tmp_path):
    """Runs under issue 18's rule: lambda shown as set per seed, the rule and its choice stated in the notes,
    final scores' episode count beside the curves'."""
    runs = tmp_path / "runs"
    _fake_run(runs, "walker2d-medium-local", [30.0, 40.0, 20.0], [31.0, 33.0, 32.0], used=[0.51, 0.47, 0.51],
              share=0.5, final_episodes=100)
    out = tmp_path / "results"
    done = _run("report", "--workdir", runs, "--out", out)
    md = (out / "benchmark.md").read_text()
    assert _row(md, "walker2d-medium-local")[2] == "5, set: 0.51, 0.47, 0.51", done.stderr
    assert "`--penalty_share`" in md and "reports every candidate tried" in md
    assert "h from MOPO's per-task table" in md and "caps each seed's lambda" not in md  # the cap: table lambdas
    assert "--workdir WORKDIR` at the commits above" in md  # not a path the runs may not have used
    assert "evaluation episodes per seed: 10 (curves), 100 (final scores" in md
    # A final score's own episode count wins over the settings (an MB2PO stage restarted under a preset
    # with another count than its kept AWAC stage had).
    mixed = tmp_path / "mixed"
    _fake_run(mixed, "walker2d-medium-local", [30.0, 40.0, 20.0], [31.0, 33.0, 32.0], used=[0.51, 0.47, 0.51],
              share=0.5, final_episodes=100, recorded_episodes=(10, 100))
    done = _run("report", "--workdir", mixed, "--out", tmp_path / "mixed_results")
    md = (tmp_path / "mixed_results" / "benchmark.md").read_text()
    assert "10 (curves), 10 (1), 100 (1) (final scores" in md, done.stderr


def test_report_table_curves_and_copies_that_regenerate_it(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "hopper-medium-replay-local", [20.0, 30.0, 25.0], [40.0, 50.0, 60.0], used=[1.0, 1.0, 1.0])
    _fake_run(runs, "walker2d-medium-expert-local", [90.0, 92.0, 94.0], [80.0, 85.0, 90.0], commit="def456",
              used=[0.3, 1.0, 0.2])
    _fake_run(runs, "halfcheetah-medium-local", [40.0, 41.0, 42.0], [42.0, 44.0, 40.0], cap=None)
    _fake_run(runs, "hopper-medium-local", [10.0, 11.0, 12.0], awac_evals=(2000,), finished=False)
    _fake_run(runs, "hopper-expert-local", [100.0, 110.0, 120.0], [1.0, 2.0, 3.0], mb2po_evals=(2,),
              finished=False)
    out = tmp_path / "results"
    done = _run("report", "--workdir", runs, "--out", out)
    assert (out / "benchmark.md").is_file(), done.stderr
    md = (out / "benchmark.md").read_text()

    assert _row(md, "hopper-medium-replay-local") == [
        "hopper-medium-replay-local", "done", "5, 1.0", "25.0 ± 5.0 (20.0, 30.0, 25.0)",
        "50.0 ± 10.0 (40.0, 50.0, 60.0)", "+25.0 ± 8.7 (+20.0, +20.0, +35.0)", "+53.0 (29.0 -> 82.0)"]
    assert _row(md, "walker2d-medium-expert-local")[2] == "5, 1.0 (capped: 0.3, 1, 0.2)"  # lambda per seed
    assert _row(md, "halfcheetah-medium-local")[2] == "5, 1.0 (before the cap)"
    assert "caps each seed's lambda" in md
    assert _row(md, "walker2d-medium-expert-local")[5:] == [
        "-7.0 ± 3.0 (-10.0, -7.0, -4.0)", "degrades (no number; AWAC 93.2)"]
    assert _row(md, "halfcheetah-medium-local")[5:] == ["+1.0 ± 2.6 (+2.0, +3.0, -2.0)", "+4.3 (41.2 -> 45.5)"]
    # Unfinished: AWAC's final score once its last evaluation is in, the rest pending.
    assert _row(md, "hopper-medium-local")[1:] == [
        "running (awac 2000/4000)", "5, 1.0", "running", "running", "running", "not in Table 1"]
    assert _row(md, "hopper-expert-local")[1:6] == [
        "running (mb2po 2/4)", "5, 1.0", "110.0 ± 10.0 (100.0, 110.0, 120.0)", "running", "running"]
    assert _row(md, "walker2d-medium-replay-local")[1:6] == ["not started", "", "-", "-", "-"]
    table = [l for l in md.splitlines() if l.startswith("| ") and "-local" in l]
    assert [r.split(" | ")[0][2:] for r in table] == [
        "hopper-medium-replay-local", "hopper-medium-local", "hopper-medium-expert-local", "hopper-expert-local",
        *DEFAULT[3:]]
    assert ("MB2PO improved the mean normalised score on 2 of 3 finished datasets (every seed improved on 1); "
            "largest loss: walker2d-medium-expert-local (-7.0).") in md
    assert "agrees with the paper's Table 1 on 3 of the 3 finished datasets" in md
    assert "Budget (`mb2po-train --preset`): cpu." in md and "Seeds per dataset: 3 (base seed 0)" in md
    assert "Commits: abc123, def456." in md  # not the launch with other settings

    copy = out / "runs" / "hopper-medium-replay-local"
    assert sorted(p.name for p in copy.iterdir()) == ["benchmark.json", "config.json", "evals.jsonl",
                                                      "results.json"]
    evals = [json.loads(l) for l in (copy / "evals.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in evals] == [("awac", 2000), ("awac", 4000), ("mb2po", 2), ("mb2po", 4)]
    assert not (out / "runs" / "hopper-medium-local" / "results.json").exists()

    # The committed copies alone give the same file, byte for byte: in place, and copied elsewhere.
    again = _run("report", "--from", out / "runs", "--out", out, "--no_plots")
    assert again.returncode == 0, again.stderr
    assert (out / "benchmark.md").read_text() == md
    moved = tmp_path / "moved"
    elsewhere = _run("report", "--from", out / "runs", "--out", moved, "--no_plots")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (moved / "benchmark.md").read_bytes() == (out / "benchmark.md").read_bytes()
    for f in (out / "runs").rglob("*"):
        if f.is_file():
            assert (moved / "runs" / f.relative_to(out / "runs")).read_bytes() == f.read_bytes()
    # An unfinished run removed from the workdir root leaves the copies too; a finished run's copy stays
    # (its workdir may have been lost with a machine), and so does its row.
    shutil.rmtree(runs / "hopper-expert-local")
    shutil.rmtree(runs / "halfcheetah-medium-local")
    again = _run("report", "--workdir", runs, "--out", moved, "--no_plots")
    assert again.returncode == 0 and "kept the finished run" in again.stderr, again.stderr
    assert not (moved / "runs" / "hopper-expert-local").exists() and "hopper-expert-local" not in (
        moved / "benchmark.md").read_text()
    assert _row((moved / "benchmark.md").read_text(), "halfcheetah-medium-local") == _row(md, "halfcheetah-medium-local")

    if importlib.util.find_spec("matplotlib") is None:  # an optional dependency (the "plot" extra)
        assert done.returncode == 1 and done.stderr.startswith("error: plots need matplotlib")
        return
    curves = {p.name for p in out.glob("benchmark_*.png")}
    assert curves == {f"benchmark_{n}.png" for n in ("hopper-medium-replay-local", "walker2d-medium-expert-local",
                                                      "halfcheetah-medium-local", "hopper-medium-local",
                                                      "hopper-expert-local")}
    assert done.returncode == 0, done.stderr
    assert all((out / c).stat().st_size > 10_000 for c in curves)
    # The unfinished run gone from the workdir root takes its curve with it.
    again = _run("report", "--workdir", runs, "--out", out)
    assert again.returncode == 0, again.stderr
    assert {p.name for p in out.glob("benchmark_*.png")} == curves - {"benchmark_hopper-expert-local.png"}


def test_report_before_any_run(tmp_path):
    (tmp_path / "runs").mkdir()
    done = _run("report", "--workdir", tmp_path / "runs", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert all(_row(md, n)[1] == "not started" for n in DEFAULT)
    assert "none of the 9 datasets has finished yet" in md
    missing = _run("report", "--workdir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert missing.returncode == 1 and missing.stderr.strip().endswith("nowhere: not a directory")


def test_dry_run_prints_one_train_command_per_dataset_and_skips_finished(tmp_path):
    from mb2po_jax import config as config_lib

    work = tmp_path / "bench"
    env = {"MB2PO_DATA_DIR": str(tmp_path / "data")}
    out = _run("run", "--budget", "cpu", "--seeds", "3", "--workdir", work, "--dry_run", env=env)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(l) for l in out.stdout.splitlines()]
    train = [c for c in commands if c[1:3] == ["-m", "mb2po_jax.train"]]
    generate = [c for c in commands if c[1:3] == ["-m", "mb2po_jax.data.cli"]]
    assert len(train) == 9 and len(generate) == 9 and len(commands) == 18
    assert [c[3] for c in train] == [f"--dataset={n}" for n in DEFAULT]
    assert train[0][4:] == ["--stages=awac,dynamics,mb2po", "--preset=cpu", "--num_seeds=3", "--seed=0",
                            f"--workdir={work / DEFAULT[0]}"]
    assert generate[0][3:] == ["generate", "--env", "hopper", "--kind", "medium-replay"]
    assert not work.exists()

    # A finished run of this configuration is skipped; its dataset file present, nothing to generate.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hopper_medium_replay-local.hdf5").write_bytes(b"")
    expected = config_lib.make_config("smoke", {"num_seeds": 2, "seed": 0, "stages": ("awac", "dynamics", "mb2po")},
                                      config_lib.task_defaults(DEFAULT[0]))
    (work / DEFAULT[0]).mkdir(parents=True)
    (work / DEFAULT[0] / "results.json").write_text(json.dumps({
        "dataset": DEFAULT[0], "preset": "smoke", "final": {"awac": {}, "mb2po": {}},
        "config": json.loads(json.dumps(config_lib.to_dict(expected)))}))
    args = ["run", "--budget", "smoke", "--seeds", "2", "--workdir", work, "--dry_run", "--kinds",
            "medium-replay,random"]
    out = _run(*args, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"# {DEFAULT[0]}: finished, skipped: ")
    assert [shlex.split(l)[3] for l in lines[1:] if "mb2po_jax.train" in l] == [
        "--dataset=hopper-random-local", *(f"--dataset={e}-{k}-local" for e in ("walker2d", "halfcheetah")
                                           for k in ("medium-replay", "random"))]
    other = _run(*[a if a != "2" else "3" for a in args], env=env)  # other seeds: not this run's results
    assert shlex.split(other.stdout.splitlines()[0])[3] == f"--dataset={DEFAULT[0]}"

    bad = _run("run", "--datasets", "hopper-medium-v2", "--dry_run", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --datasets: hopper-medium-v2 not ")


FAKE_TRAIN = """
import json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
if flags["dataset"].startswith("walker2d"):
    print("progress\\nerror: walker2d failed on purpose\\n", file=sys.stderr)
    sys.exit(3)
os.makedirs(flags["workdir"], exist_ok=True)
with open(os.path.join(flags["workdir"], "results.json"), "w") as f:
    json.dump({"dataset": flags["dataset"], "num_seeds": 2, "final": {
        "awac": {"normalized_score": [10.0, 20.0]}, "mb2po": {"normalized_score": [30.0, 40.0]}}}, f)
"""


def test_run_progress_log_and_failures(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    data = tmp_path / "data"
    data.mkdir()
    for n in ("hopper_medium_replay", "walker2d_medium_replay", "halfcheetah_medium_replay"):
        (data / f"{n}-local.hdf5").write_bytes(b"")
    env = {"MB2PO_DATA_DIR": str(data), "MB2PO_TRAIN": f"{sys.executable} {fake}"}
    work = tmp_path / "bench"
    args = ["run", "--budget", "smoke", "--seeds", "2", "--workdir", work, "--kinds", "medium-replay"]
    out = _run(*args, env=env)
    assert out.returncode == 1
    assert ("error: walker2d-medium-replay-local: mb2po-train exited with status 3: error: walker2d failed on "
            "purpose") in out.stderr
    assert "[1/3] hopper-medium-replay-local: finished in " in out.stdout
    assert "AWAC 15.0 -> AWAC+MB2PO 35.0 (mean normalised score over 2 seeds)" in out.stdout
    assert "halfcheetah" not in out.stdout + out.stderr  # stopped at the failure
    log = (work / "benchmark.log").read_text()
    assert "hopper-medium-replay-local: finished in" in log and "error: walker2d-medium-replay-local" in log
    launch = json.loads((work / "hopper-medium-replay-local" / "benchmark.json").read_text())
    assert launch["launches"][0]["budget"] == "smoke" and launch["launches"][0]["seeds"] == 2

    out = _run(*args, "--keep_going", env=env)
    assert out.returncode == 1
    assert "[3/3] halfcheetah-medium-replay-local: finished in " in out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: benchmark: 2 finished, 0 skipped, 1 failed in ")


@pytest.mark.slow
def test_smoke_benchmark_runs_then_skips(tmp_path):
    """The real thing at the smoke preset, 1 seed, on a 3,000-row dataset the benchmark generates
    (about 4 minutes on the 2-core dev CPU)."""
    env = {"MB2PO_DATA_DIR": str(tmp_path / "data")}
    work = tmp_path / "bench"
    args = ["run", "--budget", "smoke", "--seeds", "1", "--datasets", DEFAULT[0], "--workdir", work,
            "--data_size", "3000"]
    first = _run(*args, env=env, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"[1/1] {DEFAULT[0]}: dataset generated in " in first.stdout
    assert f"[1/1] {DEFAULT[0]}: finished in " in first.stdout
    results = json.loads((work / DEFAULT[0] / "results.json").read_text())
    assert len(results["final"]["mb2po"]["normalized_score"]) == 1
    second = _run(*args, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"[1/1] {DEFAULT[0]}: skipped (finished" in second.stdout
    assert "benchmark: 0 finished, 1 skipped, 0 failed" in second.stdout
    report = _run("report", "--workdir", work, "--out", tmp_path / "results", env=env)
    assert report.returncode == 0, report.stderr
    assert _row((tmp_path / "results" / "benchmark.md").read_text(), DEFAULT[0])[1] == "done"
    assert (tmp_path / "results" / f"benchmark_{DEFAULT[0]}.png").is_file()

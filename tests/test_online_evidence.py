"""experiments/online_evidence.py without training: the run command's commands (dry run, the awac_online
restart rule), a whole run with stand-ins for mb2po-train and mb2po-data (copies, skipping, resuming after a
failure), the report's table from known per-seed numbers and its byte-for-byte regeneration from the copies,
and bad input as one error line."""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "online_evidence.py"
HMR, WMR = "hopper-medium-replay-local", "walker2d-medium-replay-local"
REQUIRED = ("awac_online", "mb2po_online", "mb2po_online_model")


def _run(*args, env=None, timeout=180):
    base = {k: v for k, v in os.environ.items() if k not in ("MB2PO_TRAIN", "MB2PO_DATA_CLI")}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


def _data_dir(tmp_path):
    """A data directory where both datasets exist (empty files: nothing reads them here)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("hopper_medium_replay", "walker2d_medium_replay"):
        (data / f"{name}-local.hdf5").write_bytes(b"")
    return data


def _flags(command):
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in command if a.startswith("--"))


def test_dry_run_commands_and_the_awac_online_restart_rule(tmp_path):
    base_root, work = tmp_path / "bench", tmp_path / "online"
    env = {"MB2PO_DATA_DIR": str(tmp_path / "nodata")}
    out = _run("run", "--base_root", base_root, "--workdir", work, "--datasets", HMR, "--dry_run", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    commands = [shlex.split(l) for l in lines if not l.startswith("#")]
    assert commands[0][1:] == ["-m", "mb2po_jax.data.cli", "generate", "--env", "hopper", "--kind", "medium-replay"]
    # The base: exactly the benchmark's command (its workdir is reused by the arms).
    assert commands[1][1:] == ["-m", "mb2po_jax.train", f"--dataset={HMR}", "--stages=awac,dynamics,mb2po",
                               "--preset=cpu", "--num_seeds=3", "--seed=0", f"--workdir={base_root / HMR}"]
    train = {_flags(c)["workdir"].rsplit("/", 1)[1]: c for c in commands[2:] if "mb2po_jax.train" in c}
    assert sorted(train) == sorted(REQUIRED)
    common = ["-m", "mb2po_jax.train", f"--dataset={HMR}", "--stages=online", "--preset=cpu", "--num_seeds=3",
              "--seed=0", "--online_steps=100000"]
    assert train["awac_online"][1:] == common + ["--restart_from=mb2po", f"--workdir={work / HMR / 'awac_online'}"]
    assert train["mb2po_online"][1:] == common + [f"--workdir={work / HMR / 'mb2po_online'}"]
    assert train["mb2po_online_model"][1:] == common + ["--online_model",
                                                        f"--workdir={work / HMR / 'mb2po_online_model'}"]
    assert f"# copy {base_root / HMR} -> {work / HMR / 'awac_online'}" in lines
    sac = [c for c in commands if "train-behavior" in c]
    assert [c[3:] for c in sac] == [["train-behavior", "--env", "hopper", "--workdir",
                                     str(work / HMR / "sac_scratch" / f"sac_seed{s}"), "--total_steps", "100000",
                                     "--seed", str(s)] for s in range(3)]
    assert not work.exists() and not base_root.exists()

    # The option arms and other settings.
    out = _run("run", "--base_root", base_root, "--workdir", work, "--datasets", f"{HMR},{WMR}", "--dry_run",
               "--arms", "mb2po_online_anneal,mb2po_online_warmup", "--seeds", "2", "--online_steps", "30000",
               env=env)
    assert out.returncode == 0, out.stderr
    train = [shlex.split(l) for l in out.stdout.splitlines() if "--stages=online" in l]
    assert [_flags(c)["workdir"] for c in train] == [str(work / d / a) for d in (HMR, WMR)
                                                     for a in ("mb2po_online_warmup", "mb2po_online_anneal")]
    assert train[0][-3:-1] == ["--online_steps=30000", "--online_warmup_steps=5000"]
    assert train[1][-4:-1] == ["--online_steps=30000", "--online_ratio_start=0.0",
                               "--online_ratio_anneal_steps=20000"]
    assert "--num_seeds=2" in train[0] and not any("restart_from" in a for c in train for a in c)

    # The restart rule on an existing copy: passed while the online stage has no checkpoint, never after.
    copy = work / HMR / "awac_online"
    (copy / "checkpoints" / "mb2po" / "50").mkdir(parents=True)
    args = ["run", "--base_root", base_root, "--workdir", work, "--datasets", HMR, "--arms", "awac_online",
            "--dry_run"]
    out = _run(*args, env=env)
    assert out.returncode == 0 and "--restart_from=mb2po" in out.stdout and "# copy" not in out.stdout
    (copy / "checkpoints" / "online" / "10000").mkdir(parents=True)
    out = _run(*args, env=env)  # both stages: refused
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "both an MB2PO and an online" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    (copy / "checkpoints" / "mb2po" / "50").rmdir()
    out = _run(*args, env=env)
    awac = [l for l in out.stdout.splitlines() if "--stages=online" in l]
    assert out.returncode == 0 and len(awac) == 1 and "restart_from" not in awac[0]


FAKE = r'''
import json, os, shutil, sys
calls = os.environ["FAKE_CALLS"]
if sys.argv[1] == "train-behavior":  # mb2po-data train-behavior --env E --workdir W --total_steps N --seed S
    a = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    w, n, seed = a["--workdir"], int(a["--total_steps"]), int(a["--seed"])
    os.makedirs(os.path.join(w, "checkpoints", str(n)))
    json.dump({"env_id": "Hopper-v5", "seed": seed, "config": {"total_steps": n}},
              open(os.path.join(w, "run.json"), "w"))
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        for step in range(5000, n + 1, 5000):
            score = 5.0 + 2 * seed - (n - step) / 1000
            f.write(json.dumps({"stage": "behavior", "step": step, "return": -20.272305 + score / 100 * 3254.572305,
                                "normalized_score": score}) + "\n")
    with open(calls, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
    sys.exit(0)
flags = dict(x[2:].split("=", 1) if "=" in x else (x[2:], "true") for x in sys.argv[1:])
w, seeds = flags["workdir"], int(flags["num_seeds"])
arm = os.path.basename(w)
results_path = os.path.join(w, "results.json")
results = json.load(open(results_path)) if os.path.exists(results_path) else {}
if flags["stages"] == "awac,dynamics,mb2po":
    for stage, step in (("awac", 100000), ("dynamics", 20000), ("mb2po", 50)):
        os.makedirs(os.path.join(w, "checkpoints", stage, str(step)))
    open(os.path.join(w, ".lock"), "w").write("123")
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "awac", "step": 100000, "normalized_score": [20.0] * seeds}) + "\n")
        f.write(json.dumps({"stage": "mb2po", "step": 50, "normalized_score": [30.0] * seeds}) + "\n")
    config = {"num_seeds": seeds, "seed": 0, "stages": ["awac", "dynamics", "mb2po"]}
    results = {"dataset": flags["dataset"], "preset": flags["preset"], "num_seeds": seeds, "config": config,
               "final": {"awac": {"normalized_score": [20.0] * seeds}, "mb2po": {"normalized_score": [30.0] * seeds}}}
    json.dump({"config": config, "preset": flags["preset"]}, open(os.path.join(w, "config.json"), "w"))
    json.dump(results, open(results_path, "w"))
    with open(calls, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
    sys.exit(0)
# --stages=online
if "restart_from" in flags:
    for stage in ("mb2po", "online"):
        shutil.rmtree(os.path.join(w, "checkpoints", stage), ignore_errors=True)
        results.get("final", {}).pop(stage, None)
    lines = [l for l in open(os.path.join(w, "metrics.jsonl")) if json.loads(l)["stage"] not in ("mb2po", "online")]
    open(os.path.join(w, "metrics.jsonl"), "w").writelines(lines)
    json.dump(results, open(results_path, "w"))  # as mb2po-train's restart: at once
source = "mb2po" if os.path.isdir(os.path.join(w, "checkpoints", "mb2po")) else "awac"
resumed = os.path.isdir(os.path.join(w, "checkpoints", "online"))
with open(calls, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "source": source, "resumed": resumed,
                        "files": sorted(os.listdir(w)), "lock": os.path.exists(os.path.join(w, ".lock"))}) + "\n")
n = int(flags["online_steps"])
curves = json.loads(os.environ["FAKE_CURVES"])[arm]  # per seed: scores at steps 0, n/10, n/2, n
os.makedirs(os.path.join(w, "checkpoints", "online", str(n // 2)), exist_ok=True)
fail = os.environ.get("FAKE_FAIL")
marker = os.environ["FAKE_MARKER"]
if fail == arm and not os.path.exists(marker):
    open(marker, "w").close()
    print("error: killed on purpose", file=sys.stderr)
    sys.exit(3)
os.makedirs(os.path.join(w, "checkpoints", "online", str(n)))
steps = [0, n // 10, n // 2, n]
with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    for i, step in enumerate(steps):
        f.write(json.dumps({"stage": "online", "step": step, "critic_loss": [1.0] * seeds}) + "\n")
        f.write(json.dumps({"stage": "online", "step": step, "return": [1.0] * seeds,
                            "normalized_score": [c[i] for c in curves]}) + "\n")
depth = [max(0.0, c[0] - c[1]) for c in curves]
recover = [next((s for s, x in zip(steps[1:], c[1:]) if x > c[0]), None) for c in curves]
online = {"steps": n, "model": "online_model" in flags, "warmup_steps": int(flags.get("online_warmup_steps", 0)),
          "ratio_start": float(flags.get("online_ratio_start", 0.0)),
          "ratio_anneal_steps": int(flags.get("online_ratio_anneal_steps", 0)), "eval_every": 5000}
config = {"num_seeds": seeds, "seed": 0, "stages": ["online"], "online": online, "eval_episodes": 10}
results.update(dataset=flags["dataset"], preset=flags["preset"], config=config)
results.setdefault("final", {})["online"] = {
    "return": [1.0] * seeds, "normalized_score": [c[-1] for c in curves], "start_score": [c[0] for c in curves],
    "collapse_depth": depth, "steps_to_recover": recover}
json.dump({"config": config, "preset": flags["preset"]}, open(os.path.join(w, "config.json"), "w"))
json.dump(results, open(results_path, "w"))
'''

# Per arm, per seed: normalised scores at online steps 0, 10 %, 50 %, 100 %.
CURVES = {
    "awac_online": [[10.0, 5.0, 15.0, 40.0], [20.0, 20.0, 18.0, 20.0], [30.0, 27.5, 29.0, 60.0]],
    "mb2po_online": [[30.0, 10.0, 25.0, 31.0], [32.0, 12.0, 30.0, 33.0], [34.0, 14.0, 35.0, 35.0]],
    "mb2po_online_model": [[30.0, 31.0, 32.0, 33.0], [32.0, 33.0, 34.0, 35.0], [34.0, 35.0, 36.0, 37.0]],
}


def _row(md, dataset, arm):
    section = md.split(f"## {dataset}\n", 1)[1].split("\n## ", 1)[0]
    (row,) = [l for l in section.splitlines() if f"(`{arm}`)" in l]
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_run_with_stand_ins_then_report_and_regenerate(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    env = {"MB2PO_DATA_DIR": str(_data_dir(tmp_path)), "MB2PO_TRAIN": f"{sys.executable} {fake}",
           "MB2PO_DATA_CLI": f"{sys.executable} {fake}", "FAKE_CALLS": str(calls), "FAKE_CURVES": json.dumps(CURVES),
           "FAKE_FAIL": "awac_online", "FAKE_MARKER": str(tmp_path / "failed_once")}
    base_root, work = tmp_path / "bench", tmp_path / "online"
    args = ["run", "--base_root", base_root, "--workdir", work, "--datasets", HMR, "--online_steps", "10000"]

    # First run: the base is trained, then awac_online fails after its online stage saved a checkpoint.
    first = _run(*args, env=env)
    assert first.returncode == 1
    assert first.stderr.strip().splitlines()[-1].startswith(
        f"error: {HMR} awac_online: mb2po-train exited with status 3: error: killed on purpose (after ")
    assert f"[1/1] {HMR} base: finished in " in first.stdout
    assert "mb2po_online: started" not in first.stdout  # stopped at the failure
    second = _run(*args, env=env)
    assert second.returncode == 0, second.stderr
    log = (work / "online_evidence.log").read_text()
    assert "base /" in log and "finished (final.mb2po with this configuration), reused" in log
    assert f"[1/1] {HMR} awac_online: finished in " in second.stdout
    assert "start 20.0 -> final 40.0, collapse depth 2.5 (means of normalised scores over 3 seeds)" in second.stdout
    assert "online evidence: 6 finished, 0 skipped, 0 failed in " in second.stdout

    records = [json.loads(l) for l in calls.read_text().splitlines()]
    online = [r for r in records if "source" in r]
    by_arm = {}
    for r in online:
        by_arm.setdefault(_flags(r["argv"])["workdir"].rsplit("/", 1)[1], []).append(r)
    # awac_online: restarted (the AWAC agent) on the fresh copy, resumed without the restart after the failure.
    first_call, resumed = by_arm["awac_online"]
    assert "restart_from" in _flags(first_call["argv"]) and first_call["source"] == "awac"
    assert "restart_from" not in _flags(resumed["argv"]) and resumed["source"] == "awac" and resumed["resumed"]
    assert [(r["source"], r["resumed"], r["lock"]) for a in ("mb2po_online", "mb2po_online_model")
            for r in by_arm[a]] == [("mb2po", False, False)] * 2
    assert not (work / HMR / "awac_online" / "checkpoints" / "mb2po").exists()
    assert (work / HMR / "mb2po_online" / "checkpoints" / "mb2po" / "50").is_dir()
    sac = [r["argv"] for r in records if r["argv"][0] == "train-behavior"]
    assert [s[s.index("--seed") + 1] for s in sac] == ["0", "1", "2"]
    launch = json.loads((work / HMR / "mb2po_online_model" / "online_evidence.json").read_text())
    assert launch["launches"][0]["flags"] == ["--online_model"] and launch["launches"][0]["online_steps"] == 10000

    # Everything finished: a rerun skips it all; other settings are other runs.
    third = _run(*args, env=env)
    assert third.returncode == 0, third.stderr
    assert "online evidence: 0 finished, 6 skipped, 0 failed" in third.stdout
    dry = _run(*args[:-1], "20000", "--dry_run", env=env)
    assert dry.returncode == 0 and f"# {HMR}: base finished, reused" in dry.stdout
    assert sum("--stages=online" in l for l in dry.stdout.splitlines()) == 3
    assert "restart_from" not in dry.stdout  # the awac_online branch's online stage has its checkpoint

    out = tmp_path / "results"
    out.mkdir()
    (out / f"online_{WMR}.png").write_bytes(b"an older figure")  # walker2d has no evaluations among the copies
    done = _run("report", "--workdir", work, "--out", out)
    assert f"removed {out / f'online_{WMR}.png'}: no arm of that dataset with evaluations" in done.stdout
    assert not (out / f"online_{WMR}.png").exists()
    assert done.returncode == (0 if importlib.util.find_spec("matplotlib") else 1), done.stderr  # the plot extra
    md = (out / "online.md").read_text()
    assert _row(md, HMR, "awac_online") == [
        "done", "20.0 ± 10.0 (10.0, 20.0, 30.0)", "40.0 ± 20.0 (40.0, 20.0, 60.0)", "2.5 ± 2.5 (5.0, 0.0, 2.5)",
        "7,500 ± 3,536 (5,000, never, 10,000; mean of the 2 that recovered)"]
    assert _row(md, HMR, "mb2po_online") == [
        "done", "32.0 ± 2.0 (30.0, 32.0, 34.0)", "33.0 ± 2.0 (31.0, 33.0, 35.0)", "20.0 ± 0.0 (20.0, 20.0, 20.0)",
        "8,333 ± 2,887 (10,000, 10,000, 5,000)"]
    assert _row(md, HMR, "mb2po_online_model")[1:] == [
        "32.0 ± 2.0 (30.0, 32.0, 34.0)", "35.0 ± 2.0 (33.0, 35.0, 37.0)", "0.0 ± 0.0 (0.0, 0.0, 0.0)",
        "1,000 ± 0 (1,000, 1,000, 1,000)"]
    assert _row(md, HMR, "sac_scratch") == ["done", "-", "7.0 ± 2.0 (5.0, 7.0, 9.0)", "-", "-"]
    assert _row(md, WMR, "awac_online") == ["not started", "-", "-", "-", "-"]
    assert "option arms" not in md.lower()
    assert "Budget (`mb2po-train --preset`): cpu. Seeds: 3 (base seed 0). Online environment steps per seed: " \
           "10000; evaluations every 5000 steps, 10 deterministic episodes" in md

    copy = out / "online_runs" / HMR
    assert sorted(p.name for p in (copy / "awac_online").iterdir()) == [
        "config.json", "evals.jsonl", "online_evidence.json", "results.json"]
    evals = [json.loads(l) for l in (copy / "awac_online" / "evals.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in evals] == [("online", s) for s in (0, 1000, 5000, 10000)]
    assert sorted(p.name for p in (copy / "sac_scratch" / "sac_seed2").iterdir()) == ["evals.jsonl", "run.json"]

    # The copies alone give the same file, byte for byte: in place, and copied elsewhere.
    again = _run("report", "--from", out / "online_runs", "--out", out, "--no_plots")
    assert again.returncode == 0, again.stderr
    assert (out / "online.md").read_text() == md
    moved = tmp_path / "moved"
    elsewhere = _run("report", "--from", out / "online_runs", "--out", moved, "--no_plots")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (moved / "online.md").read_bytes() == (out / "online.md").read_bytes()

    if importlib.util.find_spec("matplotlib") is None:
        assert done.returncode == 1 and done.stderr.startswith("error: plots need matplotlib")
    else:
        assert (out / f"online_{HMR}.png").stat().st_size > 10_000


def test_option_arms_and_unfinished_rows(tmp_path):
    """Hand-written copies: an unfinished arm shows its start score, and the option arms their note."""
    runs = tmp_path / "runs" / HMR
    warm = runs / "mb2po_online_warmup"
    warm.mkdir(parents=True)
    config = {"num_seeds": 2, "online": {"steps": 10000, "eval_every": 1000}}
    (warm / "config.json").write_text(json.dumps({"config": config, "preset": "cpu"}))
    (warm / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"stage": "online", "step": 0, "normalized_score": [10.0, 14.0]},
        {"stage": "online", "step": 2000, "normalized_score": [11.0, 15.0]})))
    copied = runs / "mb2po_online"  # a copy of the base whose online stage has not run yet
    copied.mkdir()
    base_config = {"num_seeds": 2, "stages": ["awac", "dynamics", "mb2po"]}
    (copied / "config.json").write_text(json.dumps({"config": base_config, "preset": "cpu"}))
    (copied / "results.json").write_text(json.dumps({"config": base_config, "final": {"mb2po": {}}}))
    sac = runs / "sac_scratch" / "sac_seed0"
    sac.mkdir(parents=True)
    (sac / "run.json").write_text(json.dumps({"env_id": "Hopper-v5", "seed": 0, "config": {"total_steps": 10000}}))
    (sac / "evals.jsonl").write_text(json.dumps({"stage": "behavior", "step": 5000, "return": 100.0}) + "\n")
    out = tmp_path / "out"
    done = _run("report", "--from", tmp_path / "runs", "--out", out, "--no_plots")
    assert done.returncode == 0, done.stderr
    md = (out / "online.md").read_text()
    assert _row(md, HMR, "mb2po_online_warmup") == ["running (online 2,000/10,000)", "12.0 ± 2.8 (10.0, 14.0)",
                                                    "running", "running", "running"]
    assert _row(md, HMR, "sac_scratch") == ["running (sac 5,000/10,000)", "-", "running", "-", "-"]
    assert _row(md, HMR, "mb2po_online") == ["not started", "-", "-", "-", "-"]
    assert "`--online_warmup_steps=5000` and `--online_ratio_start=0.0 --online_ratio_anneal_steps=20000`" in md
    assert (out / "online_runs" / HMR / "mb2po_online_warmup" / "evals.jsonl").read_text() == (
        warm / "evals.jsonl").read_text()


def test_bad_input_is_one_error_line(tmp_path):
    for args, message in (
            (("run", "--datasets", "hopper-medium-v2", "--dry_run"), "error: --datasets: hopper-medium-v2: not "),
            (("run", "--arms", "awac_online,td3", "--dry_run"), "error: --arms: td3; choose from "),
            (("run", "--online_steps", "12000", "--dry_run"), "error: --online_steps=12000: with the sac_scratch"),
            (("report", "--workdir", tmp_path / "nowhere", "--out", tmp_path / "out"), "error: "),
    ):
        out = _run(*args, "--workdir" if args[0] == "run" else "--out", tmp_path / "w",
                   env={"MB2PO_DATA_DIR": str(tmp_path / "d")})
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.startswith(message), (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    missing = _run("report", "--workdir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a directory"


def test_report_computes_the_collapse_figures_from_the_evaluations(tmp_path):
    # An arm run by an older commit: results.json's steps_to_recover (2,000) is the first evaluation above the
    # start, before the collapse. The table takes the library's figures from the evaluations: seed 0 rose,
    # fell 40 points inside the first 10 % and never came back (never), seed 1 fell and came back at 8,000.
    arm = tmp_path / "online" / HMR / "mb2po_online"
    arm.mkdir(parents=True)
    steps, curves = [0, 2000, 5000, 8000, 50000], [[50.0, 51.0, 10.0, 40.0, 45.0], [30.0, 20.0, 25.0, 31.0, 32.0]]
    config = {"num_seeds": 2, "seed": 0, "stages": ["online"], "eval_episodes": 10,
              "online": {"steps": 50000, "model": False, "warmup_steps": 0, "ratio_start": 0.0,
                         "ratio_anneal_steps": 0, "eval_every": 1000}}
    with open(arm / "metrics.jsonl", "w") as f:
        for i, step in enumerate(steps):
            f.write(json.dumps({"stage": "online", "step": step, "return": [1.0, 1.0],
                                "normalized_score": [c[i] for c in curves]}) + "\n")
    final = {"return": [1.0, 1.0], "normalized_score": [45.0, 32.0], "start_score": [50.0, 30.0],
             "collapse_depth": [40.0, 10.0], "steps_to_recover": [2000, 8000]}
    (arm / "results.json").write_text(json.dumps({"dataset": HMR, "preset": "cpu", "config": config,
                                                  "final": {"online": final}}))
    (arm / "config.json").write_text(json.dumps({"config": config, "preset": "cpu"}))
    out = tmp_path / "results"
    done = _run("report", "--workdir", tmp_path / "online", "--out", out, "--no_plots")
    assert done.returncode == 0, done.stderr
    assert _row((out / "online.md").read_text(), HMR, "mb2po_online") == [
        "done", "40.0 ± 14.1 (50.0, 30.0)", "38.5 ± 9.2 (45.0, 32.0)", "25.0 ± 21.2 (40.0, 10.0)",
        "8,000 (never, 8,000; mean of the 1 that recovered)"]

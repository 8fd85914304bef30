"""A run's record survives kills, damage, races and divergence: one process per workdir, damaged checkpoints
skipped, damaged files refused by name, non-finite training stopped before it is saved, results.json true
to the workdir, bad flags refused before any work, and a signal stops at the current call."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mb2po_jax import config as config_lib
from mb2po_jax import pipeline
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.errors import ConfigError
from test_pipeline import TINY, _train, _write_hopper_file

AWAC = ["--preset=smoke", "--steps_per_call=10", "--checkpoint_every=10", *TINY]
# The tiniest three-stage run (tests/test_mb2po.py's TINY with one seed and two MB2PO iterations).
THREE = ["--preset=smoke", "--stages=awac,dynamics,mb2po", "--actor_hidden_dims=32,32",
         "--critic_hidden_dims=32,32", "--batch_size=32", "--eval_episodes=1", "--max_episode_steps=20",
         "--awac_steps=100", "--steps_per_call=50", "--eval_every=100", "--checkpoint_every=100",
         "--dynamics_steps=60", "--dynamics_hidden_dims=32,32", "--dynamics_weight_decay=1e-5,1e-5,1e-5",
         "--max_holdout=200", "--imagined_steps=200", "--updates_per_iteration=10", "--num_slots=2",
         "--mb2po_iterations=2", "--mb2po_eval_every=2", "--mb2po_checkpoint_every=1"]


def _errors(out):
    """The `error:` lines of a finished run, checking it printed no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could act on it"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_hopper_file(tmp_path_factory.mktemp("data") / "tiny.hdf5", n=1200)


# ---------------------------------------------------------------------------------------------- one process
def test_second_process_is_refused_and_a_killed_ones_lock_is_not(tmp_path, data):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "mb2po_jax.train", "--dataset", data, "--workdir", str(workdir), *AWAC,
               "--awac_steps=100000", "--eval_every=100000"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _lines(workdir / "metrics.jsonl") >= 1, first)  # training
        second = _train(command[3:])
        assert second.returncode == 1
        (error,) = _errors(second)
        assert error.startswith(f"error: {workdir} is in use by process {first.pid} "), error
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock is dropped by the OS alone
        first.wait()

    rerun = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = _lines(workdir / "metrics.jsonl")
    _wait_for(lambda: _lines(workdir / "metrics.jsonl") > start, rerun)  # not blocked: training again
    rerun.send_signal(signal.SIGTERM)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "stopped at step" in err, err


# ------------------------------------------------------------------------------------------ damaged files
def _flip_byte(step_dir):
    """One byte of the largest array data file: orbax reads it back as a wrong value, without an error."""
    path = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))


def _truncate_files(step_dir):
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "flipped_byte": _flip_byte,
    "truncated_files": _truncate_files,
    "no_state": lambda step_dir: shutil.rmtree(f"{step_dir}/state"),
    "no_meta": lambda step_dir: shutil.rmtree(f"{step_dir}/meta"),
}


@pytest.fixture(scope="module")
def awac_30(tmp_path_factory, data):
    """A finished 30-step AWAC workdir with checkpoints at steps 20 and 30."""
    workdir = tmp_path_factory.mktemp("awac30") / "run"
    out = _train(["--dataset", data, "--workdir", str(workdir), *AWAC, "--awac_steps=30", "--eval_every=30"])
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(workdir / "checkpoints" / "awac")) == ["20", "30"]
    return workdir


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, awac_30, data,
                                                                                      damage):
    workdir = tmp_path / "run"
    shutil.copytree(awac_30, workdir)
    newest = workdir / "checkpoints" / "awac" / "30"
    DAMAGE[damage](newest)
    out = _train(["--dataset", data, "--workdir", str(workdir), *AWAC, "--awac_steps=40", "--eval_every=40"])
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{newest} is damaged" in warnings[0], out.stderr
    if damage == "flipped_byte":
        assert "checksums" in warnings[0]
    assert "resuming from step 20" in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(workdir / "checkpoints" / "awac")) == ["30", "30.damaged", "40"]
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 40]  # training records once each, then the final evaluation
    final = json.loads((workdir / "results.json").read_text())["final"]["awac"]
    assert final["return"] == json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["return"]


# Each makes a broken workdir from a fresh path and returns (--workdir, the path the error must name).
def _garbage_config(workdir):
    workdir.mkdir()
    (workdir / "config.json").write_text("{garbage")
    return workdir, workdir / "config.json"


def _empty_config(workdir):
    workdir.mkdir()
    (workdir / "config.json").write_text("")
    return workdir, workdir / "config.json"


def _undecodable_metrics(workdir):
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_bytes(b'{"stage": "awac", "step": 10}\n\xff\xfe\x00garbage\n')
    return workdir, workdir / "metrics.jsonl"


def _workdir_is_a_file(workdir):
    workdir.write_text("not a directory")
    return workdir, workdir


def _workdir_under_a_file(workdir):
    workdir.write_text("not a directory")
    return workdir / "run", workdir / "run"


BROKEN = {
    "garbage_config": (_garbage_config, "config.json is damaged"),
    "empty_config": (_empty_config, "config.json is damaged"),
    "undecodable_metrics": (_undecodable_metrics, "metrics.jsonl: line 2 is not a JSON record"),
    "workdir_is_a_file": (_workdir_is_a_file, "is a file, not a directory"),
    "workdir_under_a_file": (_workdir_under_a_file, "cannot be created"),
    # Not a damaged file, but an error path that used to end with an orbax thread's traceback at exit.
    "mb2po_on_a_fresh_workdir": (lambda workdir: (workdir, workdir),
                                 "no AWAC checkpoint; run --stages=awac first"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_damaged_file_or_unusable_workdir_is_one_error_line(tmp_path, data, case):
    make, message = BROKEN[case]
    workdir, named = make(tmp_path / "w")
    stages = ["--stages=mb2po"] if case == "mb2po_on_a_fresh_workdir" else []
    out = _train(["--dataset", data, "--workdir", str(workdir), *AWAC, "--awac_steps=10", "--eval_every=10",
                  *stages])
    assert out.returncode == 1
    errors = _errors(out)
    assert len(errors) == 1 and message in errors[0] and str(named) in errors[0], out.stderr


# ----------------------------------------------------------------------------------------------- divergence
def test_non_finite_training_stops_naming_stage_step_and_seed_and_saves_only_finite_states(tmp_path, data):
    workdir = tmp_path / "run"
    out = _train(["--dataset", data, "--workdir", str(workdir), "--preset=smoke", *TINY, "--awac_steps=100",
                  "--steps_per_call=1", "--checkpoint_every=1", "--eval_every=100", "--actor_lr=1e6",
                  "--critic_lr=1e6"])
    assert out.returncode == 1
    (error,) = _errors(out)
    assert error.startswith("error: [awac] training diverged at step "), error
    diverged_at = int(error.split("at step ")[1].split(":")[0])
    assert re.search(r": seed 0's \w+ is (nan|inf|-inf);", error), error
    assert not (workdir / "results.json").exists()

    cfg = config_lib.make_config("smoke", dict(awac_steps=100, steps_per_call=1, checkpoint_every=1,
                                               eval_every=100, actor_lr=1e6, critic_lr=1e6,
                                               actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32),
                                               batch_size=32, eval_episodes=1, max_episode_steps=30))
    run = pipeline.Run(str(workdir), data, None, cfg)
    ckpt = Checkpointer(workdir / "checkpoints" / "awac")
    try:
        steps = ckpt.all_steps()
        assert steps and max(steps) == diverged_at - 1
        for step in steps:
            state, _ = ckpt.restore(run.init_awac(), step)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
                       if np.issubdtype(np.asarray(x).dtype, np.floating)), step
    finally:
        ckpt.close()
        run.close()


# -------------------------------------------------------------------------------------- results.json, stages
def test_results_keep_stages_not_rerun_and_extending_awac_after_mb2po_needs_restart_from(tmp_path, data):
    workdir = tmp_path / "run"
    common = ["--dataset", data, "--workdir", str(workdir), *THREE]
    assert _train(common).returncode == 0
    finished = json.loads((workdir / "results.json").read_text())["final"]
    assert set(finished) == {"awac", "mb2po"}

    again = _train([*common, "--stages=awac"])
    assert again.returncode == 0, again.stderr
    assert json.loads((workdir / "results.json").read_text())["final"] == finished

    # Raising --awac_steps would leave an MB2PO stage trained from an AWAC state the workdir no longer has.
    refused = _train([*common, "--stages=awac", "--awac_steps=150"])
    assert refused.returncode == 1
    (error,) = _errors(refused)
    assert "--awac_steps=150" in error and "--restart_from=mb2po" in error, error
    assert sorted(os.listdir(workdir / "checkpoints" / "awac")) == ["100"]

    restarted = _train([*common, "--stages=awac", "--awac_steps=150", "--restart_from=mb2po"])
    assert restarted.returncode == 0, restarted.stderr
    assert not os.path.exists(workdir / "checkpoints" / "mb2po")
    results = json.loads((workdir / "results.json").read_text())["final"]
    assert set(results) == {"awac"} and results["awac"] != finished["awac"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "mb2po" not in {r["stage"] for r in records}
    assert max(r["step"] for r in records if r["stage"] == "awac") == 150


# ------------------------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize("field, value, flag", [
    ("penalty_coef", -1.0, "--penalty_coef"), ("actor_lr", -3e-4, "--actor_lr"),
    ("critic_lr", float("nan"), "--critic_lr"), ("dynamics_lr", -1e-3, "--dynamics_lr"),
    ("gamma", 1.0, "--gamma"), ("gamma", -0.1, "--gamma"), ("tau", 0.0, "--tau"), ("tau", 1.5, "--tau"),
    ("temperature", 0.0, "--temperature"), ("max_weight", -1.0, "--max_weight"),
    ("num_components", 0, "--num_components"), ("eval_episodes", 0, "--eval_episodes"),
    ("final_eval_episodes", 0, "--final_eval_episodes"), ("final_eval_episodes", 1001, "--final_eval_episodes"),
    ("holdout_fraction", 1.0, "--holdout_fraction"), ("max_holdout", 0, "--max_holdout"),
    ("actor_hidden_dims", (32, 0), "--actor_hidden_dims"), ("dynamics_weight_decay", (1e-5, -1.0, 0.0, 0.0, 0.0),
                                                            "--dynamics_weight_decay"),
    ("max_epochs_since_improvement", 0, "--max_epochs_since_improvement"), ("omega", 1.5, "omega"),
    ("num_elites", 6, "--num_elites"), ("batch_size", 0, "--batch_size"),
])
def test_meaningless_values_are_refused_naming_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        config_lib.make_config("smoke", {field: value})


def test_cli_refuses_a_negative_penalty_before_any_work(tmp_path, data):
    workdir = tmp_path / "run"
    out = _train(["--dataset", data, "--workdir", str(workdir), *AWAC, "--penalty_coef=-0.5"])
    assert out.returncode == 1
    (error,) = _errors(out)
    assert "--penalty_coef must be a number >= 0" in error and "-0.5" in error, error
    assert not workdir.exists()


def test_cli_refuses_a_hand_set_lambda_the_share_rule_would_replace(tmp_path, data):
    """Under the smoke/cpu presets' --penalty_share, --penalty_coef would be ignored: refused, naming the
    way out; with --penalty_share=0 it is the run's lambda."""
    workdir = tmp_path / "run"
    out = _train(["--dataset", data, "--workdir", str(workdir), *AWAC, "--penalty_coef=2", "--print_config"])
    assert out.returncode == 1
    (error,) = _errors(out)
    assert "--penalty_coef=2.0 would not be used" in error and "--penalty_share=0" in error, error
    assert "--max_penalty_share=0" in error, error
    assert not workdir.exists()
    out = _train(["--dataset", data, *AWAC, "--penalty_coef=2", "--penalty_share=0", "--print_config"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["config"]["mb2po"]["penalty_coef"] == 2.0


def test_settings_mismatch_names_only_the_differing_settings(tmp_path, data):
    """Once AWAC has a checkpoint, its settings and the seeds are fixed (each difference named); the later
    stages' settings stay open until they start, and --restart_from reopens a stage's."""
    overrides = dict(awac_steps=10, steps_per_call=10, eval_every=10, checkpoint_every=10, eval_episodes=1,
                     max_episode_steps=20, actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=32)
    workdir = str(tmp_path / "run")
    pipeline.Run(workdir, data, None, config_lib.make_config("smoke", overrides), log=lambda msg: None)()
    other = config_lib.make_config("smoke", {**overrides, "temperature": 0.5, "seed": 1, "dynamics_lr": 3e-3})
    with pytest.raises(ConfigError) as refused:
        pipeline.Run(workdir, data, None, other)
    message = str(refused.value)
    assert "--temperature: was 1.0, now 0.5" in message and "--seed: was 0, now 1" in message, message
    assert "actor_lr" not in message and "dynamics_lr" not in message and "{" not in message, message
    # The dynamics stage has not started: its settings may change; AWAC's reopen with --restart_from=awac.
    pipeline.Run(workdir, data, None, config_lib.make_config("smoke", {**overrides, "dynamics_lr": 3e-3})).close()
    pipeline.Run(workdir, data, None, config_lib.make_config("smoke", {**overrides, "temperature": 0.5}),
                 restart_from="awac").close()


# ----------------------------------------------------------------------------------------------- signals
def test_signal_during_an_evaluation_stops_at_that_call(tmp_path, data):
    """SIGTERM arriving after the compiled call of step 20 (here: during its evaluation) stops at step 20
    with a checkpoint of it, not one call later."""
    cfg = config_lib.make_config("smoke", dict(awac_steps=60, steps_per_call=10, eval_every=20,
                                               checkpoint_every=60, actor_hidden_dims=(32, 32),
                                               critic_hidden_dims=(32, 32), batch_size=32, eval_episodes=1,
                                               max_episode_steps=30))
    run = pipeline.Run(str(tmp_path / "run"), data, None, cfg, log=lambda msg: None)
    evaluate = run._evaluate

    def evaluate_then_signal(agents, **kwargs):
        scores = evaluate(agents, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler the run installed sets its flag
        return scores

    run._evaluate = evaluate_then_signal
    with pytest.raises(pipeline.Stopped, match="stopped at step 20"):
        run()
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints" / "awac")
    assert ckpt.all_steps() == [20]
    ckpt.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 20

"""mb2po-train end to end on tiny D4RL-layout files: outputs, resume equivalence, SIGTERM, bad input."""
import json
import os
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
from mb2po_jax.data import write_d4rl_hdf5

TINY = ["--actor_hidden_dims=32,32", "--critic_hidden_dims=32,32", "--batch_size=32",
        "--eval_episodes=1", "--max_episode_steps=30"]


def _write_hopper_file(path, n=600, seed=0, env_id="Hopper-v5", obs_dim=11, act_dim=3, action_bound=1.0,
                       terminal_rows=(), next_observations=True):
    """A tiny D4RL-layout file of random rows (Hopper's shapes by default), an episode timeout every 200 rows;
    `terminal_rows` end episodes as terminals; without `next_observations` the loader derives them."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    obs[:, 0] += 1.25  # a plausible hopper height
    terminals = np.zeros(n, bool)
    terminals[list(terminal_rows)] = True
    timeouts = np.zeros(n, bool)
    timeouts[199::200] = True
    arrays = {
        "observations": obs,
        "actions": rng.uniform(-action_bound, action_bound, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    if next_observations:
        arrays["next_observations"] = (obs + 0.01 * rng.normal(size=obs.shape)).astype(np.float32)
    write_d4rl_hdf5(path, arrays, {"env_id": env_id} if env_id else None)
    return str(path)


def _train(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mb2po_jax.train", *args], capture_output=True,
                          text=True, timeout=600, **kwargs)


def _final_state(workdir, cfg, dataset_path):
    run = pipeline.Run(str(workdir), dataset_path, None, cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "awac"))
    state, meta = ckpt.restore(run.init_awac())
    ckpt.close()
    return state, meta


def test_cli_writes_documented_outputs(tmp_path):
    # Named as D4RL caches its files, and without metadata: evaluated in Hopper-v4 (D4RL's gym v3 model).
    data = _write_hopper_file(tmp_path / "hopper_medium_replay-v2.hdf5", env_id=None)
    workdir = tmp_path / "run"
    out = _train(["--dataset", data, "--workdir", str(workdir), "--preset=smoke", "--awac_steps=20",
                  "--steps_per_call=10", "--eval_every=10", "--checkpoint_every=10", "--num_seeds=2",
                  *TINY])
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"stage", "step"} <= set(lines[0])
    evals = [r for r in lines if "return" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(len(r["return"]) == 2 and len(r["normalized_score"]) == 2 for r in evals)
    results = json.loads((workdir / "results.json").read_text())
    assert results["num_seeds"] == 2 and results["env"] == results["env_id"] == "Hopper-v4"
    assert set(results["final"]["awac"]) >= {"return", "normalized_score"}
    assert len(results["final"]["awac"]["return"]) == 2
    assert results["final"]["awac"]["return"] == evals[-1]["return"]
    assert list((workdir / "tensorboard" / "awac").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert json.loads(out.stdout.strip().splitlines()[-1])["final"]["awac"]["return"]


def test_print_config_shows_the_resolved_configuration_and_loads_nothing(tmp_path):
    # No dataset file anywhere, and no JAX backend that could start: printing must need neither.
    env = {**os.environ, "HOME": str(tmp_path / "home"), "D4RL_DATASET_DIR": str(tmp_path / "d4rl"),
           "JAX_PLATFORMS": "no_such_backend"}
    out = _train(["--preset", "paper", "--dataset", "hopper-medium-replay-v2", "--print_config"],
                 cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert (printed["dataset"], printed["env_id"], printed["preset"]) == (
        "hopper-medium-replay-v2", "Hopper-v4", "paper")
    cfg = printed["config"]
    assert (cfg["awac_steps"], cfg["dynamics_steps"]) == (500_000, 100_000)
    assert {k: cfg["mb2po"][k] for k in ("iterations", "imagined_steps", "updates_per_iteration", "num_slots")} \
        == {"iterations": 500, "imagined_steps": 1_000_000, "updates_per_iteration": 1000, "num_slots": 100}
    assert (cfg["awac"]["num_components"], cfg["awac"]["max_weight"]) == (5, 20)
    assert printed["task"] == {"horizon": 5, "penalty_coef": 1.0}  # MOPO's hopper-mixed row, applied
    assert (cfg["mb2po"]["horizon"], cfg["mb2po"]["penalty_coef"]) == (5, 1.0)
    assert (cfg["dynamics"]["num_members"], cfg["mb2po"]["rollout_members"]) == (5, "all")  # the paper's N
    assert not list(tmp_path.glob("workdirs"))

    # MOPO's ensemble is one absl flag file away.
    mopo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                        "mopo.flags")
    out = _train([f"--flagfile={mopo}", "--print_config"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)["config"]
    assert (cfg["dynamics"]["num_members"], cfg["dynamics"]["num_elites"], cfg["mb2po"]["rollout_members"],
            cfg["mb2po"]["penalty"]) == (7, 5, "elites", "max_aleatoric")

    # Precedence: flags over the --task_config table's row.
    table = tmp_path / "tasks.json"
    table.write_text(json.dumps({"walker2d-medium-expert": {"horizon": 7, "penalty_coef": 0.25}}))
    out = _train(["--dataset", "walker2d-medium-expert-v2", "--task_config", str(table), "--horizon", "3",
                  "--print_config"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["env_id"] == "Walker2d-v4" and printed["preset"] == "smoke"
    assert (printed["config"]["mb2po"]["horizon"], printed["config"]["mb2po"]["penalty_coef"]) == (3, 0.25)


def test_sigterm_then_rerun_equals_uninterrupted(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5")
    common = ["--dataset", data, "--preset=smoke", "--awac_steps=400", "--steps_per_call=10",
              "--eval_every=400", "--checkpoint_every=400", *TINY]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train([*common, "--workdir", str(straight)]).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "mb2po_jax.train", *common,
                             "--workdir", str(interrupted)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stopped at step" in err
    assert not (interrupted / "results.json").exists(), "an interrupted run must not look complete"
    ckpt = Checkpointer(interrupted / "checkpoints" / "awac")
    stopped_at = ckpt.latest_step()
    ckpt.close()
    assert stopped_at is not None and 0 < stopped_at < 400

    resumed = _train([*common, "--workdir", str(interrupted)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {stopped_at}" in resumed.stderr

    cfg = config_lib.make_config("smoke", dict(awac_steps=400, steps_per_call=10, eval_every=400,
                                               checkpoint_every=400, actor_hidden_dims=(32, 32),
                                               critic_hidden_dims=(32, 32), batch_size=32,
                                               eval_episodes=1, max_episode_steps=30))
    a, meta_a = _final_state(straight, cfg, data)
    b, meta_b = _final_state(interrupted, cfg, data)
    assert int(a.step[0]) == int(b.step[0]) == 400
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta_a["final"] == meta_b["final"]
    steps = [json.loads(l)["step"] for l in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # train lines + 1 eval line


def _records(workdir):
    """metrics.jsonl without the wall-clock fields: what an interrupted run must reproduce."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in ("time", "updates_per_s")} for l in lines]


@pytest.fixture(scope="module")
def uninterrupted_300(tmp_path_factory):
    """(flags, workdir) of a finished 300-step AWAC run that the killed runs below must reproduce."""
    root = tmp_path_factory.mktemp("sigkill")
    common = ["--dataset", _write_hopper_file(root / "tiny.hdf5"), "--preset=smoke", "--awac_steps=300",
              "--steps_per_call=10", "--eval_every=100", "--checkpoint_every=100", *TINY]
    out = _train([*common, "--workdir", str(root / "straight")])
    assert out.returncode == 0, out.stderr
    return common, root / "straight"


@pytest.mark.parametrize("kill_after_lines", [3, 14])  # before the first checkpoint, and after one
def test_sigkill_then_rerun_keeps_the_metrics_of_an_uninterrupted_run(tmp_path, uninterrupted_300,
                                                                      kill_after_lines):
    common, straight = uninterrupted_300
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mb2po_jax.train", *common, "--workdir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= kill_after_lines):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (killed / "results.json").exists(), "killed too late to test anything"
    rerun = _train([*common, "--workdir", str(killed)])
    assert rerun.returncode == 0, rerun.stderr
    a, b = _records(straight), _records(killed)
    assert [(r["stage"], r["step"]) for r in b] == [(r["stage"], r["step"]) for r in a]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(np.asarray(y[k], float) if k != "stage" else 0,
                                       np.asarray(x[k], float) if k != "stage" else 0, rtol=1e-5, err_msg=k)
    assert json.loads((killed / "results.json").read_text())["final"] == \
        json.loads((straight / "results.json").read_text())["final"]


def test_rerun_with_other_settings_is_refused(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5")
    workdir = str(tmp_path / "run")
    cfg = config_lib.make_config("smoke", dict(awac_steps=10, steps_per_call=10, eval_every=10,
                                               checkpoint_every=10))
    pipeline.Run(workdir, data, None, cfg)
    other = config_lib.make_config("smoke", dict(awac_steps=10, steps_per_call=10, eval_every=10,
                                                 checkpoint_every=10, seed=1))
    # Nothing trained yet: the stages' settings are open, the seeds are not (a trained stage fixes its
    # settings: tests/test_reliability.py::test_settings_mismatch_names_only_the_differing_settings).
    with pytest.raises(Exception, match="--seed: was 0, now 1"):
        pipeline.Run(workdir, data, None, other)


def test_a_setting_added_since_is_read_with_the_value_older_workdirs_ran_with():
    """A workdir (or benchmark copy) made before --max_penalty_share existed ran uncapped: its recorded
    identity is compared as 0.0, so a capped rerun of its trained MB2PO stage is refused by name, while
    an open stage may take the new setting."""
    new = json.loads(json.dumps(config_lib.identity(config_lib.make_config("cpu"))))
    old = json.loads(json.dumps(new))
    del old["mb2po"]["max_penalty_share"]
    assert pipeline._differences(old, new) == [("--max_penalty_share", 0.0, 0.5)]
    assert pipeline._differences(old, new, open_sections=("mb2po", "online")) == []
    del old["mb2po"]["horizon"]  # a field not in config.ADDED_FIELDS is still not compared when missing
    uncapped = {**new, "mb2po": {**new["mb2po"], "horizon": 9, "max_penalty_share": 0.0}}
    assert pipeline._differences(old, uncapped) == []


@pytest.mark.parametrize("problem", ["missing", "nan"])
def test_bad_dataset_exits_nonzero_with_one_line(tmp_path, problem):
    path = tmp_path / "bad.hdf5"
    if problem == "nan":
        _write_hopper_file(path)
        import h5py

        with h5py.File(path, "r+") as f:
            f["rewards"][7] = np.nan
    workdir = tmp_path / "run"
    out = _train(["--dataset", str(path), "--workdir", str(workdir), *TINY])
    assert out.returncode != 0
    error_lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and "bad.hdf5" in error_lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (workdir / "results.json").exists()


def test_actions_outside_unit_bounds_are_rescaled_for_the_policy_and_back(tmp_path):
    """An env whose action bounds are not [-1, 1] (Pendulum-v1: torque in [-2, 2]): D_beta reaches AWAC and
    MB2PO with its actions in the policy's [-1, 1] scale, and the policy's actions go back to the env's
    bounds; with asymmetric bounds too (the two maps are each other's inverse, ends to ends)."""
    from mb2po_jax.data.envs import EnvSpaces

    path = _write_hopper_file(tmp_path / "pendulum.hdf5", n=400, env_id="Pendulum-v1", obs_dim=3, act_dim=1,
                              action_bound=2.0)
    run = pipeline.Run(str(tmp_path / "run"), path, None, config_lib.make_config("smoke"), log=lambda m: None)
    assert not run.spaces.unit_actions
    torque = run.dataset.transitions.actions  # as the file holds them, in [-2, 2]
    assert np.max(np.abs(torque)) > 1.5
    np.testing.assert_allclose(np.asarray(run._device_dataset().actions), torque / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run.spaces.from_unit_actions(torque / 2), torque, rtol=1e-6, atol=1e-6)

    spaces = EnvSpaces("x", (3,), (2,), np.array([-2.0, 0.5]), np.array([0.0, 3.0]))
    np.testing.assert_allclose(spaces.from_unit_actions([[-1, -1], [1, 1], [0, 0]]), [[-2, 0.5], [0, 3], [-1, 1.75]])
    unit = np.random.default_rng(0).uniform(-1, 1, size=(50, 2))
    np.testing.assert_allclose(spaces.to_unit_actions(spaces.from_unit_actions(unit)), unit, atol=1e-6)


def test_dynamics_stage_leaves_out_rows_without_a_recorded_successor(tmp_path):
    """A file without next_observations: a terminal row's successor was never recorded, so the ensembles
    neither train nor select on it (training + holdout rows = the rows with a true successor)."""
    path = _write_hopper_file(tmp_path / "no_next.hdf5", terminal_rows=(99, 349), next_observations=False)
    config = config_lib.make_config("smoke", {"num_seeds": 1})
    run = pipeline.Run(str(tmp_path / "run"), path, None, config, log=lambda m: None)
    rows = len(run.dataset.transitions)
    assert int(np.sum(run.dataset.transitions.next_valid_mask)) == rows - 2  # the two terminal rows
    _, data, _ = run.init_dynamics()
    assert data["bootstrap"].shape[-1] + data["holdout_targets"].shape[1] == rows - 2

"""`mb2po-data`: exit codes, one-line output, JSON info, generation, and no tracebacks for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_factories import hopper_arrays
from mb2po_jax.data import load_dataset, normalized_score, write_d4rl_hdf5
from mb2po_jax.data.cli import run


pytestmark = pytest.mark.usefixtures("data_dirs", "no_behavior_assets")


@pytest.fixture
def good_file(tmp_path):
    path = str(tmp_path / "hopper_good.hdf5")
    write_d4rl_hdf5(path, hopper_arrays((5, 7, 4), ends=("timeout", "terminal", "none")))
    return path


@pytest.fixture
def nan_file(tmp_path):
    raw = hopper_arrays()
    raw["observations"][7, 3] = np.nan
    path = str(tmp_path / "hopper_nan.hdf5")
    write_d4rl_hdf5(path, raw)
    return path


def test_validate_good_file_prints_one_summary_line(good_file, capsys):
    assert run(["validate", good_file]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1
    for part in ("hopper_good", "16 transitions", "3 episodes", "obs_dim 11", "act_dim 3", "Hopper-v5"):
        assert part in out, part


@pytest.mark.parametrize("argv_tail,pattern", [
    (["hopper_nan.hdf5"], "observations has NaN at row 7"),
    (["hopper-medium-replay-v2"], "hopper_medium_replay-v2.hdf5 not found"),
    (["hopper_good.hdf5", "--env", "Walker2d-v5"], "observations have 11 dims, Walker2d-v5 expects 17"),
    (["hopper_good.hdf5", "--env", "NoSuchEnv-v0"], "cannot make Gymnasium environment 'NoSuchEnv-v0'"),
])
def test_validate_bad_input_prints_one_error_line(tmp_path, good_file, nan_file, capsys, argv_tail, pattern):
    argv_tail = [str(tmp_path / a) if a.endswith(".hdf5") else a for a in argv_tail]
    assert run(["validate", *argv_tail]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert pattern in err


def test_validate_env_flag_for_a_file_without_metadata(tmp_path, capsys):
    path = str(tmp_path / "mystery.hdf5")
    write_d4rl_hdf5(path, hopper_arrays())
    assert run(["validate", path]) == 1
    assert "pass --env" in capsys.readouterr().err
    assert run(["validate", path, "--env", "Hopper-v5"]) == 0


def test_info_json(good_file, capsys):
    assert run(["info", good_file, "--json"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("\n") == 1
    info = json.loads(out)
    ds = load_dataset(good_file)
    assert info["transitions"] == 16 and info["episodes"] == 3 and info["env"] == "Hopper-v5"
    assert info["return_mean"] == pytest.approx(ds.episode_returns.mean())
    assert info["normalized_return_mean"] == pytest.approx(normalized_score("hopper", ds.episode_returns).mean())
    assert info["valid"] is True and info["validation_error"] is None


def test_info_json_names_the_env_the_data_came_from(tmp_path, capsys):
    os.makedirs(tmp_path / "d4rl")
    write_d4rl_hdf5(str(tmp_path / "d4rl" / "hopper_medium_replay-v2.hdf5"), hopper_arrays())
    for argv, env_id in ((["hopper-medium-replay-v2"], "Hopper-v4"),  # D4RL: gym v3's models, kept by v4
                         ([str(tmp_path / "d4rl" / "hopper_medium_replay-v2.hdf5")], "Hopper-v4"),
                         (["hopper-medium-replay-v2", "--env", "Hopper-v5"], "Hopper-v5")):
        assert run(["info", *argv, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["env_id"] == info["env"] == env_id


def test_info_reports_a_failed_validation(tmp_path, capsys):
    raw = hopper_arrays()
    raw["actions"][2, 1] = 4.0
    path = str(tmp_path / "hopper_wild.hdf5")
    write_d4rl_hdf5(path, raw)
    assert run(["info", path, "--json"]) == 1
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["valid"] is False and "bounds at row 2" in info["validation_error"]
    assert info["transitions"] == 16
    assert err.startswith("error: ") and err.count("\n") == 1
    assert run(["info", path]) == 1
    assert "validation   FAILED" in capsys.readouterr().out


def test_info_on_non_finite_rewards_names_the_validation_problem_not_a_missing_reference(tmp_path, capsys):
    """Hopper has a reference score: NaN returns must not read as 'no D4RL reference score'."""
    raw = hopper_arrays()
    raw["rewards"][3] = np.nan
    path = str(tmp_path / "hopper_nanreward.hdf5")
    write_d4rl_hdf5(path, raw)
    assert run(["info", path]) == 1
    out, err = capsys.readouterr()
    assert "no D4RL reference score" not in out and "normalized   n/a (returns are not finite)" in out
    assert f"validation   FAILED: {path}: rewards has NaN at row 3" in out
    assert err == f"error: {path}: rewards has NaN at row 3\n" and "Traceback" not in err


def test_info_text_for_env_without_reference_score(tmp_path, capsys):
    path = str(tmp_path / "pendulum.hdf5")
    n = 30
    rng = np.random.default_rng(0)
    write_d4rl_hdf5(path, {"observations": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                           "actions": rng.uniform(-2, 2, (n, 1)).astype(np.float32),
                           "rewards": -np.ones(n, np.float32), "terminals": np.zeros(n, bool)},
                    {"env_id": "Pendulum-v1"})
    assert run(["info", path]) == 0
    out = capsys.readouterr().out
    assert "normalized   n/a" in out and "Pendulum-v1" in out
    assert run(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["normalized_return_mean"] is None


def test_generate_random_then_use_it_by_name(tmp_path, capsys):
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "200", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "local" / "hopper_random-local.hdf5"
    assert out.count("\n") == 1 and str(path) in out
    ds = load_dataset("hopper-random-local")
    assert ds.num_transitions == 200 and ds.metadata["seed"] == 3
    out_path = str(tmp_path / "walker.hdf5")
    assert run(["generate", "--env", "Walker2d-v5", "--kind", "random", "--size", "50", "--out", out_path]) == 0
    assert load_dataset(out_path).env_id == "Walker2d-v5"


def test_generate_names_the_dataset_as_users_pass_it(tmp_path, capsys):
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "50"]) == 0
    out = capsys.readouterr().out
    assert ": hopper-random-local: 50 transitions" in out and ": hopper_random-local:" not in out


def test_generate_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "local" / "hopper_random-local.hdf5"
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "50", "--seed", "1"]) == 0
    capsys.readouterr()
    before = path.read_bytes()
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "60", "--seed", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path} already exists") and "--force" in err
    assert path.read_bytes() == before
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "60", "--seed", "2", "--force"]) == 0
    capsys.readouterr()
    assert load_dataset("hopper-random-local").num_transitions == 60
    out_path = tmp_path / "mine.hdf5"
    out_path.write_bytes(b"not mine to overwrite")
    assert run(["generate", "--env", "hopper", "--kind", "random", "--size", "50", "--out", str(out_path)]) == 1
    assert str(out_path) in capsys.readouterr().err and out_path.read_bytes() == b"not mine to overwrite"


def test_random_and_uniform_are_separate_local_datasets(tmp_path, capsys):
    for kind in ("random", "uniform"):
        assert run(["generate", "--env", "hopper", "--kind", kind, "--size", "1000"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [
        "hopper_random-local.hdf5", "hopper_uniform-local.hdf5"]
    random, uniform = (load_dataset(f"hopper-{kind}-local") for kind in ("random", "uniform"))
    assert random.metadata["algorithm"] == "sac_init" and uniform.metadata["algorithm"] == "uniform_random"
    # The initial SAC policy's actions are not uniform: ~42 % against 50 % in |a| < 0.5 (SE ~1 %).
    assert np.mean(np.abs(uniform.transitions.actions) < 0.5) > 0.46
    assert np.mean(np.abs(random.transitions.actions) < 0.5) < 0.46
    assert run(["info", "hopper-uniform-local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["kind"] == "uniform"


def test_generate_sac_kind_without_assets_is_a_clean_error(tmp_path, capsys):
    out_path = tmp_path / "medium.hdf5"
    assert run(["generate", "--env", "hopper", "--kind", "medium", "--size", "10", "--out", str(out_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: no behaviour-policy assets")
    assert str(tmp_path / "behavior" / "hopper") in err and "mb2po-data export-behavior W --out" in err
    assert list(tmp_path.glob("*.hdf5")) == []


def test_help_lists_every_kind_and_the_behavior_commands(capsys):
    with pytest.raises(SystemExit) as e:
        run(["generate", "--help"])
    assert e.value.code == 0
    assert "{random,uniform,medium,medium-replay,expert,medium-expert}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(["--help"])
    out = capsys.readouterr().out
    assert "train-behavior" in out and "export-behavior" in out
    with pytest.raises(SystemExit) as e:
        run(["generate", "--env", "hopper", "--kind", "mediocre"])
    assert e.value.code == 2 and "invalid choice: 'mediocre'" in capsys.readouterr().err


def test_console_script_exit_codes_and_clean_streams(tmp_path, nan_file):
    """Through a real process: exit status, no traceback, and no MuJoCo warning noise (HalfCheetah warns)."""
    cheetah = str(tmp_path / "cheetah.hdf5")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "mb2po_jax.data.cli"]
    gen = subprocess.run([*cmd, "generate", "--env", "halfcheetah", "--kind", "random", "--size", "20",
                          "--out", cheetah], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count("\n") == 1
    assert gen.stderr.splitlines()[-1].startswith("[random HalfCheetah-v5] 20/20 (100.0%)  done in "), gen.stderr
    assert len(gen.stderr.splitlines()) <= 2  # progress only (no MuJoCo warnings)
    bad = subprocess.run([*cmd, "validate", nan_file], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "observations has NaN at row 7" in bad.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()

"""Locally generated D4RL-style data: deterministic files whose flags match what the environment did."""

import os

import h5py
import numpy as np
import pytest

from data_factories import hopper_unhealthy
from mb2po_jax.behavior import generation
from mb2po_jax.data import load_dataset, read_d4rl_hdf5, registry
from mb2po_jax.errors import DataError


pytestmark = pytest.mark.usefixtures("data_dirs", "no_behavior_assets")


@pytest.mark.parametrize("generate", [generation.generate_random, generation.generate_uniform])
def test_same_seed_gives_byte_identical_files(tmp_path, generate):
    paths = [str(tmp_path / f"run{i}.hdf5") for i in range(3)]
    generate("Hopper-v5", 300, 7, paths[0])
    generate("hopper", 300, 7, paths[1])
    generate("Hopper-v5", 300, 8, paths[2])
    data = [open(p, "rb").read() for p in paths]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_random_is_the_initial_sac_policy_and_uniform_is_uniform(tmp_path):
    """D4RL's random data comes from a randomly initialised SAC policy, not from uniform actions."""
    from mb2po_jax import behavior
    from mb2po_jax.behavior import sac

    n = 3000  # x 3 action dims
    generation.generate_random("Hopper-v5", n, 0, str(tmp_path / "random.hdf5"))
    generation.generate_uniform("Hopper-v5", n, 0, str(tmp_path / "uniform.hdf5"))
    rand, unif = (read_d4rl_hdf5(str(tmp_path / f"{k}.hdf5")) for k in ("random", "uniform"))
    # The fresh actor's tanh(~N(0, 1)) puts ~42 % of the actions in |a| < 0.5, uniform 50 % (SE ~0.5 %).
    assert abs(np.mean(np.abs(unif["actions"]) < 0.5) - 0.5) < 0.02
    assert np.mean(np.abs(rand["actions"]) < 0.5) < 0.46
    assert np.all(np.abs(rand["actions"]) < 1.0)
    # Each recorded log-probability is the initial actor's log pi(a|s) of that row.
    params = behavior.initial_actor("Hopper-v5", 0)
    inner = np.all(np.abs(rand["actions"]) < 0.99, axis=1)  # atanh of float32 actions is exact enough there
    log_pi = np.asarray(sac.policy(params, rand["observations"][inner]).log_prob(rand["actions"][inner]))
    assert np.allclose(log_pi, rand["infos/action_log_probs"][inner], atol=1e-3)
    assert np.std(rand["infos/action_log_probs"]) > 0.1
    assert rand["metadata/kind"] == "random" and rand["metadata/algorithm"] == "sac_init"
    assert unif["metadata/kind"] == "uniform" and unif["metadata/algorithm"] == "uniform_random"
    # Both hopper datasets are D4RL-valid (random hopper falls within ~20 steps either way).
    for kind in ("random", "uniform"):
        ds = load_dataset(str(tmp_path / f"{kind}.hdf5"))
        assert ds.num_transitions == n and 50 <= ds.num_episodes <= 300


def test_a_stale_uniform_random_file_is_refused_by_name(tmp_path):
    """`random` files made before random became the initial SAC policy must not be reused silently."""
    local = registry.local_name_for("hopper", "random")
    generation.generate_uniform("Hopper-v5", 100, 0, local.path)
    with h5py.File(local.path, "r+") as f:  # what the old recipe wrote
        f["metadata"].attrs["kind"] = "random"
    with pytest.raises(DataError, match="older recipe .*uniform_random.*generate --env hopper --kind random --force"):
        load_dataset("hopper-random-local")
    assert load_dataset(local.path).num_transitions == 100  # by path it is just a file
    generation.generate("hopper", "random", size=100)
    assert load_dataset("hopper-random-local").metadata["algorithm"] == "sac_init"


def test_hopper_flags_match_what_the_environment_did(tmp_path):
    path = str(tmp_path / "hopper.hdf5")
    generation.generate_uniform("Hopper-v5", 400, 0, path)
    raw = read_d4rl_hdf5(path)
    obs, next_obs = raw["observations"], raw["next_observations"]
    terminals, timeouts = raw["terminals"], raw["timeouts"]
    assert terminals.dtype == bool and timeouts.dtype == bool and obs.dtype == np.float32
    assert terminals.sum() >= 5 and not timeouts.any()  # random hopper falls long before 1000 steps
    # A terminal is exactly a step into an unhealthy state (the true termination, not a time limit).
    assert np.array_equal(terminals, hopper_unhealthy(next_obs.astype(np.float64)))
    # Inside an episode s' is the next row; after a terminal the next row is a fresh reset.
    inside = ~terminals[:-1]
    assert np.array_equal(next_obs[:-1][inside], obs[1:][inside])
    assert np.all(np.any(next_obs[:-1][~inside] != obs[1:][~inside], axis=1))
    # infos/qpos, infos/qvel are the MuJoCo state behind observations[i] (Hopper-v5 drops the x position).
    assert np.allclose(raw["infos/qpos"][:, 1:], obs[:, :5], atol=1e-6)
    assert np.allclose(raw["infos/qvel"], obs[:, 5:], atol=1e-5)
    assert np.all(np.abs(raw["actions"]) <= 1.0)
    assert np.allclose(raw["infos/action_log_probs"], -3 * np.log(2.0))
    assert raw["metadata/env_id"] == "Hopper-v5" and raw["metadata/kind"] == "uniform"
    assert raw["metadata/seed"] == 0 and raw["metadata/algorithm"] == "uniform_random"


def test_time_limit_gives_timeouts_not_terminals(tmp_path):
    path = str(tmp_path / "cheetah.hdf5")
    generation.generate_random("HalfCheetah-v5", 120, 0, path, max_episode_steps=50)
    raw = read_d4rl_hdf5(path)
    assert np.flatnonzero(raw["timeouts"]).tolist() == [49, 99]
    assert not raw["terminals"].any()
    ds = load_dataset(path)
    assert ds.env_id == "HalfCheetah-v5"
    assert np.array_equal(ds.episode_lengths, [50, 50, 20])
    assert len(ds.transitions) == 120 and ds.transitions.terminals.sum() == 0


def test_every_kind_has_a_generator_and_a_d4rl_size():
    assert list(generation.GENERATORS) == list(registry.LOCAL_KINDS)
    assert generation.DEFAULT_SIZES == {"random": 1_000_000, "uniform": 1_000_000, "medium": 1_000_000,
                                        "expert": 1_000_000, "medium-expert": 2_000_000}  # medium-replay: the run's own
    assert set(registry.RECIPES) == set(registry.LOCAL_KINDS)


def test_sac_kinds_without_assets_say_where_they_looked(tmp_path):
    """The SAC-based kinds themselves are tested in test_behavior_assets."""
    with pytest.raises(DataError, match="no behaviour-policy assets for Hopper-v5 in .*behavior/hopper") as e:
        generation.generate("hopper", "medium", size=10, path=str(tmp_path / "x.hdf5"))
    assert "mb2po-data train-behavior --env hopper" in str(e.value)
    assert not os.path.exists(tmp_path / "x.hdf5")
    with pytest.raises(DataError, match="unknown dataset kind"):
        generation.generate("hopper", "mediocre", size=10)


def test_default_dataset_is_generated_once(tmp_path, monkeypatch, capsys):
    # The default is medium-replay from the SHIPPED hopper assets; 150 rows lie in the uniform warm-up.
    monkeypatch.delenv("MB2PO_BEHAVIOR_DIR")
    monkeypatch.setattr(generation, "DEFAULT_DATASET_SIZE", 150)
    path = generation.ensure_default_dataset()
    assert path == str(tmp_path / "local" / "hopper_medium_replay-local.hdf5")
    err = capsys.readouterr().err
    announce, *progress = err.splitlines()
    assert "hopper-medium-replay-local" in announce
    assert progress[-1].startswith("[medium-replay Hopper-v5] 150/150 (100.0%)  done in "), err
    stamp = os.stat(path).st_mtime_ns
    assert generation.ensure_default_dataset() == path
    assert capsys.readouterr().err == ""
    assert os.stat(path).st_mtime_ns == stamp
    ds = load_dataset(registry.DEFAULT_DATASET)
    assert ds.num_transitions == 150 and ds.env_id == "Hopper-v5"
    with h5py.File(path, "r") as f:
        assert f["metadata"].attrs["mb2po_jax_version"]

"""D4RL-layout files: exact round trips, episode boundaries, dtype conversion, and every kind of bad file."""

import json
import os

import h5py
import numpy as np
import pytest

from data_factories import ACT_DIM, OBS_DIM, hopper_arrays
from mb2po_jax.data import (
    env_id_for,
    load_dataset,
    normalized_score,
    read_d4rl_hdf5,
    write_d4rl_hdf5,
)
from mb2po_jax.data import d4rl, registry
from mb2po_jax.data.loader import dataset_env_id
from mb2po_jax.errors import DataError


pytestmark = pytest.mark.usefixtures("data_dirs")  # no test reads or writes the real ~/.d4rl, ~/.cache


def assert_same_raw(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, str):
            assert isinstance(got, str) and got == want, key
        else:
            want = np.asarray(want)
            assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
            assert got.shape == want.shape, (key, got.shape, want.shape)
            assert np.array_equal(got, want), key


# ------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("next_observations", [True, False])
@pytest.mark.parametrize("column_flags", [False, True])
def test_write_read_round_trip_is_exact(tmp_path, dtype, next_observations, column_flags):
    raw = hopper_arrays(dtype=dtype, next_observations=next_observations, column_flags=column_flags)
    raw["infos/qpos"] = np.random.default_rng(1).normal(size=(16, 6))
    raw["infos/action_log_probs"] = np.arange(16, dtype=np.float32)
    raw["metadata/algorithm"] = "SAC"  # D4RL style: scalar datasets under metadata/
    raw["metadata/iteration"] = np.int64(7)
    raw["metadata/policy/fc0/weight"] = np.ones((4, 2), np.float32)
    raw["metadata/policy/nonlinearity"] = np.bytes_(b"relu")  # fixed-length bytes, as in D4RL's files
    attrs = {"env_id": "Hopper-v5", "seed": 3, "lr": 3e-4, "deterministic": True}
    path = str(tmp_path / "data.hdf5")

    write_d4rl_hdf5(path, raw, attrs)
    back = read_d4rl_hdf5(path)

    expected = dict(raw, **{f"metadata/{k}": v for k, v in attrs.items()})
    assert_same_raw(back, expected)
    with h5py.File(path, "r") as f:  # float64 files stay float64 on disk
        assert f["observations"].dtype == np.dtype(dtype)
        assert f["rewards"].shape == raw["rewards"].shape

    # Writing what was read gives a file that reads the same (metadata attributes become datasets).
    again = str(tmp_path / "again.hdf5")
    write_d4rl_hdf5(again, back)
    assert_same_raw(read_d4rl_hdf5(again), expected)


def test_writer_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out.hdf5"
    bad = {"observations": np.zeros((3, 2), np.float32), "actions": np.array([object(), 1, 2], dtype=object)}
    with pytest.raises(Exception):
        write_d4rl_hdf5(str(path), bad)
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_existing_file_atomically(tmp_path):
    path = str(tmp_path / "out.hdf5")
    write_d4rl_hdf5(path, hopper_arrays(seed=1))
    write_d4rl_hdf5(path, hopper_arrays(seed=2))
    assert np.array_equal(read_d4rl_hdf5(path)["actions"], hopper_arrays(seed=2)["actions"])
    assert sorted(os.listdir(tmp_path)) == ["out.hdf5"]
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


# ------------------------------------------------------------------------------------------------ boundaries

def test_no_transition_crosses_an_episode_boundary_without_next_observations(tmp_path):
    # Episode 0: 5 steps, ends by timeout. Episode 1: 7 steps, ends by termination. Episode 2: 4 steps, cut off.
    raw = hopper_arrays((5, 7, 4), ends=("timeout", "terminal", "none"), next_observations=False)
    path = str(tmp_path / "hopper_two_episodes.hdf5")
    write_d4rl_hdf5(path, raw)
    ds = load_dataset(path)
    t = ds.transitions

    # Dropped: the timeout row (4) and the file's last row (15): their successors are unknown.
    assert len(t) == 16 - 2
    episode, step = t.observations[:, 1], t.observations[:, 0] % 100
    next_episode, next_step = t.next_observations[:, 1], t.next_observations[:, 0] % 100
    assert np.array_equal(episode, next_episode), "a next state from another episode"
    terminal = t.terminals == 1.0
    assert np.array_equal(next_step[~terminal], step[~terminal] + 1)
    # Exactly one terminal (end of episode 1); the timeout is not a terminal.
    assert terminal.sum() == 1 and episode[terminal][0] == 1 and step[terminal][0] == 6
    assert set(t.terminals.tolist()) <= {0.0, 1.0}
    # The terminal row's successor was never recorded: marked so dynamics training can skip it.
    assert np.array_equal(t.next_valid_mask, (~terminal).astype(np.float32))
    assert np.array_equal(ds.episode_lengths, [5, 7, 4])
    assert np.allclose(ds.episode_returns, [raw["rewards"][a:b].sum() for a, b in [(0, 5), (5, 12), (12, 16)]])
    assert ds.num_rows == 16


def test_next_observations_used_as_stored(tmp_path):
    raw = hopper_arrays((5, 7, 4), ends=("timeout", "terminal", "none"))
    path = str(tmp_path / "hopper_with_next.hdf5")
    write_d4rl_hdf5(path, raw)
    ds = load_dataset(path)
    t = ds.transitions
    assert len(t) == 16  # every row is a valid transition
    assert np.array_equal(t.next_observations, raw["next_observations"])
    assert np.array_equal(t.terminals, raw["terminals"].astype(np.float32))  # timeouts are not terminals
    assert t.next_valid is None and np.all(t.next_valid_mask == 1.0)
    assert np.array_equal(ds.episode_lengths, [5, 7, 4])


def test_episodes_split_where_next_state_jumps_even_without_timeouts(tmp_path):
    raw = hopper_arrays((5, 7, 4), ends=("timeout", "terminal", "none"), timeouts=False)
    path = str(tmp_path / "hopper_no_timeouts.hdf5")
    write_d4rl_hdf5(path, raw)
    ds = load_dataset(path)
    assert np.array_equal(ds.episode_lengths, [5, 7, 4])
    assert len(ds.transitions) == 16


def test_v0_file_without_timeouts_is_split_every_1000_steps():
    n = 2500
    raw = {
        "observations": np.arange(n, dtype=np.float32)[:, None].repeat(OBS_DIM, 1),
        "actions": np.zeros((n, ACT_DIM), np.float32),
        "rewards": np.ones(n, np.float32),
        "terminals": np.zeros(n, bool),
    }
    t, returns, lengths = d4rl.transitions_from_d4rl(raw, "v0.hdf5")
    assert np.array_equal(lengths, [1000, 1000, 500])
    assert np.array_equal(returns, [1000.0, 1000.0, 500.0])
    assert len(t) == n - 3  # rows 999, 1999, 2499 have no successor in their episode
    assert np.all(t.next_observations[:, 0] == t.observations[:, 0] + 1)
    assert not np.isin([999.0, 1999.0, 2499.0], t.observations[:, 0]).any()

    raw["terminals"][9] = True  # a terminal restarts the 1000-step count
    t, _, lengths = d4rl.transitions_from_d4rl(raw, "v0.hdf5")
    assert np.array_equal(lengths, [10, 1000, 1000, 490])
    assert t.terminals.sum() == 1


def test_float64_file_becomes_float32_transitions(tmp_path):
    raw = hopper_arrays(dtype=np.float64)
    raw["observations"][0, 2] = 1.0 + 1e-12  # not representable in float32
    path = str(tmp_path / "hopper_f64.hdf5")
    write_d4rl_hdf5(path, raw)
    t = load_dataset(path).transitions
    for name, value in t.as_dict().items():
        assert value.dtype == np.float32, name
    assert np.array_equal(t.observations, raw["observations"].astype(np.float32))
    assert np.array_equal(t.rewards, raw["rewards"].astype(np.float32))


# ------------------------------------------------------------------------------------------------ names

def test_d4rl_names_map_to_the_files_d4rl_caches():
    assert d4rl.d4rl_file_name("hopper-medium-replay-v2") == "hopper_medium_replay-v2.hdf5"
    assert d4rl.d4rl_file_name("halfcheetah-expert-v2") == "halfcheetah_expert-v2.hdf5"
    assert d4rl.d4rl_file_name("walker2d-medium-expert-v2") == "walker2d_medium_expert-v2.hdf5"
    assert d4rl.d4rl_file_name("hopper-full-replay-v1") == "hopper_full_replay-v1.hdf5"
    assert d4rl.d4rl_file_name("hopper-mixed-v0") == "hopper_mixed.hdf5"
    assert d4rl.d4rl_file_name("hopper-medium-replay-v0") == "hopper_mixed.hdf5"
    assert d4rl.d4rl_file_name("walker2d-mixed-v0") == "walker_mixed.hdf5"
    assert d4rl.d4rl_file_name("halfcheetah-medium-expert-v0") == "halfcheetah_medium_expert.hdf5"
    assert d4rl.parse_d4rl_name("hopper-mixed-v2") is None  # "mixed" only existed in v0
    assert d4rl.parse_d4rl_name("hopper-medium-local") is None


def test_d4rl_name_loads_the_cached_file(tmp_path):
    os.makedirs(tmp_path / "d4rl")
    write_d4rl_hdf5(str(tmp_path / "d4rl" / "hopper_mixed.hdf5"), hopper_arrays())
    ds = load_dataset("hopper-mixed-v0")
    assert ds.name == "hopper-mixed-v0" and ds.env_id == "Hopper-v4"  # D4RL collected in gym's v3 models
    assert ds.path == str(tmp_path / "d4rl" / "hopper_mixed.hdf5")
    assert load_dataset("hopper-mixed-v0", "Hopper-v4").env_id == "Hopper-v4"


def test_missing_d4rl_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("hopper-medium-replay-v2")
    msg = str(e.value)
    assert "\n" not in msg
    assert "hopper_medium_replay-v2.hdf5" in msg
    assert str(tmp_path / "d4rl") in msg and str(tmp_path / "home" / ".d4rl" / "datasets") in msg
    assert "mb2po-data generate --env hopper --kind medium-replay" in msg
    assert "hopper-medium-replay-local" in msg


def test_missing_local_file_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match=r"hopper_medium_replay-local\.hdf5 not found.*"
                                        r"mb2po-data generate --env hopper --kind medium-replay"):
        load_dataset("hopper-medium-replay-local")


def test_local_name_reads_from_the_local_dir(tmp_path):
    path = registry.parse_local_name("walker2d-medium-expert-local").path
    assert path == str(tmp_path / "local" / "walker2d_medium_expert-local.hdf5")
    raw = hopper_arrays()
    write_d4rl_hdf5(str(tmp_path / "local" / "hopper_random-local.hdf5"), raw, {"env_id": "Hopper-v5"})
    ds = load_dataset("hopper-random-local")
    assert ds.env_id == "Hopper-v5" and ds.metadata == {"env_id": "Hopper-v5"}


def test_dataset_metadata_is_flattened_to_python_scalars(tmp_path):
    raw = hopper_arrays()
    raw["metadata/algorithm"] = np.bytes_(b"SAC")
    raw["metadata/iteration"] = np.int64(3)
    raw["metadata/policy/fc0/weight"] = np.ones((2, 2))  # arrays are not scalars: left out
    path = str(tmp_path / "hopper_meta.hdf5")
    write_d4rl_hdf5(path, raw, {"env_id": "Hopper-v5", "seed": 1})
    with h5py.File(path, "a") as f:
        f.attrs["seed"] = 99  # a root attribute loses to the metadata group's attribute
        f.attrs["note"] = "root"
    meta = load_dataset(path).metadata
    assert meta == {"algorithm": "SAC", "iteration": 3, "env_id": "Hopper-v5", "seed": 1, "note": "root"}
    assert all(type(v) in (str, int) for v in meta.values())


def test_env_ids_and_normalized_scores():
    assert env_id_for("hopper-medium-replay-v2") == "Hopper-v5"
    assert env_id_for("halfcheetah") == "HalfCheetah-v5"
    assert env_id_for("walker2d-mixed-v0", version="v4") == "Walker2d-v4"
    assert env_id_for("mujoco/walker2d/expert-v0") == "Walker2d-v5"
    assert env_id_for("Hopper-v4") == "Hopper-v4"
    with pytest.raises(DataError):
        env_id_for("cartpole-ish")
    for name in ("hopper", "hopper-medium-v2", "Hopper-v5", "hopper-random-local"):
        assert np.allclose(normalized_score(name, [-20.272305, 3234.3]), [0.0, 100.0])
    assert np.allclose(normalized_score("HalfCheetah-v5", 12135.0), 100.0)
    assert np.allclose(normalized_score("walker2d-medium-v2", [1.629008, 4592.3]), [0.0, 100.0])
    assert np.isnan(normalized_score("Pendulum-v1", [1.0, 2.0])).all()


# ------------------------------------------------------------------------------------------------ bad files

def write_hopper(tmp_path, name="hopper_bad.hdf5", **changes):
    raw = hopper_arrays()
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    path = str(tmp_path / name)
    write_d4rl_hdf5(path, raw)
    return path, raw


def expect_data_error(path_or_name, pattern, env=None):
    with pytest.raises(DataError) as e:
        load_dataset(path_or_name, env)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path_or_name)), msg
    import re

    assert re.search(pattern, msg), msg
    return msg


def test_missing_key_is_refused(tmp_path):
    path, _ = write_hopper(tmp_path, rewards=None)
    expect_data_error(path, r"missing key 'rewards'")


def test_length_mismatch_is_refused(tmp_path):
    path, raw = write_hopper(tmp_path)
    path, _ = write_hopper(tmp_path, actions=raw["actions"][:-1])
    expect_data_error(path, r"actions has 15 rows, observations has 16")


@pytest.mark.parametrize("key,value,what", [("observations", np.nan, "NaN"), ("rewards", np.inf, "inf"),
                                            ("next_observations", -np.inf, "inf")])
def test_non_finite_values_are_refused_with_row(tmp_path, key, value, what):
    raw = hopper_arrays()
    raw[key][11] = value
    path, _ = write_hopper(tmp_path, **{key: raw[key]})
    expect_data_error(path, rf"{key} has {what} at row 11")


def test_float64_beyond_float32_range_is_refused(tmp_path):
    raw = hopper_arrays(dtype=np.float64)
    raw["observations"][3, 0] = 1e300
    path, _ = write_hopper(tmp_path, observations=raw["observations"])
    expect_data_error(path, r"observations has value 1e\+300 beyond float32 range at row 3")


def test_observation_size_must_match_the_environment(tmp_path):
    raw = hopper_arrays()
    path, _ = write_hopper(tmp_path, observations=np.pad(raw["observations"], ((0, 0), (0, 1))),
                           next_observations=np.pad(raw["next_observations"], ((0, 0), (0, 1))))
    expect_data_error(path, r"observations have 12 dims, Hopper-v5 expects 11")
    expect_data_error(path, r"observations have 12 dims, HalfCheetah-v5 expects 17", env="HalfCheetah-v5")


def test_actions_outside_the_bounds_are_refused_with_row(tmp_path):
    raw = hopper_arrays()
    raw["actions"][5, 2] = 1.5
    raw["actions"][9, 0] = -3.0
    path, _ = write_hopper(tmp_path, actions=raw["actions"])
    expect_data_error(path, r"actions out of Hopper-v5's bounds at row 5: value 1.5 in dim 2, bounds \[-1, 1\]")


def test_actions_at_the_bound_up_to_rounding_are_accepted(tmp_path):
    raw = hopper_arrays()
    raw["actions"][5, 2] = np.nextafter(np.float32(1.0), np.float32(2.0))
    path, _ = write_hopper(tmp_path, actions=raw["actions"])
    assert len(load_dataset(path).transitions) == 16


def test_not_an_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "hopper_text.hdf5"
    path.write_text("observations,actions\n1,2\n")
    expect_data_error(str(path), r"not an HDF5 file")


def test_missing_file_and_unknown_names_are_refused(tmp_path):
    expect_data_error(str(tmp_path / "nope.hdf5"), r"file not found")
    expect_data_error("no-such-thing", r"not a D4RL name .* local name .* Minari id")


def test_flags_wrong_dtype_shape_and_empty_are_refused(tmp_path):
    raw = hopper_arrays()
    terminals = raw["terminals"].astype(np.float32)
    terminals[3] = 2.0
    path, _ = write_hopper(tmp_path, terminals=terminals)
    expect_data_error(path, r"terminals has value 2 at row 3 \(expected 0 or 1\)")
    path, _ = write_hopper(tmp_path, actions=np.zeros((16, 3), np.int64))
    expect_data_error(path, r"actions has dtype int64, expected float32 or float64")
    path, _ = write_hopper(tmp_path, rewards=np.zeros((16, 2), np.float32))
    expect_data_error(path, r"rewards must have shape \(16,\) or \(16, 1\)")
    empty = {k: v[:0] for k, v in hopper_arrays().items()}
    path = str(tmp_path / "hopper_empty.hdf5")
    write_d4rl_hdf5(path, empty)
    expect_data_error(path, r"dataset is empty")


def test_file_without_environment_needs_env(tmp_path):
    path, _ = write_hopper(tmp_path, name="mystery.hdf5")
    expect_data_error(path, r"cannot tell which environment.*pass --env")
    assert load_dataset(path, "Hopper-v5").env_id == "Hopper-v5"


def test_environment_from_metadata_and_validate_false(tmp_path):
    raw = hopper_arrays()
    raw["actions"][0, 0] = 5.0
    path = str(tmp_path / "mystery.hdf5")
    write_d4rl_hdf5(path, raw, {"env_id": "Hopper-v5"})
    expect_data_error(path, r"out of Hopper-v5's bounds at row 0")
    ds = load_dataset(path, validate=False)  # value checks skipped, structure still checked
    assert ds.env_id == "Hopper-v5" and ds.transitions.actions[0, 0] == 5.0


# ------------------------------------------------------------------------------------ the environment data came from

def right_foot_friction(env_id: str) -> float:
    """Sliding friction of Walker2d's right foot in the MuJoCo model `env_id` runs: 0.9 in gym's v3 model (which
    D4RL collected in, and Gymnasium's v4 keeps), 1.9 in Gymnasium's v5 (which our generator collects in)."""
    import mujoco

    from mb2po_jax.data.envs import make_env

    env = make_env(env_id)
    try:
        model = env.unwrapped.model
        return float(model.geom_friction[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "foot_geom"), 0])
    finally:
        env.close()


@pytest.mark.parametrize("name", ["walker2d-medium-replay-v2", "walker2d-mixed-v0", "walker_mixed",
                                  "/data/walker2d_medium_replay-v2.hdf5", "/data/walker_mixed.hdf5"])
def test_d4rl_names_resolve_to_the_model_d4rl_collected_in(name):
    assert right_foot_friction(dataset_env_id(name)) == pytest.approx(0.9)


def test_each_source_meets_the_model_its_data_came_from(tmp_path):
    from mb2po_jax.behavior import generation

    os.makedirs(tmp_path / "d4rl")
    raw = {k: np.zeros((20, 17), np.float32) if k.endswith("observations") else v
           for k, v in hopper_arrays((12, 8)).items()}
    raw["actions"] = np.zeros((20, 6), np.float32)
    write_d4rl_hdf5(str(tmp_path / "d4rl" / "walker2d_medium_replay-v2.hdf5"), raw)
    d4rl_data = load_dataset("walker2d-medium-replay-v2")
    assert right_foot_friction(d4rl_data.env_id) == pytest.approx(0.9)
    assert right_foot_friction(load_dataset("walker2d-medium-replay-v2", "Walker2d-v5").env_id) == pytest.approx(1.9)

    generation.generate("walker2d", "random", size=30)  # our own data: collected in v5
    local = load_dataset("walker2d-random-local")
    assert right_foot_friction(local.env_id) == pytest.approx(1.9)
    assert dataset_env_id("walker2d-random-local") == local.env_id

    # Minari: the env spec its metadata records, else (none recorded) v5, as Minari's MuJoCo data was made in.
    assert right_foot_friction(dataset_env_id("mujoco/walker2d/medium-v0")) == pytest.approx(1.9)
    data_dir = tmp_path / "minari" / "test" / "walker2d" / "old-v0" / "data"
    os.makedirs(data_dir)
    (data_dir / "metadata.json").write_text(json.dumps({"env_spec": json.dumps({"id": "Walker2d-v4"})}))
    assert right_foot_friction(dataset_env_id("test/walker2d/old-v0")) == pytest.approx(0.9)


@pytest.mark.parametrize("env_id,obs_dim,act_dim", [("Hopper-v4", 11, 3), ("Walker2d-v4", 17, 6),
                                                    ("HalfCheetah-v4", 17, 6)])
def test_v4_environments_make_and_step_quietly(env_id, obs_dim, act_dim):
    import warnings

    from mb2po_jax.data.envs import make_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gymnasium's "v4 is out of date" is expected and dropped, nothing else
        env = make_env(env_id)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, reward, terminated, truncated, _ = env.step(np.full(act_dim, 0.1, np.float32))
    env.close()
    assert obs.shape == (obs_dim,) and np.isfinite(obs).all() and np.isfinite(reward)

"""Minari datasets written by minari's own API, read back by ours."""

import os
import sys
import warnings

import numpy as np
import pytest

from mb2po_jax.data import load_dataset
from mb2po_jax.errors import DataError

DATASET_ID = "test/hopper/tiny-v0"


pytestmark = pytest.mark.usefixtures("data_dirs")


def _minari():
    return pytest.importorskip("minari", reason="minari is not installed (pip install 'minari[hdf5]')")


def collect_with_minari(num_episodes=6, max_episode_steps=40):
    """Random Hopper-v5 episodes through minari.DataCollector; returns what the env gave, per episode."""
    minari = _minari()
    import gymnasium as gym

    from mb2po_jax.data.envs import quiet_mujoco

    with quiet_mujoco():
        env = minari.DataCollector(gym.make("Hopper-v5", max_episode_steps=max_episode_steps))
    rng = np.random.default_rng(0)
    episodes = []
    for e in range(num_episodes):
        obs, _ = env.reset(seed=1000 + e)
        ep = {"obs": [obs], "actions": [], "rewards": [], "terminated": [], "truncated": []}
        while True:
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            ep["obs"].append(obs)
            ep["actions"].append(action)
            ep["rewards"].append(reward)
            ep["terminated"].append(terminated)
            ep["truncated"].append(truncated)
            if terminated or truncated:
                break
        episodes.append({k: np.asarray(v) for k, v in ep.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari's nags about missing author/description
        env.create_dataset(DATASET_ID, algorithm_name="uniform_random")
    env.close()
    return episodes


def test_minari_round_trip_matches_what_was_collected():
    episodes = collect_with_minari()
    # The data must contain both ways an episode ends, or the terminal/timeout check below means nothing.
    assert any(ep["terminated"][-1] for ep in episodes)
    assert any(ep["truncated"][-1] and not ep["terminated"][-1] for ep in episodes)

    ds = load_dataset(DATASET_ID)
    t = ds.transitions
    assert ds.name == DATASET_ID and ds.env_id == "Hopper-v5"
    assert ds.path == os.path.join(os.environ["MINARI_DATASETS_PATH"], "test", "hopper", "tiny-v0", "data")
    assert np.array_equal(ds.episode_lengths, [len(ep["actions"]) for ep in episodes])
    assert np.allclose(ds.episode_returns, [ep["rewards"].sum() for ep in episodes])

    expected_obs = np.concatenate([ep["obs"][:-1] for ep in episodes]).astype(np.float32)
    expected_next = np.concatenate([ep["obs"][1:] for ep in episodes]).astype(np.float32)
    assert np.array_equal(t.observations, expected_obs)
    assert np.array_equal(t.next_observations, expected_next)  # never the next episode's first state
    assert np.array_equal(t.actions, np.concatenate([ep["actions"] for ep in episodes]))
    assert np.array_equal(t.rewards, np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32))
    # Terminations are terminals; truncations (time limit) are not.
    assert np.array_equal(t.terminals, np.concatenate([ep["terminated"] for ep in episodes]).astype(np.float32))
    assert all(v.dtype == np.float32 for v in t.as_dict().values())
    assert ds.metadata["algorithm_name"] == "uniform_random"


def test_minari_data_is_validated_like_d4rl_data():
    minari = _minari()
    from minari.data_collector import EpisodeBuffer

    steps = 5
    obs = np.zeros((steps + 1, 11))
    obs[3, 4] = np.nan
    buffer = [EpisodeBuffer(observations=obs, actions=np.zeros((steps, 3), np.float32),
                            rewards=np.ones(steps), terminations=np.zeros(steps, bool),
                            truncations=np.eye(steps, dtype=bool)[-1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("test/hopper/nan-v0", buffer, env="Hopper-v5",
                                           algorithm_name="none")
    with pytest.raises(DataError, match=r"^test/hopper/nan-v0: observations has NaN at row 3$"):
        load_dataset("test/hopper/nan-v0")
    ds = load_dataset("test/hopper/nan-v0", validate=False)
    assert ds.num_transitions == steps


def test_missing_minari_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mujoco/hopper/medium-v0")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "minari" / "mujoco" / "hopper" / "medium-v0" / "data") in msg
    assert "minari download mujoco/hopper/medium-v0" in msg


def test_without_minari_installed_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "minari" / "mujoco" / "hopper" / "medium-v0" / "data")
    monkeypatch.setitem(sys.modules, "minari", None)  # makes `import minari` raise ImportError
    with pytest.raises(DataError, match=r"needs the minari package.*pip install"):
        load_dataset("mujoco/hopper/medium-v0")

"""SAC learns a real task, and the behaviour-policy run resumes exactly where it was killed."""
import json
import os

import jax
import numpy as np
import pytest

from mb2po_jax import behavior
from mb2po_jax.behavior import sac
from mb2po_jax.data import registry


def test_sac_learns_pendulum(tmp_path):
    """Pendulum-v1: uniform random actions score about -1200 (-1650 for this seed's evaluation starts);
    SAC swings up and balances (> -400 over 5 deterministic episodes) after 6000 env steps. ~15 s on 2 cores."""
    config = behavior.BehaviorConfig(
        total_steps=6000, start_steps=1000, steps_per_call=10, eval_every=1000, eval_episodes=5,
        checkpoint_every=6000, max_episode_steps=200,
        # Small, fast-learning nets keep this test short; the MuJoCo runs use the defaults.
        sac=sac.SACConfig(hidden_dims=(64, 64), batch_size=128, actor_lr=1e-3, critic_lr=1e-3, temp_lr=1e-3),
    )
    behavior.train_behavior("Pendulum-v1", str(tmp_path), seed=0, config=config, progress_interval_s=1e9)
    evals = behavior.read_evaluations(str(tmp_path))
    assert [e["step"] for e in evals] == list(range(1000, 6001, 1000))
    first, final = evals[0]["return"], evals[-1]["return"]
    assert first < -1000, first  # the untrained policy fails, so the bar below means something
    assert final > -400, [round(e["return"]) for e in evals]
    summary = json.loads((tmp_path / "behavior.json").read_text())
    assert summary["expert"]["step"] >= 5000
    # Snapshots are self-describing: the saved actor reproduces the run's deterministic actions.
    params, info = behavior.load_actor(str(tmp_path / "snapshots" / "actor_000006000.npz"))
    assert info["step"] == 6000 and info["eval_return"] == pytest.approx(final)
    obs = np.zeros((4, 3), np.float32)
    assert sac.deterministic_action(params, obs).shape == (4, 1)


def _tiny(total):
    return behavior.BehaviorConfig(
        total_steps=total, start_steps=100, steps_per_call=10, eval_every=100, eval_episodes=1,
        checkpoint_every=100, max_episode_steps=60,
        sac=sac.SACConfig(hidden_dims=(16, 16), batch_size=32),
    )


def test_resumed_hopper_run_equals_uninterrupted(tmp_path):
    """A run killed after a checkpoint and restarted produces the same transitions, parameters and
    evaluations as one that ran through: MuJoCo state, env RNG, episode counters and replay buffer
    all come back (episodes here end mid-segment by termination and by a 60-step time limit)."""
    config = _tiny(400)
    straight = behavior.train_behavior("hopper", str(tmp_path / "a"), seed=3, config=config, progress_interval_s=1e9)
    behavior.train_behavior("hopper", str(tmp_path / "b"), seed=3, config=config, progress_interval_s=1e9,
                            stop_at=200)
    with pytest.raises(ValueError, match="other settings"):  # another seed is another run
        behavior.train_behavior("hopper", str(tmp_path / "b"), seed=4, config=config, progress_interval_s=1e9)
    resumed = behavior.train_behavior("hopper", str(tmp_path / "b"), seed=3, config=config,
                                      progress_interval_s=1e9)

    log_a = behavior.load_replay_log(str(tmp_path / "a"))
    log_b = behavior.load_replay_log(str(tmp_path / "b"))
    assert log_a["rewards"].shape == (400,)
    assert log_a["terminals"].any() and log_a["timeouts"].any()
    for name in behavior.REPLAY_FIELDS:
        np.testing.assert_array_equal(log_a[name], log_b[name], err_msg=name)
    for x, y in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ret_a = [e["return"] for e in behavior.read_evaluations(str(tmp_path / "a"))]
    ret_b = [e["return"] for e in behavior.read_evaluations(str(tmp_path / "b"))]
    assert len(ret_a) == 4 and ret_a == ret_b
    assert os.path.exists(tmp_path / "b" / "behavior.json")


def test_update_is_pure_and_scan_matches_loop():
    """`update_steps` (one scan) equals k calls of the pure `update` on the same batches and keys."""
    state = sac.init_sac(jax.random.PRNGKey(0), 5, 2, sac.SACConfig(hidden_dims=(32, 32), batch_size=16))
    rng = np.random.default_rng(0)
    k = 3
    batches = {
        "observations": rng.normal(size=(k, 16, 5)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(k, 16, 2)).astype(np.float32),
        "rewards": rng.normal(size=(k, 16)).astype(np.float32),
        "next_observations": rng.normal(size=(k, 16, 5)).astype(np.float32),
        "terminals": (rng.uniform(size=(k, 16)) < 0.1).astype(np.float32),
    }
    key = jax.random.PRNGKey(1)
    scanned, metrics = jax.jit(sac.update_steps)(state, batches, key)
    looped, update = state, jax.jit(sac.update)
    for i, step_key in enumerate(jax.random.split(key, k)):
        looped, _ = update(looped, jax.tree.map(lambda x: x[i], batches), step_key)
    assert int(scanned.step) == k and metrics["critic_loss"].shape == (k,)
    for x, y in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_select_policies_follows_d4rl_recipe(tmp_path):
    """expert = best evaluation late in training; medium = the first snapshot that holds about a third of
    it (its own and its neighbours' evaluations), inside 25-50 normalised; medium-replay = all before it."""
    curve = {5000: 200.0, 10000: 600.0, 15000: 1050.0, 20000: 500.0, 25000: 1000.0, 30000: 1150.0,
             35000: 1100.0, 40000: 1250.0, 45000: 2500.0, 50000: 3300.0, 55000: 3150.0, 60000: 3000.0}
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, ret in curve.items():
            norm = float(registry.normalized_score("hopper", ret))
            f.write(json.dumps({"stage": "behavior", "step": step, "return": ret, "normalized_score": norm}) + "\n")
    out = behavior.select_policies(str(tmp_path), "Hopper-v5")
    assert out["expert"]["step"] == 50000  # best of the last 20 % (steps >= 48000)
    assert out["medium_target_return"] == pytest.approx(1100.0)
    # 15000 is a lucky spike (neighbours 600, 500); 25000's neighbourhood averages 883; 30000 holds.
    assert out["medium"]["step"] == 30000
    assert out["medium_replay"]["transitions"] == 30000
    assert len(out["medium_replay"]["snapshots"]) == 5

"""Online stage (issue 22): the replay mix, transition storage, counts, collapse figures, and a tiny
`awac,online` run end to end that resumes after a stop to the numbers of an uninterrupted run."""
import json
import os
import signal

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import awac, config as config_lib, online, pipeline, policy as policy_lib
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import hopper_termination
from test_pipeline import _write_hopper_file


# ------------------------------------------------------------------------------------ collapse figures
def test_collapse_figures_of_hand_made_curves():
    f = online.collapse_figures
    # A dip to 40 inside the first 10 % (steps <= 100 of 1000), back above 60 at step 400.
    assert f([0, 50, 100, 200, 400], [60, 45, 40, 55, 61], 1000) == {
        "start_score": 60.0, "collapse_depth": 20.0, "steps_to_recover": 400}
    # The low point after the first 10 % does not count towards the depth; never recovers.
    assert f([0, 100, 500], [60, 58, 10], 1000) == {
        "start_score": 60.0, "collapse_depth": 2.0, "steps_to_recover": None}
    # No collapse: depth 0, recovered (above the start) at the first evaluation.
    assert f([0, 100, 200], [60, 70, 80], 1000) == {
        "start_score": 60.0, "collapse_depth": 0.0, "steps_to_recover": 100}
    # No evaluation inside the first 10 %: depth not measured (None); equal to the start is not above it.
    assert f([200, 0, 400], [60, 60, 61], 1000) == {
        "start_score": 60.0, "collapse_depth": None, "steps_to_recover": 400}
    # Above the start first, then a collapse: recovery counts from the collapse's lowest point.
    assert f([0, 50, 100, 500], [60, 61, 20, 59], 1000) == {
        "start_score": 60.0, "collapse_depth": 40.0, "steps_to_recover": None}
    assert f([0, 50, 100, 500], [60, 61, 20, 62], 1000) == {
        "start_score": 60.0, "collapse_depth": 40.0, "steps_to_recover": 500}
    with pytest.raises(ValueError, match="step 0"):
        f([100], [1.0], 1000)


# ------------------------------------------------------------------------------------------ the replay
def _marked(n, value, obs_dim=3, act_dim=2):
    """n transitions whose every field is `value` (so a batch row tells where it came from)."""
    full = lambda *shape: jnp.full(shape, value, jnp.float32)
    return Transitions(observations=full(n, obs_dim), actions=full(n, act_dim), rewards=full(n),
                       next_observations=full(n, obs_dim), terminals=full(n))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_online_ratio_in_each_batch_is_exact(ratio):
    dataset = _marked(50, 0.0)
    ring = online.add(online.init_buffer(16, 3, 2), _marked(5, 1.0))
    batch_size = 37
    expected = int(round(ratio * batch_size))
    assert online.online_rows(batch_size, ratio) == expected
    for n_online in (expected, jnp.asarray(expected)):  # static, and traced (an annealed ratio's)
        fn = jax.jit(lambda key, n: online.mixed_batch(key, dataset, ring, batch_size, n))
        for k in range(3):
            batch = fn(jax.random.PRNGKey(k), n_online)
            rows = np.asarray(batch.rewards)
            assert rows.shape == (batch_size,) and rows.sum() == expected  # online rows first
            np.testing.assert_array_equal(rows, np.arange(batch_size) < expected)
            for leaf in jax.tree.leaves(batch):  # every field of a row from the same source
                np.testing.assert_array_equal(np.asarray(leaf).reshape(batch_size, -1).mean(1), rows)


def test_model_online_and_offline_rows_are_exact():
    from mb2po_jax import buffer as buf

    dataset = _marked(50, 0.0)
    ring = online.add(online.init_buffer(16, 3, 2), _marked(5, 1.0))
    model_ring = buf.add_rollout(buf.init_buffer(buf.BufferConfig(3, 2, num_slots=2, rows_per_slot=8)),
                                 _marked(8, 2.0), jnp.ones(8, bool))
    batch = online.mixed_batch(jax.random.PRNGKey(0), dataset, ring, 40, jnp.asarray(15), model_ring, 10)
    np.testing.assert_array_equal(np.asarray(batch.rewards), [2.0] * 10 + [1.0] * 15 + [0.0] * 15)


def test_model_arm_starts_its_rollouts_from_online_states_once_there_are_any():
    """The model arm's imagined rollouts start from states of the online ring (from D_beta's only while it
    is empty): with an ensemble that keeps the state (delta 0) and h = 1, each model row's observation is
    its start state."""
    from mb2po_jax import mb2po
    from mb2po_jax.termination import never_terminate
    from test_mb2po import _agents
    from test_rollout import ACT, OBS, hand_state

    models = hand_state(np.zeros((3, OBS + 1)), np.full((3, OBS + 1), -5.0), elites=[0, 1, 2])
    model_config = mb2po.MB2POConfig(imagined_steps=40, num_slots=2, horizon=1, penalty_coef=0.0)
    state = online.init_seeds(_agents(1), online.OnlineConfig(model=True, buffer_size=16), OBS, ACT,
                              models=jax.tree.map(lambda x: x[None], models), model_config=model_config)
    state = jax.tree.map(lambda x: x[0], state)
    dataset_observations = jnp.full((30, OBS), -3.0)

    def starts(state):
        state, metrics = online.imagine(state, dataset_observations, jnp.float32(0.0), model_config=model_config,
                                        termination_fn=never_terminate)
        assert int(metrics["model_rows"]) == 40
        written = np.asarray(state.ring.observations).reshape(-1, OBS)
        return written[np.any(written != 0.0, axis=1)]  # the ring's unwritten rows are zeros

    np.testing.assert_array_equal(starts(state), np.full((40, OBS), -3.0))  # an empty online ring: D_beta
    filled = state.replace(buffer=online.add(state.buffer, _marked(5, 4.0, OBS, ACT)))
    np.testing.assert_array_equal(starts(filled), np.full((40, OBS), 4.0))


def test_model_refit_changes_the_ensemble_and_keeps_its_normaliser_consistent():
    from mb2po_jax import dynamics as dyn

    rng = np.random.default_rng(0)
    cfg = dyn.DynamicsConfig(num_members=3, num_elites=2, hidden_dims=(16,), weight_decay=(1e-5, 1e-5),
                             batch_size=16, max_holdout=40)

    def rows(n, shift):  # online states far from the offline ones: the normaliser must move
        obs = (rng.normal(size=(n, 3)) + shift).astype(np.float32)
        return Transitions(observations=obs, actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                           rewards=rng.normal(size=n).astype(np.float32),
                           next_observations=(obs + 0.1).astype(np.float32), terminals=np.zeros(n, np.float32))

    offline = rows(200, 0.0)
    models, _, _ = dyn.init_seeds(jax.random.split(jax.random.PRNGKey(0), 2), offline, cfg)
    online_rows = jax.tree.map(lambda a, b: np.stack([a, b]), rows(100, 5.0), rows(100, 5.0))
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), 2))
    refit, metrics = online.refit_models(models, offline, online_rows, keys, epochs=2)

    for before, after in zip(jax.tree.leaves(models.params), jax.tree.leaves(refit.params)):
        assert not np.allclose(np.asarray(before), np.asarray(after))  # the ensemble changed
    assert np.all(np.asarray(refit.epoch) == np.asarray(models.epoch) + 2)
    assert np.all(np.isfinite(np.asarray(refit.best_holdout_mse)))
    for s in range(2):  # the normaliser is the combined training inputs' (what its epoch data used)
        inputs, targets = dyn.transitions_to_arrays(offline)
        more = dyn.transitions_to_arrays(jax.tree.map(lambda x: x[s], online_rows))
        train, _ = dyn.split_holdout(jax.random.split(jnp.asarray(keys[s]))[0], np.concatenate([inputs, more[0]]),
                                     np.concatenate([targets, more[1]]), cfg)
        mean, std = online.normalizer_stats(train["inputs"])
        np.testing.assert_allclose(np.asarray(refit.input_mean[s]), mean, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(refit.input_std[s]), std, rtol=1e-6)
        assert np.asarray(refit.input_mean[s])[0] > np.asarray(models.input_mean[s])[0] + 1.0
        # ... and the refit model predicts with it: its holdout MSE on the standardised holdout is the
        # snapshot's recorded one for its best member.
        one = jax.tree.map(lambda x: x[s], refit)
        _, hold = dyn.split_holdout(jax.random.split(jnp.asarray(keys[s]))[0], np.concatenate([inputs, more[0]]),
                                    np.concatenate([targets, more[1]]), cfg)
        norm = (hold["inputs"] - mean) / std
        mse = np.asarray(dyn.evaluate_holdout(one, jnp.asarray(norm), jnp.asarray(hold["targets"]))["mse"])
        np.testing.assert_allclose(mse, np.asarray(one.best_holdout_mse), rtol=1e-4)


def test_annealed_ratio_goes_from_start_to_target():
    cfg = online.OnlineConfig(ratio=0.5, ratio_start=0.1, ratio_anneal_steps=100, steps=1000,
                              steps_per_call=100, eval_every=100, checkpoint_every=100)
    got = [float(online.ratio_at(cfg, t)) for t in (0, 50, 100, 500)]
    np.testing.assert_allclose(got, [0.1, 0.3, 0.5, 0.5], rtol=1e-6)
    assert int(online.online_rows(256, online.ratio_at(cfg, 50))) == round(0.3 * 256)
    assert float(online.ratio_at(online.OnlineConfig(ratio=0.25), 0)) == 0.25


def test_ring_wraps_and_samples_only_filled_rows():
    ring = online.init_buffer(4, 3, 2)
    ring = online.add(ring, _marked(3, 1.0))
    assert (int(ring.size), int(ring.index)) == (3, 3)
    rows = np.asarray(online.sample(ring, jax.random.PRNGKey(0), 200).rewards)
    assert set(rows.tolist()) == {1.0}  # the empty 4th row is never drawn
    ring = online.add(ring, _marked(3, 2.0))  # rows 3, 0, 1
    assert (int(ring.size), int(ring.index)) == (4, 2)
    np.testing.assert_array_equal(np.asarray(ring.rewards), [2.0, 2.0, 1.0, 2.0])


# ----------------------------------------------------------------------------------- terminal vs timeout
class _Countdown(gym.Env):
    """obs = [steps into the episode, reset seed % 7]; terminates when the action's first entry is > 0.5."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.tag = 0, float(seed % 7)
        return np.array([0.0, self.tag]), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t), self.tag]), 1.0, bool(action[0] > 0.5), False, {}


def test_terminated_is_done_and_truncated_is_not():
    envs = online.EnvBatch(lambda: gym.wrappers.TimeLimit(_Countdown(), max_episode_steps=3), 1, 2, seed=0)
    ring = online.init_buffer(16, 2, 1)
    stored = []
    # env 0 terminates at its 2nd step; env 1 never terminates and is truncated at its 3rd.
    for a0 in (0.0, 1.0, 0.0, 0.0):
        rows = envs.step(np.array([[[a0], [0.0]]]))
        stored.append(rows)
        ring = online.add(ring, jax.tree.map(lambda x: jnp.asarray(x[0]), rows))
    term = np.stack([r.terminals[0] for r in stored])  # [step, env]
    np.testing.assert_array_equal(term, [[0, 0], [1, 0], [0, 0], [0, 0]])
    # The terminal row and the truncated row keep the episode's true last observation as s'...
    np.testing.assert_array_equal(stored[1].next_observations[0, 0][:1], [2.0])
    np.testing.assert_array_equal(stored[2].next_observations[0, 1][:1], [3.0])
    # ... while the next step starts from a fresh reset (a new episode, new reset seed).
    np.testing.assert_array_equal(stored[2].observations[0, 0][:1], [0.0])
    np.testing.assert_array_equal(stored[3].observations[0, 1][:1], [0.0])
    assert envs.episodes_done.tolist() == [2] and envs.terminated_episodes.tolist() == [1]
    # What the ring holds: done = 1 only for the terminated step (row 2 = step 1 of env 0).
    np.testing.assert_array_equal(np.asarray(ring.terminals)[:8], [0, 0, 1, 0, 0, 0, 0, 0])
    envs.close()


# ------------------------------------------------------------------------------------------ config
def test_online_settings_are_flags_and_the_model_arm_is_refused():
    cfg = config_lib.make_config("smoke", {"online_ratio": 0.25, "utd": 2, "online_envs": 2})
    assert (cfg.online.ratio, cfg.online.utd, cfg.online.envs, cfg.online.steps) == (0.25, 2, 2, 2000)
    assert config_lib.make_config("cpu").online.steps == 100_000
    assert config_lib.make_config("paper").online.steps == 250_000
    assert config_lib.flag_name("online", "ratio") == "--online_ratio"
    with pytest.raises(ConfigError, match="must not exceed 1"):
        config_lib.make_config("smoke", {"online_model": True, "online_ratio": 0.8, "model_ratio": 0.3})
    with pytest.raises(ConfigError, match="model_refit_every"):
        config_lib.make_config("smoke", {"online_model": True, "model_refit_every": 250})
    with pytest.raises(ConfigError, match="online_ratio"):
        config_lib.make_config("smoke", {"online_ratio": 1.5})
    with pytest.raises(ConfigError, match="multiple of --online_envs"):
        config_lib.make_config("smoke", {"online_envs": 3})


# ------------------------------------------------------------------------------------ end to end
TINY = dict(
    awac_steps=100, steps_per_call=50, eval_every=100, checkpoint_every=100, actor_hidden_dims=(32, 32),
    critic_hidden_dims=(32, 32), batch_size=32, eval_episodes=1, max_episode_steps=30, num_seeds=2,
    stages=("awac", "online"), online_steps=200, online_envs=2, online_steps_per_call=100,
    online_eval_every=100, online_checkpoint_every=100, online_buffer_size=400, utd=2, online_warmup_steps=20,
)


def _config(**overrides):
    return config_lib.make_config("smoke", {**TINY, **overrides})


def _online_checkpoint(workdir, data):
    run = pipeline.Run(str(workdir), data, None, _config(), log=lambda msg: None)
    try:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "online"))
        state, meta = ckpt.restore(run.init_online(run.finished_awac()))
        ckpt.close()
    finally:
        run.close()
    return state, meta


def _records(workdir):
    keep = lambda r: {k: v for k, v in r.items() if k not in ("time", "env_steps_per_s", "updates_per_s")}
    return [keep(json.loads(l)) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_awac_then_online_counts_storage_and_exact_resume(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    results = pipeline.Run(str(straight), data, None, _config(), log=lambda msg: None)()

    final = results["final"]["online"]
    assert set(final) >= {"return", "normalized_score", "start_score", "collapse_depth", "steps_to_recover"}
    assert all(len(final[k]) == 2 for k in ("return", "normalized_score", "start_score", "collapse_depth",
                                            "steps_to_recover"))
    # The online stage starts from the finished AWAC agent: its step-0 score is AWAC's final score.
    assert final["start_score"] == results["final"]["awac"]["normalized_score"]
    records = [r for r in _records(straight) if r["stage"] == "online"]
    assert [r["step"] for r in records if "return" in r] == [0, 100, 200]
    train = [r for r in records if "return" not in r]
    assert [r["step"] for r in train] == [100, 200]
    assert train[-1]["env_steps"] == [200, 200]  # --online_steps per seed
    assert train[-1]["updates"] == [2 * (200 - 20)] * 2  # --utd per env step after the 20 warm-up steps
    assert train[-1]["online_ratio"] == [0.5, 0.5]

    state, meta = _online_checkpoint(straight, data)
    assert meta["env_step"] == 200 and meta["done"]
    np.testing.assert_array_equal(np.asarray(state.env_steps), [200, 200])
    np.testing.assert_array_equal(np.asarray(state.updates), [360, 360])
    np.testing.assert_array_equal(np.asarray(state.buffer.size), [200, 200])
    # Stored done flags: 1 exactly for the terminated episodes' last steps, whose s' is unhealthy.
    terminals = np.asarray(state.buffer.terminals)[:, :200]
    assert terminals.sum(1).tolist() == train[-1]["terminated_episodes"]
    next_obs = np.asarray(state.buffer.next_observations)[:, :200]
    for s in range(2):
        unhealthy = np.asarray(hopper_termination(None, None, jnp.asarray(next_obs[s])))
        assert np.all(unhealthy[terminals[s] == 1])

    # load_policy finds the online stage (the newest finished one) and reads its agent.
    source = policy_lib.find_policy(str(straight), None, 1)
    assert (source.stage, source.step, source.finished) == ("online", 200, True)
    obs = np.asarray(next_obs[1, :5])
    np.testing.assert_allclose(np.asarray(policy_lib.make_policy(source)(obs)),
                               np.asarray(awac.act(jax.tree.map(lambda x: x[1], state.agent), obs)), atol=1e-6)

    # The same run stopped (as by SIGTERM) right after its step-100 evaluation, then rerun.
    holder = {}

    def log(msg):
        if msg.startswith("[online] env_step 100:"):
            holder["run"].stop.signal = signal.SIGTERM

    holder["run"] = pipeline.Run(str(stopped), data, None, _config(), log=log)
    with pytest.raises(pipeline.Stopped, match="stopped at env_step 100"):
        holder["run"]()
    assert not (stopped / "results.json").exists()
    messages = []
    resumed = pipeline.Run(str(stopped), data, None, _config(), log=messages.append)()
    assert "[online] resuming from env_step 100" in messages

    # Training AWAC on under an online stage made from it is refused (the online stage would be stale).
    with pytest.raises(ConfigError, match="--restart_from=online"):
        pipeline.Run(str(straight), data, None, _config(awac_steps=150), log=lambda msg: None)

    assert resumed["final"] == results["final"]
    assert _records(stopped) == _records(straight)
    other, other_meta = _online_checkpoint(stopped, data)
    assert other_meta == meta
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(other)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # The online settings are part of the workdir's identity once the stage has a checkpoint (more steps
    # extend it); --restart_from=online reopens them.
    pipeline.Run(str(straight), data, None, _config(online_steps=400), log=lambda msg: None).close()
    with pytest.raises(ConfigError, match="--online_ratio: was 0.5, now 0.25"):
        pipeline.Run(str(straight), data, None, _config(online_ratio=0.25), log=lambda msg: None)
    pipeline.Run(str(straight), data, None, _config(online_ratio=0.25), log=lambda msg: None,
                 restart_from="online").close()


def test_online_after_mb2po_continues_the_mb2po_agent(tmp_path):
    """`--stages online` in a workdir whose three stages are done starts from MB2PO's agent (read without
    its model ring): its step-0 score is MB2PO's final score."""
    from test_mb2po import TINY as MB2PO_TINY

    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    settings = {**MB2PO_TINY, **{k: v for k, v in TINY.items() if k.startswith("online") or k == "utd"},
                "mb2po_iterations": 2, "mb2po_eval_every": 2, "online_steps": 100, "online_warmup_steps": 0}
    workdir = str(tmp_path / "run")
    three = config_lib.make_config("smoke", {**settings, "stages": ("awac", "dynamics", "mb2po")})
    first = pipeline.Run(workdir, data, None, three, log=lambda msg: None)()
    messages = []
    cfg = config_lib.make_config("smoke", {**settings, "stages": ("online",)})
    results = pipeline.Run(workdir, data, None, cfg, log=messages.append)()
    assert any(m.startswith("[online] from the mb2po agent") for m in messages), messages
    assert results["final"]["online"]["start_score"] == first["final"]["mb2po"]["normalized_score"]
    assert set(results["final"]) == {"awac", "mb2po", "online"}


@pytest.mark.slow  # ~3 minutes on 2 busy cores: three runs of awac + dynamics + online with the model arm
def test_online_model_arm_refits_and_resumes_exactly(tmp_path):
    from test_mb2po import TINY as MB2PO_TINY

    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    settings = {**MB2PO_TINY, **{k: v for k, v in TINY.items() if k.startswith("online") or k == "utd"},
                "stages": ("awac", "dynamics", "online"), "online_model": True, "model_refit_every": 100,
                "model_refit_epochs": 2, "penalty_coef": 1000.0}  # a lambda the cap must lower
    cfg = config_lib.make_config("smoke", settings)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    messages = []
    results = pipeline.Run(str(straight), data, None, cfg, log=messages.append)()
    assert any("ensembles refit on" in m for m in messages), messages
    train = [r for r in _records(straight) if r["stage"] == "online" and "return" not in r]
    assert all(r["model_rows"][0] > 0 for r in train)
    lam = np.array(results["final"]["online"]["penalty_coef"])  # the smoke preset's cap, per seed
    assert np.all(lam < 1000.0)
    for r in train:  # the model arm's rollouts use it, after every refit too
        np.testing.assert_allclose(r["rollout_mean_penalty"], lam * np.array(r["rollout_mean_uncertainty"]),
                                   rtol=1e-4)

    holder = {}

    def log(msg):
        if msg.startswith("[online] env_step 100:") and "return" in msg:
            holder["run"].stop.signal = signal.SIGTERM

    holder["run"] = pipeline.Run(str(stopped), data, None, cfg, log=log)
    with pytest.raises(pipeline.Stopped):
        holder["run"]()
    resumed = pipeline.Run(str(stopped), data, None, cfg, log=lambda msg: None)()
    assert resumed["final"] == results["final"]
    assert _records(stopped) == _records(straight)

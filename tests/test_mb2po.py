"""MB2PO stage: one iteration's behaviour, the three-stage pipeline end to end, exact resume, memory refusal."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax import awac, config as config_lib, mb2po, parallel, pipeline, rollout as ro
from mb2po_jax.data.transitions import Transitions
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.errors import ConfigError
from mb2po_jax.termination import hopper_termination, never_terminate
from test_pipeline import _write_hopper_file
from test_rollout import hand_state, ACT, OBS

# Everything small: the point is behaviour, not learning.
TINY = dict(
    awac_steps=100, steps_per_call=50, eval_every=100, checkpoint_every=100, actor_hidden_dims=(32, 32),
    critic_hidden_dims=(32, 32), batch_size=32, eval_episodes=1, max_episode_steps=20,
    dynamics_steps=60, dynamics_hidden_dims=(32, 32), dynamics_weight_decay=(1e-5, 1e-5, 1e-5),
    max_holdout=200, imagined_steps=400, updates_per_iteration=10, num_slots=2, mb2po_iterations=4,
    mb2po_eval_every=4, mb2po_checkpoint_every=1, num_seeds=2,
)
STAGES = ("awac", "dynamics", "mb2po")


def _config(**overrides):
    return config_lib.make_config("smoke", {**TINY, "stages": STAGES, **overrides})


def _agents(num_seeds=2, obs_dim=OBS, act_dim=ACT):
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    cfg = awac.AWACConfig(actor_hidden_dims=(16,), critic_hidden_dims=(16,), batch_size=20)
    return awac.init_seeds(keys, obs_dim, act_dim, cfg)


def _dataset(n=300, obs_dim=OBS, act_dim=ACT, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return Transitions(observations=f32(obs), actions=f32(rng.uniform(-0.9, 0.9, (n, act_dim))),
                       rewards=f32(np.full(n, 7.0)), next_observations=f32(obs), terminals=f32(np.zeros(n)))


def _stack(tree, s):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (s,) + x.shape), tree)


def test_iteration_fills_the_ring_with_penalised_model_rows():
    # A hand-built ensemble: every member predicts reward 1 and std exp(-1) on each of the 3 dims.
    means = np.array([[0.0, 0.0, 1.0]] * 3)
    dyn_state = hand_state(means, np.full((3, 3), -2.0), elites=[0, 1, 2])
    cfg = mb2po.MB2POConfig(iterations=3, imagined_steps=100, updates_per_iteration=5, num_slots=2,
                            horizon=4, penalty_coef=2.0)
    state = mb2po.init_seeds(_agents(), cfg, OBS, ACT)
    step = parallel.make_iteration_fn(cfg, never_terminate)
    models, data = _stack(dyn_state, 2), _dataset()
    for k in range(3):
        state, metrics = step(state, models, data, parallel.penalty_coefs(cfg, 2))
    # 3 iterations into a ring of 2: both slots full, write index wrapped.
    np.testing.assert_array_equal(np.asarray(state.buffer.counts), [[100, 100]] * 2)
    np.testing.assert_array_equal(np.asarray(state.buffer.num_written), [3, 3])
    np.testing.assert_array_equal(np.asarray(state.iteration), [3, 3])
    assert np.all(np.asarray(state.agent.step) == 15)
    # Penalised reward = 1 - lambda * ||sigma||_2 with sigma_d = exp(-1) on 3 dims (bounded_var ~ exp(-2)).
    std = np.sqrt(np.exp(-10.0) + np.exp(0.5) / (1 + np.exp(2.5)))
    expected = 1.0 - 2.0 * np.sqrt(3) * std
    rewards = np.asarray(state.buffer.rewards)
    assert abs(rewards.mean() - expected) < 0.05 * abs(expected) + 0.05
    assert metrics["rollout_num_valid"].tolist() == [100, 100]
    # The seeds are independent programs: different policies, so different imagined actions.
    acts = np.asarray(state.buffer.actions)
    assert not np.allclose(acts[0], acts[1])


def test_learn_draws_omega_of_every_batch_from_the_data(monkeypatch):
    """Algorithm 1's mix inside MB2PO's learn step: each AWAC batch takes round(omega * B) rows of D_beta
    (reward 7 here) and the rest from the ring this iteration's rollout filled (reward 1 - penalty < 1)."""
    means = np.array([[0.0, 0.0, 1.0]] * 3)
    dyn_state = hand_state(means, np.full((3, 3), -2.0), elites=[0, 1, 2])
    data = _dataset()
    batches = []

    def train_steps(agent, pair, num_steps, sample_fn):  # one batch drawn as the scan's body would
        batches.append(sample_fn(pair, jax.random.PRNGKey(num_steps), 40))
        return agent, {}

    monkeypatch.setattr(awac, "train_steps", train_steps)
    cfg = mb2po.MB2POConfig(imagined_steps=100, num_slots=2, horizon=4, penalty_coef=2.0)
    state = jax.tree.map(lambda x: x[0], mb2po.init_seeds(_agents(1), cfg, OBS, ACT))
    imagine = jax.jit(lambda agent: mb2po.imagine(agent, dyn_state, data.observations, jnp.float32(2.0),
                                                  config=cfg, termination_fn=never_terminate))
    imagined = imagine(state.agent)
    for omega in (0.0, 0.25, 0.5, 1.0):
        mb2po.learn(state, imagined, data, config=dataclasses.replace(cfg, omega=omega))
        rewards = np.asarray(batches[-1].rewards)
        assert rewards.shape == (40,) and np.sum(rewards == 7.0) == round(omega * 40), omega
        assert np.all(rewards[round(omega * 40):] < 1.0), omega  # the model rows, after the data's


def test_terminated_trajectories_stop_adding_rows():
    # Hopper rule on obs_dim 2: height s[0] <= 0.7 terminates. Members push the height down by 0.3 per
    # step from 1.25, so every trajectory terminates at step 2 (1.25 -> 0.95 -> 0.65): 2 rows each.
    means = np.array([[-0.3, 0.0, 0.0]] * 3)
    dyn_state = hand_state(means, np.full((3, 3), -200.0), elites=[0, 1, 2])
    cfg = mb2po.MB2POConfig(iterations=1, imagined_steps=50, updates_per_iteration=1, num_slots=1,
                            horizon=5)
    data = _dataset()
    data = data.replace(observations=jnp.asarray(np.tile([[1.25, 0.0]], (300, 1)), jnp.float32))
    state = mb2po.init_seeds(_agents(), cfg, OBS, ACT)
    step = parallel.make_iteration_fn(cfg, hopper_termination)
    state, metrics = step(state, _stack(dyn_state, 2), data, parallel.penalty_coefs(cfg, 2))
    assert metrics["rollout_num_valid"].tolist() == [20, 20]  # 10 starts x 2 steps
    assert np.asarray(state.buffer.counts).tolist() == [[20], [20]]
    assert np.asarray(state.buffer.terminals)[:, :20].sum() == 2 * 10


def test_memory_check_refuses_what_cannot_fit():
    cfg = mb2po.MB2POConfig()  # the paper's ring: 100 x 1M rows
    ring, _ = parallel.check_fits(cfg, 11, 3, 1, available_bytes=None)
    assert abs(ring / 2**30 - 9.8) < 0.5  # 100 x 1M x (26 floats + 1 byte)
    with pytest.raises(ConfigError, match=r"num_slots.*imagined_steps.*bfloat16"):
        parallel.check_fits(cfg, 11, 3, 4, available_bytes=24 * 2**30)
    small = mb2po.MB2POConfig(imagined_steps=50_000, num_slots=20)
    parallel.check_fits(small, 11, 3, 4, available_bytes=24 * 2**30)


def _run(workdir, data, restart_from=None, **overrides):
    run = pipeline.Run(str(workdir), data, None, _config(**overrides), log=lambda msg: None,
                       restart_from=restart_from)
    return run, run()


def _mb2po_checkpoint(workdir, run):
    agents = run.finished_awac()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "mb2po"))
    state, meta = ckpt.restore(run.init_mb2po(agents))
    ckpt.close()
    return state, meta


def test_three_stages_write_metrics_and_resume_exactly(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_a, results = _run(straight, data)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == set(STAGES)
    dyn_records = [r for r in records if r["stage"] == "dynamics"]
    assert len(dyn_records[-1]["holdout_mse"]) == 2 and len(dyn_records[-1]["elites"][0]) == 5
    mb_records = [r for r in records if r["stage"] == "mb2po"]
    assert [r["step"] for r in mb_records if "return" not in r] == [1, 2, 3, 4]
    assert [len(r["normalized_score"]) for r in mb_records if "return" in r] == [2]
    assert set(results["final"]) == set(STAGES) - {"dynamics"}
    assert len(results["final"]["mb2po"]["return"]) == 2
    assert json.loads((straight / "results.json").read_text())["final"]["mb2po"] == results["final"]["mb2po"]

    # The same MB2PO stage in two calls, from the same AWAC and dynamics (a copy, MB2PO restarted): stop
    # after 2 iterations, then extend to 4. Bit-for-bit equality also shows the restart left nothing behind.
    shutil.copytree(straight, split)
    _run(split, data, restart_from="mb2po", mb2po_iterations=2)
    _, resumed = _run(split, data)
    a, meta_a = _mb2po_checkpoint(straight, run_a)
    b, meta_b = _mb2po_checkpoint(split, run_a)
    assert meta_a["iteration"] == meta_b["iteration"] == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed["final"]["mb2po"] == results["final"]["mb2po"]
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["stage"] == "mb2po" and "return" not in json.loads(l)]
    assert steps == [1, 2, 3, 4]  # each iteration's line once


def test_dynamics_stopped_mid_stage_resumes_to_the_uninterrupted_ensembles(tmp_path, monkeypatch):
    """A SIGTERM after the dynamics stage's 5th epoch stops it there with a checkpoint; a new process
    resumes from it and ends with the ensembles, bit for bit, and the per-epoch records of a run that was
    never stopped (the epoch keys, bootstrap and early-stopping state all come back)."""
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    straight, split = tmp_path / "straight", tmp_path / "split"
    stages = ("awac", "dynamics")
    run_a, _ = _run(straight, data, stages=stages)
    shutil.copytree(straight, split)
    make_epoch_fn = pipeline.dyn.make_train_epoch_seeds

    def stopping_after_5_epochs(config):
        epoch_fn, calls = make_epoch_fn(config), [0]

        def call(*args):
            out = epoch_fn(*args)
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler the run installed sets its flag
            return out
        return call

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.dyn, "make_train_epoch_seeds", stopping_after_5_epochs)
        with pytest.raises(pipeline.Stopped):
            _run(split, data, stages=stages, restart_from="dynamics")
    records = lambda w: [r for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                         if r["stage"] == "dynamics"]
    assert [r["epoch"] for r in records(split)] == [[e, e] for e in range(1, 6)]  # stopped after epoch 5
    run_b, _ = _run(split, data, stages=stages)  # the stage resumes (a fresh Run, as a new process makes)
    done = records(straight)
    assert len(done) > 5 and [r["epoch"] for r in records(split)] == [r["epoch"] for r in done]
    for a, b in zip(done, records(split)):
        for k in ("train_loss", "holdout_mse", "best_holdout_mse", "elites", "updates"):
            np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=f"epoch {a['epoch']} {k}")
    for x, y in zip(jax.tree.leaves(run_a.finished_dynamics()), jax.tree.leaves(run_b.finished_dynamics())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mb2po_alone_needs_finished_earlier_stages(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    with pytest.raises(ConfigError, match="run --stages=awac first"):
        _run(tmp_path / "run", data, stages=("mb2po",))
    assert not (tmp_path / "run" / "results.json").exists()


def test_cli_refuses_a_ring_that_cannot_fit(tmp_path):
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    out = subprocess.run(
        [sys.executable, "-m", "mb2po_jax.train", "--dataset", data, "--workdir", str(tmp_path / "run"),
         "--stages=awac,dynamics,mb2po", *flags, "--imagined_steps=100000000", "--num_slots=1000"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "GiB" in errors[0] and "--num_slots" in errors[0], out.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_cli_rollout_on_two_cpu_host_devices_equals_one_device_and_resumes(tmp_path):
    """One seed, `--cpu_devices=2` (the rollout split over 2 XLA host devices, the rest on the first), stopped
    after 2 iterations and resumed to 4 with the default: every MB2PO training metric matches the same
    run in this one-device process to float rounding, the counts exactly."""
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in {**TINY, "num_seeds": 1}.items()]

    def train(workdir, *extra):
        out = subprocess.run([sys.executable, "-m", "mb2po_jax.train", "--dataset", data, "--workdir",
                              str(tmp_path / workdir), "--stages=awac,dynamics,mb2po", *flags, *extra],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stderr

    def mb2po_records(workdir):  # training records (the stop at 2 adds an evaluation)
        lines = [json.loads(l) for l in (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "seconds_per_iteration")} for r in lines
                if r["stage"] == "mb2po" and "return" not in r]

    _run(tmp_path / "one", data, num_seeds=1)  # in this (one-device) process: the same flags as a config
    assert "MB2PO rollouts split over 2 CPU host devices" in train("two", "--cpu_devices=2",
                                                                    "--mb2po_iterations=2")
    assert "resuming from iteration 2" in train("two")
    one, two = mb2po_records("one"), mb2po_records("two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):  # a 2-device process's XLA:CPU threads round the last float bits differently
        assert a.keys() == b.keys()
        assert a["buffer_rows"] == b["buffer_rows"] and a["rollout_num_valid"] == b["rollout_num_valid"]
        for k in a.keys() - {"stage"}:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=f"step {a['step']} {k}")


def test_pipeline_sets_lambda_by_the_share_of_reward_it_takes_on_the_data(tmp_path):
    """With a lambda far too large for the ensemble (1000), the smoke preset's --penalty_share=0.5 (and its
    cap, --max_penalty_share=0.5) set it per seed to 0.5 * mean|r| / mean u on the data; the rollouts use
    that lambda (mean penalty = lambda_eff * mean u in every iteration's record) and results.json records
    it. With the share rule alone a far too small lambda (0.001) is raised to the same value; with neither,
    the task's lambda is used."""
    data = _write_hopper_file(tmp_path / "tiny.hdf5", n=1200)
    run, results = _run(tmp_path / "capped", data, penalty_coef=1000.0, mb2po_iterations=2, mb2po_eval_every=2)
    final = results["final"]["mb2po"]
    _, meta = _mb2po_checkpoint(tmp_path / "capped", run)
    assert meta["penalty"]["penalty_coef"] == final["penalty_coef"]  # what a resume continues with
    lam, u, r = np.array(final["penalty_coef"]), np.array(final["data_uncertainty"]), final["data_mean_abs_reward"]
    assert lam.shape == (2,) and np.all(lam < 1000.0) and u[0] != u[1]  # each seed its own ensemble
    np.testing.assert_allclose(lam * u / r, 0.5, rtol=1e-5)
    # r and u are the data's: the file's own mean |reward|, and each seed's finished ensemble (best
    # snapshots) over the file's pairs.
    with h5py.File(data, "r") as f:
        obs, act, rewards = f["observations"][:], f["actions"][:], f["rewards"][:]
    np.testing.assert_allclose(r, np.mean(np.abs(rewards)), rtol=1e-6)
    models = run.finished_dynamics()
    rollout_cfg = run.config.mb2po.rollout_config()
    own = [float(ro.dataset_uncertainty(jax.tree.map(lambda x: x[s], models), jnp.asarray(obs), jnp.asarray(act),
                                        rollout_cfg)) for s in range(2)]
    np.testing.assert_allclose(u, own, rtol=1e-4)

    def penalties(workdir):
        lines = [json.loads(l) for l in (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()]
        rows = [l for l in lines if l["stage"] == "mb2po" and "rollout_mean_penalty" in l]
        return [(np.array(l["rollout_mean_penalty"]), np.array(l["rollout_mean_uncertainty"])) for l in rows]

    for penalty, uncertainty in penalties("capped"):
        np.testing.assert_allclose(penalty, lam * uncertainty, rtol=1e-4)
    # From the same AWAC and dynamics (copies, MB2PO restarted: its settings may change): the share rule
    # without the cap raises a tiny lambda to the same values; with neither the task's lambda is used.
    shutil.copytree(tmp_path / "capped", tmp_path / "raised")
    _, raised = _run(tmp_path / "raised", data, restart_from="mb2po", penalty_coef=0.001, mb2po_iterations=1,
                     mb2po_eval_every=1, max_penalty_share=0.0)
    np.testing.assert_allclose(raised["final"]["mb2po"]["penalty_coef"], lam, rtol=1e-6)
    shutil.copytree(tmp_path / "capped", tmp_path / "uncapped")
    _, uncapped = _run(tmp_path / "uncapped", data, restart_from="mb2po", penalty_coef=1000.0, mb2po_iterations=1,
                       mb2po_eval_every=1, max_penalty_share=0.0, penalty_share=0.0)
    assert uncapped["final"]["mb2po"]["penalty_coef"] == [1000.0, 1000.0]
    for penalty, uncertainty in penalties("uncapped"):
        np.testing.assert_allclose(penalty, 1000.0 * uncertainty, rtol=1e-4)

"""Getting a trained policy (and its critics) out of a workdir: `load_policy`, `mb2po-eval` and
experiments/critic_check.py on one tiny finished run."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import mb2po_jax
from mb2po_jax import awac, config as config_lib, networks, parallel, pipeline
from mb2po_jax import policy as policy_lib
from mb2po_jax.checkpoint import Checkpointer
from mb2po_jax.errors import ConfigError, Mb2poError, WorkdirError
from test_pipeline import _write_hopper_file

# Tiny but whole: three stages, two seeds; the ring (2 slots x 2000 rows per seed) is far larger than the actor.
TINY = dict(
    stages=("awac", "dynamics", "mb2po"), num_seeds=2, awac_steps=100, steps_per_call=50, eval_every=100,
    checkpoint_every=100, actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=32,
    eval_episodes=1, final_eval_episodes=3, max_episode_steps=20, dynamics_steps=60, dynamics_hidden_dims=(32, 32),
    dynamics_weight_decay=(1e-5, 1e-5, 1e-5), max_holdout=200, imagined_steps=2000, updates_per_iteration=10,
    num_slots=2, mb2po_iterations=2, mb2po_eval_every=2, mb2po_checkpoint_every=1,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, Run) of a finished three-stage run."""
    root = tmp_path_factory.mktemp("policy")
    data = _write_hopper_file(root / "tiny.hdf5", n=1200)
    run = pipeline.Run(str(root / "run"), data, None, config_lib.make_config("smoke", TINY), log=lambda m: None)
    run()
    return root / "run", run


def _eval(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mb2po_jax.eval_cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def _training_states(workdir, run):
    """Each stage's final training state, restored whole, as the pipeline restores it."""
    with Checkpointer(os.path.join(workdir, "checkpoints", "awac")) as ckpt:
        agents, _ = ckpt.restore(run.init_awac())
    with Checkpointer(os.path.join(workdir, "checkpoints", "mb2po")) as ckpt:
        state, _ = ckpt.restore(run.init_mb2po(agents))
    return {"awac": agents, "mb2po": state.agent}


def test_load_policy_acts_as_the_training_state_without_reading_the_ring(finished, monkeypatch):
    workdir, run = finished
    restored = []  # everything load_policy reads from a checkpoint
    real_restore = Checkpointer.restore

    def spy(self, target, step=None, **kwargs):
        out = real_restore(self, target, step, **kwargs)
        restored.append(out[0])
        return out

    monkeypatch.setattr(Checkpointer, "restore", spy)
    policies = {(stage, seed): mb2po_jax.load_policy(workdir, stage=stage, seed=seed)
                for stage in ("mb2po", "awac") for seed in (0, 1)}
    default = mb2po_jax.load_policy(workdir)  # the newest finished stage: mb2po
    monkeypatch.setattr(Checkpointer, "restore", real_restore)

    ring = parallel.ring_bytes(run.config.mb2po, 11, 3, num_seeds=2)
    for tree in restored:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        assert not any("buffer" in p or "critic" in p or "opt_state" in p for p in paths), paths
        assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)) < ring / 20

    obs = np.random.default_rng(0).normal(size=(2, 7, 11)).astype(np.float32)
    obs[..., 0] += 1.25
    states = _training_states(workdir, run)
    for (stage, seed), policy in policies.items():
        expected = run.spaces.from_unit_actions(np.asarray(awac.act_seeds(states[stage], obs)))[seed]
        np.testing.assert_allclose(np.asarray(policy(obs[seed])), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(policy(obs[seed, 0])), expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(default(obs[0])), np.asarray(policies["mb2po", 0](obs[0])))
    assert not np.allclose(np.asarray(policies["awac", 0](obs[0])), np.asarray(policies["mb2po", 0](obs[0])))

    sampled = np.asarray(policies["mb2po", 0](obs[0], jax.random.PRNGKey(1)))
    assert sampled.shape == (7, 3) and np.all(np.abs(sampled) <= 1.0)  # Hopper's bounds are [-1, 1]
    assert not np.allclose(sampled, np.asarray(policies["mb2po", 0](obs[0])))
    with pytest.raises(ValueError, match=r"\[11\]"):
        policies["mb2po", 0](obs[0, :, :5])


def test_load_policy_errors_are_one_line(finished, tmp_path):
    workdir, _ = finished
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text((workdir / "config.json").read_text())
    cases = [
        (dict(workdir=tmp_path / "missing"), WorkdirError, "no such directory"),
        (dict(workdir=tmp_path), WorkdirError, "no config.json"),
        (dict(workdir=untrained), WorkdirError, "no AWAC, MB2PO or online checkpoint"),
        (dict(workdir=untrained, stage="mb2po"), WorkdirError, "mb2po stage has not been run"),
        (dict(workdir=workdir, seed=2), ConfigError, "seed 2 is out of range.*2 seed"),
        (dict(workdir=workdir, stage="dynamics"), ConfigError, "awac"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            mb2po_jax.load_policy(**kwargs)
        assert isinstance(info.value, Mb2poError) and "\n" not in str(info.value)


def test_mb2po_eval_prints_one_json_line(finished, tmp_path):
    workdir, _ = finished
    out = _eval(workdir, "--seed", 1, "--episodes", 2)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    result = json.loads(line)
    assert (result["stage"], result["seed"], result["env"], result["episodes"]) == ("mb2po", 1, "Hopper-v5", 2)
    assert len(result["returns"]) == 2 and result["lengths"] == [20, 20]
    assert result["return"] == pytest.approx(np.mean(result["returns"]))
    assert np.isfinite(result["normalized_score"]) and "mb2po-eval:" in out.stderr

    # The stage's own final episode count (--final_eval_episodes=3, not --eval_episodes=1) and seeds: the
    # training's final evaluation of that seed, to the last bit (`policy.evaluation_act_fn`; a float32
    # rescaling of the actions once gave other walker2d episodes). The count is the one the checkpoint
    # recorded with the score, not config.json's (which a restart under other settings rewrites): a copy
    # whose config.json says 1.
    final = json.loads((workdir / "results.json").read_text())["final"]
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    recorded = json.loads((copy / "config.json").read_text())
    recorded["config"]["final_eval_episodes"] = 1
    (copy / "config.json").write_text(json.dumps(recorded))
    for stage in ("awac", "mb2po"):
        out = _eval(copy, "--stage", stage, "--seed", 1)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["episodes"] == final[stage]["episodes"] == 3 and len(set(result["returns"])) > 1
        assert result["return"] == final[stage]["return"][1]
        assert result["normalized_score"] == final[stage]["normalized_score"][1]


def test_mb2po_eval_video(finished, tmp_path):
    workdir, _ = finished
    video = tmp_path / "hopper.mp4"
    out = _eval(workdir, "--episodes", 1, "--video", video)
    if out.returncode == 1 and out.stderr.startswith("error: --video"):
        pytest.skip(f"no offscreen rendering or video writer here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["video"] == str(video)
    assert video.read_bytes()[4:8] == b"ftyp"  # an MP4 container


def test_mb2po_eval_without_rendering_says_so_in_one_line(finished, tmp_path):
    workdir, _ = finished
    video = tmp_path / "hopper.mp4"
    out = _eval(workdir, "--video", video, env={**os.environ, "MUJOCO_GL": "nonsense"})
    assert out.returncode == 1
    assert out.stderr.startswith("error: --video") and len(out.stderr.splitlines()) == 1, out.stderr
    assert "cannot render Hopper" in out.stderr and "MUJOCO_GL=nonsense" in out.stderr, out.stderr  # the renderer
    assert out.stdout == "" and not video.exists()

    out = _eval(tmp_path / "missing")
    assert out.returncode == 1 and out.stderr.splitlines() == [f"error: {tmp_path / 'missing'}: no such directory"]


def _experiment(name: str):
    """experiments/<name>.py as a module (experiments/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_critic_check_reads_the_training_critics(finished, tmp_path):
    workdir, run = finished
    check = _experiment("critic_check")
    agents = _training_states(workdir, run)["mb2po"]
    loaded = policy_lib.load_agent(policy_lib.find_policy(workdir, "mb2po", seed=1), critics=True)
    for name in ("critic_params", "target_critic_params"):
        for x, y in zip(jax.tree.leaves(getattr(loaded, name)), jax.tree.leaves(getattr(agents, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[1])
    assert policy_lib.load_agent(policy_lib.find_policy(workdir, "mb2po")).critic_params is None
    every = policy_lib.load_agents(policy_lib.find_policy(workdir, "mb2po"))  # [S], one read
    for x, y in zip(jax.tree.leaves(every.actor_params), jax.tree.leaves(agents.actor_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    report = check.check(str(workdir), "mb2po", num_rows=10**6, chunk=500)  # every row, in 3 calls
    data = run.dataset.transitions  # Hopper acts in [-1, 1]: the policy's scale
    q = np.asarray(jax.vmap(lambda a: awac.critic_network(a.config).apply(
        a.critic_params, a.normalizer(data.observations), data.actions))(agents))  # [seeds, twins, rows]
    assert report["rows"] == len(data.rewards) and len(report["seeds"]) == 2
    for seed, figures in enumerate(report["seeds"]):
        assert figures["q_mean"] == pytest.approx(float(q[seed].min(0).mean()), rel=1e-4, abs=1e-5)
        assert figures["q_min"] == pytest.approx(float(q[seed].min()), rel=1e-4, abs=1e-5)
        assert figures["q_max"] == pytest.approx(float(q[seed].max()), rel=1e-4, abs=1e-5)
    lines = check.table(report).splitlines()
    assert len(lines) == 5 and lines[3].startswith("| 0 |") and lines[4].startswith("| 1 |")

    out = subprocess.run([sys.executable, str(pathlib.Path(check.__file__)), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"error: {tmp_path / 'missing'}: no such directory"]


@pytest.mark.parametrize("critic,transform", [("twin", False), ("quantile", True)])
def test_critic_check_values_are_in_return_units(critic, transform):
    """Q and the target by hand: h^-1 of each output (value transform), the mean over quantiles, the
    target from the target twins' min at a' ~ pi(.|s') (target parameters made unlike the critics')."""
    check = _experiment("critic_check")
    cfg = awac.AWACConfig(actor_hidden_dims=(16,), critic_hidden_dims=(16,), critic=critic,
                          value_transform=transform, num_quantiles=4)
    agent = awac.init(jax.random.PRNGKey(0), 5, 2, cfg)
    agent = agent.replace(target_critic_params=jax.tree.map(lambda x: 1.5 * x + 0.1, agent.critic_params))
    rng = np.random.default_rng(0)
    obs, next_obs = rng.normal(size=(2, 64, 5)).astype(np.float32)
    act = rng.uniform(-0.9, 0.9, size=(64, 2)).astype(np.float32)
    rewards, done = rng.normal(size=64).astype(np.float32), (rng.uniform(size=64) < 0.3).astype(np.float32)
    key = jax.random.PRNGKey(3)
    q, y = check.q_and_target(agent, obs, act, rewards, done, next_obs, key)

    net, actor = awac.critic_network(cfg), awac.actor_network(cfg, 2)
    to_return = ((lambda v: np.asarray(awac.inverse_value_transform(v, cfg.transform_eps))) if transform
                 else np.asarray)
    mean_k = (lambda v: v.mean(-1)) if critic == "quantile" else (lambda v: v)
    a_next = networks.tanh_gmm(*actor.apply(agent.actor_params, agent.normalizer(next_obs))).sample(seed=key)
    next_q = np.asarray(net.apply(agent.target_critic_params, agent.normalizer(next_obs), a_next)).min(0)
    expected_q = mean_k(to_return(np.asarray(net.apply(agent.critic_params, agent.normalizer(obs), act))))
    expected_y = rewards + cfg.gamma * (1 - done) * mean_k(to_return(next_q))
    np.testing.assert_allclose(np.asarray(q), expected_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y), expected_y, rtol=1e-4, atol=1e-4)


def test_critic_check_flags_the_rows_whose_values_no_return_can_reach():
    check = _experiment("critic_check")
    assert check.return_range(np.array([-1.0, 2.0]), 0.99) == pytest.approx((-100.0, 200.0))
    assert check.return_range(np.array([0.5, 2.0]), 0.99) == pytest.approx((0.5, 200.0))  # may end at once
    assert check.return_range(np.array([-3.0, -1.0]), 0.99) == pytest.approx((-300.0, -1.0))

    twins = np.stack([np.linspace(-10.0, 10.0, 1000), np.linspace(-9.0, 11.0, 1000)])
    rows = np.arange(1000) + 7
    y = np.linspace(-9.5, 10.5, 1000)
    clean = check.summarise(twins, y, rows, (-100.0, 200.0))
    assert clean["outside_fraction"] == 0 and clean["furthest"] == [] and clean["nonfinite"] == 0
    assert clean["td_mse"] == pytest.approx(0.5) and clean["worst_1pct_share"] == pytest.approx(0.01)

    q = twins.copy()
    q[0, 3], q[1, 900], q[0, 500] = -5000.0, 700.0, np.nan  # one twin down, the other twin up, one NaN
    flagged = check.summarise(q, y, rows, (-100.0, 200.0))
    assert flagged["outside_fraction"] == pytest.approx(0.003) and flagged["nonfinite"] == 1
    assert [(f["row"], f["q"]) for f in flagged["furthest"]][1:] == [(10, -5000.0), (907, 700.0)]
    assert flagged["furthest"][0]["row"] == 507  # the NaN row first: furthest of all
    assert flagged["outside_rows"] == [10, 507, 907] and clean["outside_rows"] == []
    assert flagged["q_min"] == -5000.0 and flagged["q_max"] == 700.0
    assert flagged["worst_1pct_share"] > 0.99 and flagged["outside_share"] > 0.99


def test_termination_check_reads_a_workdir_without_writing_it(finished, capsys):
    """experiments/termination_check.py reopens the workdir with its own recorded settings
    (`config_lib.from_dict`) and leaves config.json as training wrote it (it once rewrote it as a
    one-stage custom run); one report line pair per seed."""
    workdir, run = finished
    before = (workdir / "config.json").read_bytes()
    recorded = json.loads(before)["config"]
    assert config_lib.to_dict(config_lib.from_dict(recorded)) == config_lib.to_dict(run.config)
    _experiment("termination_check").check(str(workdir), run.dataset.path)
    out = capsys.readouterr().out.splitlines()
    assert (workdir / "config.json").read_bytes() == before
    assert [line.split(":")[0] for line in out if line.startswith("seed ")] == ["seed 0", "seed 1"]
    assert sum("AWAC policy, h = 5" in line for line in out) == 2

"""SAC-based D4RL-style kinds (medium, expert, medium-replay, medium-expert) from exported behaviour assets.

The assets come from a hand-made "finished run" (actor snapshots of a small SAC net, an evaluation curve, run.json)
exported with `behavior.export_assets`: the real export and generation code, without hours of training.
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_factories import hopper_unhealthy
from mb2po_jax import behavior
from mb2po_jax.behavior import generation, sac
from mb2po_jax.data import d4rl, load_dataset, read_d4rl_hdf5, registry
from mb2po_jax.data.cli import run
from mb2po_jax.errors import DataError

START_STEPS = 200
# Evaluation returns of the fake run: the expert is the best of the last 20 % (3000 at 2000); a third of it
# is 1000, first held at 600 (own return and neighbours' mean), inside hopper's 25-50 normalised band.
CURVE = {200: 100.0, 400: 950.0, 600: 1000.0, 800: 1050.0, 1000: 1500.0, 1200: 2000.0, 1400: 2400.0,
         1600: 2600.0, 1800: 2900.0, 2000: 3000.0}
MEDIUM_STEP, EXPERT_STEP = 600, 2000
SAC_KINDS = ("medium", "expert", "medium-replay", "medium-expert")


def random_actor(rng, obs_dim=11, act_dim=3, hidden=16):
    """Parameters of a (hidden, hidden) `sac` actor, drawn in numpy (no compilation): mean and log-std heads."""
    def dense(n_in, n_out, scale, bias=0.0):
        return {"kernel": rng.normal(0.0, scale / np.sqrt(n_in), (n_in, n_out)).astype(np.float32),
                "bias": np.full(n_out, bias, np.float32)}

    return {"MLP_0": {"Dense_0": dense(obs_dim, hidden, 1.0), "Dense_1": dense(hidden, hidden, 1.0)},
            "Dense_0": dense(hidden, act_dim, 0.5), "Dense_1": dense(hidden, act_dim, 0.1, bias=-1.0)}


def fake_run(workdir, curve=CURVE):
    """A behaviour workdir as `train_behavior` leaves it, as far as `export_assets` reads it."""
    config = behavior.BehaviorConfig(total_steps=2000, start_steps=START_STEPS, eval_every=200,
                                     checkpoint_every=200, sac=sac.SACConfig(hidden_dims=(16, 16), batch_size=32))
    os.makedirs(os.path.join(workdir, "snapshots"))
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"env_id": "Hopper-v5", "seed": 5, "config": dataclasses.asdict(config)}, f)
    rng = np.random.default_rng(0)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step, ret in curve.items():
            params = random_actor(rng)
            behavior.save_actor(os.path.join(workdir, "snapshots", f"actor_{step:09d}.npz"), params,
                                step=step, env_step=step, eval_return=ret)
            norm = float(registry.normalized_score("hopper", ret))
            f.write(json.dumps({"stage": "behavior", "step": step, "return": ret, "normalized_score": norm}) + "\n")
    return workdir


@pytest.fixture(scope="module")
def asset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("behavior")
    workdir = fake_run(str(root / "run"))
    behavior.export_assets(workdir, str(root / "assets" / "hopper"), replay_every=200)
    return root


@pytest.fixture(autouse=True)
def isolated_dirs(data_dirs, monkeypatch, asset_root):
    monkeypatch.setenv("MB2PO_BEHAVIOR_DIR", str(asset_root / "assets"))


def check_episode_flags(raw, max_episode_steps, seams=()):
    """Every episode ends in exactly one terminal or timeout, or at the end of the file (or of a part,
    `seams`: last rows of the medium half); timeouts exactly at `max_episode_steps`; terminals = falls."""
    terminals, timeouts = raw["terminals"], raw["timeouts"]
    assert terminals.dtype == bool and timeouts.dtype == bool
    assert not (terminals & timeouts).any()
    ends = d4rl.episode_ends(raw)
    flagged = terminals | timeouts
    unflagged_ends = set(np.flatnonzero(ends & ~flagged).tolist())
    assert unflagged_ends <= {len(terminals) - 1, *seams}, sorted(unflagged_ends)
    assert np.all(ends[flagged])  # no flag inside an episode
    starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
    length = np.zeros(len(terminals), int)
    for s, e in zip(starts, np.flatnonzero(ends)):
        length[s: e + 1] = np.arange(1, e - s + 2)
    assert np.array_equal(timeouts, (length == max_episode_steps) & ~terminals)
    assert np.array_equal(terminals, hopper_unhealthy(raw["next_observations"].astype(np.float64)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """make(kind, size, seed) -> path of a dataset made through the Python API, once per module (each
    policy's first use compiles its sampler, about a second)."""
    out = tmp_path_factory.mktemp("made")

    @functools.lru_cache(maxsize=None)
    def make(kind, size, seed):
        return generation.generate("hopper", kind, size=size, seed=seed, path=str(out / f"{kind}_{size}_{seed}.hdf5"))

    return make


def test_export_behavior_cli_writes_the_assets(asset_root, tmp_path, capsys):
    out = tmp_path / "mine" / "hopper"
    argv = ["export-behavior", str(asset_root / "run"), "--out", str(out), "--replay_every", "200"]
    assert run(argv) == 0
    stdout, err = capsys.readouterr()
    assert err == "" and stdout.count("\n") == 1
    for part in ("expert step 2000 return 3000.0 (normalized 92.8)", "medium step 600 return 1000.0",
                 "600 transitions (200 random, then 2 actors)",
                 f"MB2PO_BEHAVIOR_DIR={tmp_path / 'mine'} mb2po-data generate --env hopper"):
        assert part in stdout, part
    manifest = behavior.read_manifest(str(out))
    assert manifest == behavior.read_manifest(str(asset_root / "assets" / "hopper"))
    assert manifest["env_id"] == "Hopper-v5" and manifest["seed"] == 5
    assert [s["step"] for s in manifest["medium_replay"]["snapshots"]] == [200, 400]
    with open(out / "training_curve.json") as f:
        curve = json.load(f)
    assert curve["env_id"] == "Hopper-v5" and curve["evaluation"] == "10 deterministic episodes every 200 env steps"
    assert [(p["step"], p["return"]) for p in curve["curve"]] == list(CURVE.items())
    assert curve["curve"][-1]["normalized_score"] == 92.8

    assert run(["export-behavior", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    stdout, err = capsys.readouterr()
    assert stdout == "" and err.count("\n") == 1 and "no behaviour run there" in err
    flat = fake_run(str(tmp_path / "flat"), {s: 50.0 + s / 100 for s in CURVE})  # never near a third
    assert run(["export-behavior", flat, "--out", str(tmp_path / "y")]) == 1
    stdout, err = capsys.readouterr()
    assert stdout == "" and err.count("\n") == 1 and "no medium policy found" in err


@pytest.mark.parametrize("kind", ["medium", "expert"])
def test_single_policy_kinds(made, kind):
    path = made(kind, 60, 4)
    raw = read_d4rl_hdf5(path)
    assert raw["observations"].shape == (60, 11) and raw["observations"].dtype == np.float32
    assert np.all(np.abs(raw["actions"]) <= 1.0)
    check_episode_flags(raw, generation.MAX_EPISODE_STEPS)
    ds = load_dataset(path)
    assert ds.env_id == "Hopper-v5" and ds.num_transitions == 60
    meta = ds.metadata
    assert meta["algorithm"] == "sac" and meta["kind"] == kind and meta["env_id"] == "Hopper-v5"
    assert meta["seed"] == 4 and meta["size"] == 60 and meta["behavior_seed"] == 5
    assert meta["policy_step"] == {"medium": MEDIUM_STEP, "expert": EXPERT_STEP}[kind]
    assert meta["policy_eval_return"] == CURVE[meta["policy_step"]]
    assert meta["max_episode_steps"] == 1000
    for key in ("mb2po_jax_version", "gymnasium_version", "mujoco_version", "jax_version",
                "behavior_assets_sha256"):
        assert meta[key], key
    # The log-probabilities are those of the shipped actor's own distribution at the recorded actions.
    params, _ = behavior.load_actor(os.path.join(behavior.behavior_asset_dir("Hopper-v5"), f"{kind}.npz"))
    inside = np.all(np.abs(raw["actions"]) < 0.99, axis=1)  # float32 actions near +-1 lose the tanh's inverse
    assert inside.sum() > 10
    log_prob = sac.policy(params, raw["observations"][inside]).log_prob(raw["actions"][inside])
    np.testing.assert_allclose(raw["infos/action_log_probs"][inside], log_prob, rtol=1e-3, atol=1e-3)


def test_medium_replay_replays_the_run_up_to_medium(made, tmp_path):
    path = made("medium-replay", None, 0)
    raw = read_d4rl_hdf5(path)
    assert len(raw["rewards"]) == MEDIUM_STEP  # default size: every transition up to the medium policy
    check_episode_flags(raw, generation.MAX_EPISODE_STEPS)
    log_probs = raw["infos/action_log_probs"]
    np.testing.assert_allclose(log_probs[:START_STEPS], -3 * np.log(2.0), rtol=1e-6)  # uniform warm-up
    assert not np.any(np.isclose(log_probs[START_STEPS:], -3 * np.log(2.0), rtol=1e-6))
    meta = load_dataset(path).metadata
    assert meta["kind"] == "medium-replay" and meta["size"] == MEDIUM_STEP and meta["policy_step"] == MEDIUM_STEP
    assert meta["random_steps"] == START_STEPS and meta["policy_snapshots"] == 2
    with pytest.raises(DataError, match="has 600 transitions"):  # size may only make it smaller
        generation.generate("hopper", "medium-replay", size=601, path=str(tmp_path / "long.hdf5"))
    assert not os.path.exists(tmp_path / "long.hdf5")


def test_medium_expert_is_medium_rows_then_expert_rows(made):
    medium, expert = read_d4rl_hdf5(made("medium", 60, 4)), read_d4rl_hdf5(made("expert", 60, 4))
    path = made("medium-expert", 120, 4)
    both = read_d4rl_hdf5(path)
    arrays = [k for k in both if not k.startswith("metadata/")]
    assert "infos/qpos" in arrays and "next_observations" in arrays
    for key in arrays:
        np.testing.assert_array_equal(both[key], np.concatenate([medium[key], expert[key]]), err_msg=key)
    check_episode_flags(both, generation.MAX_EPISODE_STEPS, seams=(59,))
    ds = load_dataset(path)
    assert ds.num_transitions == 120
    # The seam ends the medium half's last episode: the episodes are those of the two files.
    assert ds.num_episodes == load_dataset(made("medium", 60, 4)).num_episodes + \
        load_dataset(made("expert", 60, 4)).num_episodes
    meta = ds.metadata
    assert meta["kind"] == "medium-expert" and meta["size"] == 120
    assert (meta["medium_size"], meta["expert_size"]) == (60, 60)
    assert (meta["medium_policy_step"], meta["expert_policy_step"]) == (MEDIUM_STEP, EXPERT_STEP)


def test_medium_expert_reuses_cached_halves_only_when_they_match(made, tmp_path, monkeypatch, capsys):
    """Cached local medium and expert files of the same seed and sizes are read, not rolled out again, and the
    result is byte-identical to a medium-expert made from scratch; a cached half of another seed is not used."""
    scratch = made("medium-expert", 120, 4)  # the local cache is empty for this one (fresh MB2PO_DATA_DIR)
    local = registry.local_name_for("hopper", "medium").path
    assert local.startswith(str(tmp_path)) and not os.path.exists(local)
    generation.generate("hopper", "medium", size=60, seed=4)
    generation.generate("hopper", "expert", size=60, seed=5)  # another seed: must not be reused
    capsys.readouterr()
    calls = []
    real = generation.rollout
    monkeypatch.setattr(generation, "rollout", lambda env_id, policy, size, seed, *a, **k:
                        calls.append((size, seed)) or real(env_id, policy, size, seed, *a, **k))
    out = generation.generate("hopper", "medium-expert", size=120, seed=4, path=str(tmp_path / "me.hdf5"))
    assert calls == [(60, 4)]  # only the expert half was rolled out
    err = capsys.readouterr().err
    assert f"[medium Hopper-v5] 60/60 rows reused from {local}" in err and "[expert Hopper-v5] 60/60 rows" not in err
    assert open(out, "rb").read() == open(scratch, "rb").read()


def test_time_limit_gives_timeouts_at_episode_ends(tmp_path):
    raw = read_d4rl_hdf5(generation.generate_sac("hopper", "medium", 150, 0, str(tmp_path / "t.hdf5"),
                                                 max_episode_steps=12))
    assert raw["timeouts"].sum() >= 2 and raw["terminals"].sum() >= 2  # both ways of ending show up
    check_episode_flags(raw, 12)
    assert raw["metadata/max_episode_steps"] == 12


def test_cli_makes_the_api_bytes_for_every_kind_and_info_reads_them(made, tmp_path, capsys):
    """Same arguments, same bytes: the CLI (by local name, the env named either way) and the API; another
    seed, other bytes. medium-replay's --size gives a prefix of the full rollout."""
    for env, kind, size, seed in (("hopper", "medium", 60, 4), ("hopper", "expert", 60, 4),
                                  ("Hopper-v5", "medium-expert", 120, 4), ("hopper", "medium-replay", 250, 0)):
        assert run(["generate", "--env", env, "--kind", kind, "--size", str(size), "--seed", str(seed)]) == 0
        out, err = capsys.readouterr()
        local = os.path.join(str(tmp_path / "local"), f"hopper_{kind.replace('-', '_')}-local.hdf5")
        assert out.count("\n") == 1 and f"wrote {local}: " in out and f" {size} transitions" in out
        # stderr: only progress lines, each ending with its "done" line; medium-expert reuses the two
        # halves just made (same seed and sizes) instead of rolling them out again
        assert all(re.match(r"\[(medium|expert|medium-replay) Hopper-v5\] \d+/\d+ ", l) for l in err.splitlines()), err
        assert sum(" done in " in l for l in err.splitlines()) == (0 if kind == "medium-expert" else 1), err
        assert sum(" rows reused from " in l for l in err.splitlines()) == (2 if kind == "medium-expert" else 0), err
        if kind == "medium-replay":
            short, full = read_d4rl_hdf5(local), read_d4rl_hdf5(made(kind, None, 0))
            for key in (k for k in short if not k.startswith("metadata/")):
                np.testing.assert_array_equal(short[key], full[key][:size], err_msg=key)
        else:
            assert open(local, "rb").read() == open(made(kind, size, seed), "rb").read(), kind
        assert run(["info", f"hopper-{kind}-local", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["valid"] and info["transitions"] == size and info["metadata"]["algorithm"] == "sac"
        assert info["metadata"]["kind"] == kind and info["metadata"]["seed"] == seed
        assert run(["info", f"hopper-{kind}-local"]) == 0
        assert f"metadata     kind = {kind}" in capsys.readouterr().out
    other = generation.generate("hopper", "medium", size=60, seed=5, path=str(tmp_path / "other.hdf5"))
    assert open(other, "rb").read() != open(made("medium", 60, 4), "rb").read()


def test_console_script_matches_the_python_api_byte_for_byte(made, tmp_path):
    """A fresh process (`python -m mb2po_jax.data.cli`) makes the same file as the API in this one."""
    cli = str(tmp_path / "cli.hdf5")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "mb2po_jax.data.cli", "generate", "--env", "hopper", "--kind",
                           "medium-expert", "--size", "120", "--seed", "4", "--out", cli],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    # stderr holds only the progress of the two halves, each ending with its "done" line
    lines = proc.stderr.splitlines()
    assert all(re.match(r"\[(medium|expert) Hopper-v5\] \d+/\d+ ", l) for l in lines), proc.stderr
    assert [l.split("]")[0] for l in lines if " done in " in l] == ["[medium Hopper-v5", "[expert Hopper-v5"]
    assert open(cli, "rb").read() == open(made("medium-expert", 120, 4), "rb").read()


def test_missing_assets_name_the_directory_and_how_to_make_them(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    monkeypatch.setenv("MB2PO_BEHAVIOR_DIR", str(empty))
    for kind in SAC_KINDS:
        with pytest.raises(DataError) as e:
            generation.generate("hopper", kind, size=10, path=str(tmp_path / "x.hdf5"))
        msg = str(e.value)
        assert str(empty / "hopper") in msg and "\n" not in msg
        assert "mb2po-data train-behavior --env hopper --workdir W" in msg
        assert f"mb2po-data export-behavior W --out {empty / 'hopper'}" in msg
    assert run(["generate", "--env", "hopper", "--kind", "medium", "--size", "10", "--out",
                str(tmp_path / "x.hdf5")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and str(empty / "hopper") in err
    assert not list(tmp_path.glob("*.hdf5"))
    (empty / "hopper").mkdir(parents=True)
    (empty / "hopper" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="manifest.json: not a behaviour-asset manifest"):
        generation.generate("hopper", "medium", size=10, path=str(tmp_path / "x.hdf5"))
    monkeypatch.delenv("MB2PO_BEHAVIOR_DIR")  # then the shipped assets are the ones looked for
    assert behavior.behavior_asset_dir("Walker2d-v5") == os.path.join(behavior.PACKAGE_BEHAVIOR_DIR, "walker2d")


def test_assets_for_another_env_or_missing_files_are_refused(asset_root, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="for Hopper-v5, not Hopper-v4"):
        generation.generate("Hopper-v4", "medium", size=10, path=str(tmp_path / "x.hdf5"))
    partial = tmp_path / "partial" / "hopper"
    partial.mkdir(parents=True)
    for name in ("manifest.json", "medium.npz"):
        (partial / name).write_bytes((asset_root / "assets" / "hopper" / name).read_bytes())
    monkeypatch.setenv("MB2PO_BEHAVIOR_DIR", str(tmp_path / "partial"))
    with pytest.raises(DataError, match="expert.npz, listed in manifest.json, is missing"):
        generation.generate("hopper", "medium-expert", size=10, path=str(tmp_path / "x.hdf5"))


def test_train_behavior_cli_resumes_with_the_runs_own_settings(tmp_path, monkeypatch, capsys):
    """The CLI wrapper: what it passes to `train_behavior`, and run again on the same workdir, the settings
    the run was started with (not the CLI's defaults), so that it continues the run. `train_behavior` itself
    (training, resuming exactly) is tested in test_sac; here a stand-in writes run.json as it does."""
    calls = []

    def fake_train(env_name, workdir, *, seed, config):
        config.validate()
        calls.append((env_name, seed, config))
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "run.json"), "w") as f:
            json.dump({"env_id": "Hopper-v5", "seed": seed, "config": dataclasses.asdict(config)}, f)
        with open(os.path.join(workdir, "behavior.json"), "w") as f:
            json.dump({"expert": {"step": config.total_steps}, "medium": {"step": 100}}, f)
        return {"step": config.total_steps, "last_eval": {"return": 812.25, "normalized_score": 25.5}}

    monkeypatch.setattr(behavior, "train_behavior", fake_train)
    workdir = str(tmp_path / "w")
    assert run(["train-behavior", "--env", "hopper", "--workdir", workdir]) == 0
    out, err = capsys.readouterr()
    assert calls[-1] == ("hopper", 0, behavior.BehaviorConfig())  # fresh run: the SAC protocol's defaults
    assert err == f"mb2po-data: starting SAC on Hopper-v5 in {workdir} (1000000 env steps, seed 0)\n"
    assert out == (f"trained SAC on Hopper-v5 to step 1000000 in {workdir}: last evaluation return 812.2 "
                   f"(normalized 25.5); expert step 1000000, medium step 100; next: mb2po-data export-behavior "
                   f"{workdir} --out {os.environ['MB2PO_BEHAVIOR_DIR']}/hopper\n")  # where generate will look

    tiny = behavior.BehaviorConfig(total_steps=300, start_steps=200, eval_every=100, checkpoint_every=100,
                                   sac=sac.SACConfig(hidden_dims=(16, 16), batch_size=32))
    fake_train("hopper", workdir, seed=3, config=tiny)  # a run started with other settings
    assert run(["train-behavior", "--env", "hopper", "--workdir", workdir, "--total_steps", "600"]) == 0
    assert "resuming SAC on Hopper-v5" in capsys.readouterr().err
    assert calls[-1] == ("hopper", 3, dataclasses.replace(tiny, total_steps=600))
    assert run(["train-behavior", "--env", "hopper", "--workdir", workdir, "--seed", "4"]) == 0
    assert calls[-1] == ("hopper", 4, dataclasses.replace(tiny, total_steps=600))  # the run says no, not the CLI
    capsys.readouterr()

    assert run(["train-behavior", "--env", "hopper", "--workdir", workdir, "--total_steps", "605"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        "error: BehaviorConfig.total_steps=605 must be a multiple of steps_per_call=10")
    assert run(["train-behavior", "--env", "nowhere", "--workdir", workdir]) == 1
    assert "cannot tell the environment" in capsys.readouterr().err

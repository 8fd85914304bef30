"""The per-task (h, lambda) table ships with the package: read from an installed wheel, one error if missing."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mb2po_jax import config as config_lib
from mb2po_jax.errors import ConfigError

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pip(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet"],
                         cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert out.returncode == 0, out.stderr


def test_task_table_ships_in_an_installed_wheel(tmp_path):
    if not (importlib.util.find_spec("wheel") or importlib.util.find_spec("setuptools.command.bdist_wheel")):
        pytest.skip("building a wheel offline needs the wheel package (pip install -e '.[test]')")
    # Build from a copy, so the shared source tree gets no build/ or egg-info written into it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(SOURCE_ROOT / name, src / name)
    shutil.copytree(SOURCE_ROOT / "mb2po_jax", src / "mb2po_jax", ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist"), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mb2po_jax-*.whl")
    target = tmp_path / "site"
    _pip("install", "--target", str(target), str(wheel), cwd=tmp_path)

    # Outside the source tree, with the editable install's path entry and finder taken away.
    check = f"""
import json, os, sys
source = {str(SOURCE_ROOT)!r}
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != source]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
from mb2po_jax import config
assert config.__file__.startswith({str(target)!r}), config.__file__
print(json.dumps(config.task_defaults("hopper-medium-v2")))
"""
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"horizon": 5, "penalty_coef": 5.0}


def test_missing_task_table_is_one_config_error(monkeypatch):
    monkeypatch.setattr(config_lib, "TASKS_RESOURCE", "configs/no_such_table.json")
    with pytest.raises(ConfigError, match=r"no_such_table\.json: the per-task table is missing .*--task_config"):
        config_lib.task_defaults("hopper-medium-v2")


def test_task_config_path_replaces_the_shipped_table(tmp_path):
    table = tmp_path / "tasks.json"
    table.write_text(json.dumps({"hopper-medium": {"horizon": 2, "penalty_coef": 0.5}}))
    assert config_lib.task_defaults("hopper-medium-v2", str(table)) == {"horizon": 2, "penalty_coef": 0.5}
    assert config_lib.task_defaults("walker2d-medium-v2", str(table)) == {}
    with pytest.raises(ConfigError, match="not found"):
        config_lib.task_defaults("hopper-medium-v2", str(tmp_path / "missing.json"))
    table.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the per-task table"):
        config_lib.task_defaults("hopper-medium-v2", str(table))


def test_paper_preset_is_the_papers_protocol():
    """Section 5 and Algorithm 1: 500k AWAC steps, N = 5 probabilistic models all drawn from and penalised
    over, 100k dynamics steps, 500 iterations of 1M imagined steps and 1000 updates, the last 100 iterations'
    data, a 5-component tanh-GMM actor, the exponentiated advantage clamped at 20 with a fixed alpha."""
    cfg = config_lib.make_config("paper", task=config_lib.task_defaults("hopper-medium-replay-v2"))
    assert cfg.awac_steps == 500_000 and cfg.dynamics_steps == 100_000
    assert cfg.dynamics.num_members == 5 and cfg.mb2po.rollout_members == "all"
    m = cfg.mb2po
    assert (m.iterations, m.imagined_steps, m.updates_per_iteration, m.num_slots) == (500, 1_000_000, 1000, 100)
    assert m.penalty == "max_std" and (m.horizon, m.penalty_coef) == (5, 1.0)
    a = cfg.awac
    assert (a.num_components, a.max_weight, a.temperature) == (5, 20.0, 1.0)


def test_final_scores_of_the_reporting_presets_average_100_episodes():
    """cpu and paper score each stage's final policy over 100 episodes per seed (curves over 10); smoke and a
    bare RunConfig over --eval_episodes; the flag overrides both."""
    for preset in ("cpu", "paper"):
        cfg = config_lib.make_config(preset)
        assert (cfg.eval_episodes, cfg.final_episodes) == (10, 100)
    assert config_lib.make_config("smoke").final_episodes == config_lib.make_config("smoke").eval_episodes == 2
    assert config_lib.make_config("smoke", {"eval_episodes": 4}).final_episodes == 4
    assert config_lib.make_config("cpu", {"final_eval_episodes": 7}).final_episodes == 7
    old = config_lib.from_dict({"eval_episodes": 10})  # a config.json recorded before the setting existed
    assert old.final_episodes == 10


def test_cpu_preset_ships_issue_18s_rule_and_paper_keeps_the_paper():
    """cpu: lambda from the data (share 0.5), omega 0.5, 100k dynamics steps; paper: the table's lambda, omega
    0.05, no cap. An identity recorded before --penalty_share existed reads as share 0 (its lambda was the
    table's), so such a workdir's MB2PO is not resumed under the rule unnoticed."""
    cpu, paper = config_lib.make_config("cpu"), config_lib.make_config("paper")
    assert (cpu.mb2po.penalty_share, cpu.mb2po.omega, cpu.dynamics_steps) == (0.5, 0.5, 100_000)
    assert (paper.mb2po.penalty_share, paper.mb2po.max_penalty_share, paper.mb2po.omega) == (0.0, 0.0, 0.05)
    old = config_lib.to_dict(cpu)
    del old["mb2po"]["penalty_share"]
    assert config_lib.with_added_fields(old)["mb2po"]["penalty_share"] == 0.0
    assert config_lib.from_dict(old).mb2po.penalty_share == 0.0


def test_every_preset_uses_the_papers_ensemble_and_mopos_is_a_flagfile():
    for preset in config_lib.PRESETS:
        cfg = config_lib.make_config(preset)
        assert (cfg.dynamics.num_members, cfg.mb2po.rollout_members) == (5, "all"), preset
    flagfile = pathlib.Path(__file__).parent.parent / "experiments" / "configs" / "mopo.flags"
    flags = dict(line.lstrip("-").split("=", 1) for line in flagfile.read_text().splitlines()
                 if line.startswith("--"))
    cfg = config_lib.make_config("cpu", {"num_members": int(flags["num_members"]),
                                         "num_elites": int(flags["num_elites"]),
                                         "rollout_members": flags["rollout_members"],
                                         "penalty": flags["penalty"]})
    assert (cfg.dynamics.num_members, cfg.dynamics.num_elites, cfg.mb2po.rollout_members) == (7, 5, "elites")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_this_programs_flags_by_stage_with_presets(flag):
    out = subprocess.run([sys.executable, "-m", "mb2po_jax.train", flag], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    groups = ["data and run:", "AWAC:", "dynamics:", "MB2PO:", "evaluation and checkpoints:", "devices and hosts:"]
    positions = [text.index(g) for g in groups]
    assert positions == sorted(positions)
    assert "--awac_steps (default: 500000)" in text and "presets: smoke=2000, cpu=100000, paper=500000" in text
    assert "--rollout_members (default: all)" in text and "--critic (default: twin)" in text
    assert "test_srcdir" not in text and "chex_" not in text  # absltest's and chex's flags stay in --helpfull
    assert "\nother:" not in text  # every flag of the program sits in a stage group


def test_default_workdir_names_tweaked_settings_apart_and_keeps_extended_runs_together():
    task = config_lib.task_defaults("hopper-medium-replay-local")

    def workdir(**overrides):
        config = config_lib.make_config("smoke", {"seed": 0, "stages": ("awac",), **overrides}, task)
        return config_lib.default_workdir("hopper-medium-replay-local", "smoke", config, task)

    plain = workdir()
    assert plain == os.path.join("workdirs", "hopper-medium-replay-local_smoke_seed0")
    # More steps or other intervals extend the same run: same workdir.
    assert workdir(awac_steps=5000, mb2po_iterations=7, eval_every=1000) == plain
    # Settings that define the run get their own workdir, named by a stable hash of the settings.
    tweaked = workdir(penalty_coef=2.0)
    assert tweaked.startswith(plain + "_") and len(tweaked) == len(plain) + 9
    assert workdir(penalty_coef=2.0) == tweaked
    assert len({tweaked, workdir(penalty_coef=3.0), workdir(num_seeds=2), workdir(actor_lr=1e-4)}) == 4
    # The task table's own value is not a tweak; --env is always named.
    assert workdir(penalty_coef=task["penalty_coef"]) == plain
    config = config_lib.make_config("smoke", {"seed": 0, "stages": ("awac",)}, task)
    assert config_lib.default_workdir("hopper-medium-replay-local", "smoke", config, task, "Hopper-v5") != plain


def test_default_workdir_keeps_minari_ids_apart_and_names_a_file_by_its_name(tmp_path):
    config = config_lib.make_config("smoke", {"seed": 0, "stages": ("awac",)})
    names = [config_lib.default_workdir(d, "smoke", config) for d in
             ("mujoco/hopper/medium-v0", "mujoco/walker2d/medium-v0")]
    assert names == [os.path.join("workdirs", "mujoco_hopper_medium-v0_smoke_seed0"),
                     os.path.join("workdirs", "mujoco_walker2d_medium-v0_smoke_seed0")]
    data = tmp_path / "data" / "mine.hdf5"
    data.parent.mkdir()
    data.write_bytes(b"")
    assert config_lib.default_workdir(str(data), "smoke", config) == os.path.join("workdirs", "mine.hdf5_smoke_seed0")

"""Multi-host runs, simulated by 2 CPU processes on this machine (jax.distributed over localhost, gloo
collectives): one seed per process, one writer of the run's files, the same per-seed results as one process
training both seeds, and a rerun that resumes from the checkpoints both processes wrote."""
import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from mb2po_jax import sharding
from mb2po_jax.errors import ConfigError
from subprocess_env import cpu_env
from test_pipeline import TINY, _write_hopper_file

AWAC = ["--preset=smoke", "--steps_per_call=10", "--eval_every=10", "--checkpoint_every=10", "--num_seeds=2",
        *TINY]
ALL_STAGES = ["--stages=awac,dynamics,mb2po", "--dynamics_steps=60", "--dynamics_hidden_dims=32,32",
              "--dynamics_weight_decay=1e-5,1e-5,1e-5", "--max_holdout=200", "--imagined_steps=400",
              "--updates_per_iteration=10", "--num_slots=2", "--mb2po_eval_every=2",
              "--mb2po_checkpoint_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(args):
    out = subprocess.run([sys.executable, "-m", "mb2po_jax.train", *args], capture_output=True, text=True,
                         timeout=600, env=cpu_env())
    assert out.returncode == 0, out.stderr
    return out


def _train_processes(args, n=2):
    """The same command on `n` processes (as on n hosts); returns their CompletedProcess-like results."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "mb2po_jax.train", *args,
                               f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
                               f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cpu_env()) for i in range(n)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{err}"
    return outs


def _lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _check_one_writer(workdir, outs, event_files):
    """`event_files`: {stage: invocations that wrote it}: one event file each, by process 0 alone."""
    lines = _lines(workdir)
    keys = [(r["stage"], r["step"], "return" in r) for r in lines]
    assert len(keys) == len(set(keys)), "a metrics line was written twice"
    runs = {run.name: len(list(run.iterdir())) for run in (workdir / "tensorboard").iterdir()}
    assert runs == event_files
    assert json.loads(outs[0][0].strip().splitlines()[-1])["final"]  # process 0 prints the summary
    assert "final" not in outs[1][0]
    return lines


def _assert_same_finals(a, b, rtol):
    assert a.keys() == b.keys()
    for stage in a:
        for k in ("return", "normalized_score"):
            assert len(a[stage][k]) == len(b[stage][k]) == 2
            np.testing.assert_allclose(a[stage][k], b[stage][k], rtol=rtol, err_msg=f"{stage} {k}")


def test_two_processes_equal_one_and_resume(tmp_path):
    """AWAC, 2 seeds: 20 steps on 2 processes, then a rerun extended to 30 steps (resumes from step 20 on
    both), against one process training both seeds for 30 steps."""
    data = _write_hopper_file(tmp_path / "tiny.hdf5")
    ref, multi = tmp_path / "ref", tmp_path / "multi"
    _train(["--dataset", data, "--workdir", str(ref), "--awac_steps=30", *AWAC])

    outs = _train_processes(["--dataset", data, "--workdir", str(multi), "--awac_steps=20", *AWAC])
    assert "2 devices (cpu) on 2 processes, seeds sharded" in outs[0][1]
    _check_one_writer(multi, outs, {"awac": 1})
    first = json.loads((multi / "results.json").read_text())
    assert first["num_seeds"] == 2 and first["num_processes"] == 2

    outs = _train_processes(["--dataset", data, "--workdir", str(multi), "--awac_steps=30", *AWAC])
    assert "[awac] resuming from step 20" in outs[0][1]
    lines = _check_one_writer(multi, outs, {"awac": 2})
    assert [r["step"] for r in lines if "critic_loss" in r] == [10, 20, 30]
    assert [r["step"] for r in lines if "return" in r] == [10, 20, 30]

    results = json.loads((multi / "results.json").read_text())
    expected = json.loads((ref / "results.json").read_text())
    assert results["num_seeds"] == 2 and len(results["final"]["awac"]["return"]) == 2
    _assert_same_finals(results["final"], expected["final"], rtol=1e-4)
    for got, want in zip((r for r in lines if "critic_loss" in r), (r for r in _lines(ref) if "critic_loss" in r)):
        np.testing.assert_allclose(got["critic_loss"], want["critic_loss"], rtol=1e-4)


@pytest.mark.slow
def test_two_processes_three_stages_equal_one_and_resume(tmp_path):
    """awac, dynamics, mb2po on 2 processes (2 MB2PO iterations, then a rerun extended to 3) against one
    process (3 iterations). 3-5 minutes on 2 busy cores."""
    data = _write_hopper_file(tmp_path / "tiny.hdf5")
    ref, multi = tmp_path / "ref", tmp_path / "multi"
    common = ["--dataset", data, "--awac_steps=20", *AWAC, "--eval_every=20", "--max_episode_steps=20",
              *ALL_STAGES]
    _train([*common, "--workdir", str(ref), "--mb2po_iterations=3"])
    _train_processes([*common, "--workdir", str(multi), "--mb2po_iterations=2"])
    outs = _train_processes([*common, "--workdir", str(multi), "--mb2po_iterations=3"])
    assert "[mb2po] resuming from iteration 2" in outs[0][1]
    lines = _check_one_writer(multi, outs, {"awac": 1, "dynamics": 1, "mb2po": 2})  # (awac, dynamics: done)
    assert [r["step"] for r in lines if r["stage"] == "mb2po" and "critic_loss" in r] == [1, 2, 3]
    results = json.loads((multi / "results.json").read_text())
    _assert_same_finals(results["final"], json.loads((ref / "results.json").read_text())["final"], rtol=1e-3)


# --------------------------------------------------------------------------------- flags and meshes
@pytest.mark.parametrize("kwargs, message", [
    (dict(process_id=1), "--process_id needs --coordinator_address and --num_processes"),
    (dict(num_processes=2, coordinator_address="localhost:1234"), "--coordinator_address needs --process_id"),
    (dict(num_processes=2, process_id=2, coordinator_address="localhost:1234"), "in [0, --num_processes)"),
    (dict(num_processes=0, process_id=0, coordinator_address="localhost:1234"), "--num_processes must be >= 1"),
    (dict(num_processes=2, process_id=0, coordinator_address="localhost"), "HOST:PORT"),
])
def test_bad_process_flags_are_refused_before_initialising(kwargs, message, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        sharding.initialize_processes(**kwargs)
    assert sharding.initialize_processes() is False  # no flag: one process, nothing initialised


def test_bad_process_flags_one_error_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mb2po_jax.train", "--process_id=1", "--workdir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=cpu_env())
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--process_id needs" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


class _Device:
    def __init__(self, process_index, id):
        self.process_index, self.id, self.platform = process_index, id, "cpu"

    def __repr__(self):
        return f"d{self.process_index}.{self.id}"


def test_meshes_take_the_same_devices_from_every_process():
    devices = [_Device(p, 4 * p + i) for p in (1, 0) for i in range(4)]  # 2 hosts x 4 devices, unordered
    with pytest.warns(UserWarning, match="using 4 of them"):
        mesh = sharding.run_mesh(4, devices)
    assert mesh.axis_names == (sharding.SEED_AXIS,)
    assert [(d.process_index, d.id) for d in mesh.devices.flat] == [(0, 0), (0, 1), (1, 4), (1, 5)]
    assert sharding.run_mesh(8, devices).size == 8
    one = sharding.run_mesh(1, devices)  # one seed: every device, rows split
    assert one.axis_names == (sharding.BATCH_AXIS,) and one.size == 8
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        sharding.run_mesh(3, devices)

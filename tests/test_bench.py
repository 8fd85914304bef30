"""`mb2po-bench`: one JSON object on stdout, clean failures, and a torch reference that really trains."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from benchmarks import awac as bench_awac
from subprocess_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout: `python -m benchmarks` runs from here


def _bench(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("mb2po-bench", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "benchmarks"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


HAVE_TORCH = importlib.util.find_spec("torch") is not None
AWAC_TINY = ("awac", "--hidden_dims", "32,32", "--steps_per_call", "10", "--min_time", "0.1",
             "--dataset_size", "1000")


def _one_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_awac_cli_prints_one_json_object_with_the_documented_keys():
    out = _one_json_line(_bench(*AWAC_TINY))
    for key in (
        "updates_per_s", "flops_per_update", "matmul_flops_per_s", "fraction_of_matmul_peak",
        "seconds_per_call", "compile_seconds", "obs_dim", "act_dim", "batch_size", "steps_per_call",
        "num_seeds", "config",
    ):
        assert key in out, key
    assert out["updates_per_s"] > 0
    assert 0 < out["fraction_of_matmul_peak"] < 2
    assert out["config"]["critic_hidden_dims"] == [32, 32]
    # The analytic count and the dots in the compiled program agree: a change to awac.update that adds or
    # drops matmuls has to update the count. (Tiny slack: XLA turns the width-1 output layer's input-grad
    # into an elementwise product, which the HLO count does not see.)
    assert out["hlo_matmul_flops_per_update"] == pytest.approx(out["flops_per_update"], rel=0.01)


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch not installed (the [bench] extra)")
def test_awac_cli_times_the_torch_reference_when_asked():
    out = _one_json_line(_bench(*AWAC_TINY, "--compare_torch", "--torch_threads", "1"))
    assert out["torch_updates_per_s"] > 0 and out["torch_threads"] == 1
    assert out["speedup_vs_torch"] == pytest.approx(out["updates_per_s"] / out["torch_updates_per_s"], rel=0.05)


@pytest.mark.skipif(HAVE_TORCH, reason="checks the message shown when PyTorch is missing")
@pytest.mark.parametrize("name", ["awac", "rollout"])
def test_compare_torch_without_torch_fails_with_one_line_before_any_work(name):
    proc = _bench(name, "--compare_torch")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "mb2po-bench: --compare_torch needs PyTorch, which is not installed "
        "(pip install -e '.[bench]', or drop --compare_torch)"]


@pytest.mark.parametrize("argv, code", [(["nonsense"], 2), ([], 2)])
def test_bad_benchmark_name_fails_with_one_line(argv, code):
    proc = _bench(*argv)
    assert proc.returncode == code
    assert proc.stdout == ""
    assert proc.stderr.strip()


@pytest.fixture
def torch_one_thread():
    # Two OpenMP threads on a busy 2-core machine wait on each other at every op (seconds per update).
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_torch_reference_update_reduces_critic_loss_on_a_fixed_batch(torch_one_thread):
    torch = torch_one_thread
    from benchmarks import torch_reference as tr

    torch.manual_seed(0)
    batch = tr.sample(tr.random_dataset(1000, 5, 2), 64)
    agent = tr.TorchAWAC(5, 2, hidden_dims=(64, 64))

    def critic_loss() -> float:
        with torch.no_grad():
            next_q = agent.min_q(agent.targets, batch["next_observations"],
                                  agent.actor.mean(batch["next_observations"]).clamp(-1, 1))
            y = batch["rewards"] + agent.gamma * (1 - batch["terminals"]) * next_q
            return sum(((c(batch["observations"], batch["actions"]) - y) ** 2).mean() for c in agent.critics).item()

    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    before = critic_loss()
    for _ in range(200):
        agent.update(batch)
    assert critic_loss() < 0.7 * before
    # The actor step is real too: every actor parameter moved.
    assert all(not torch.equal(a, p) for a, p in zip(actor_before, agent.actor.parameters()))


def test_update_flops_counts_the_critic_backward_on_both_halves():
    from mb2po_jax.awac import AWACConfig

    cfg = AWACConfig(actor_hidden_dims=(8,), critic_hidden_dims=(8,), num_components=1, batch_size=4)
    parts = bench_awac.update_flops(obs_dim=3, act_dim=1, config=cfg)
    critic_fwd_2b = 2 * 2 * (2 * 4) * (4 * 8 + 8 * 1)  # twin critics, 2B rows, widths [4, 8, 1]
    assert parts["critic_forward_2b"] == critic_fwd_2b
    # backward = weight grads of both layers + input grad of the second layer only
    assert parts["critic_backward_2b"] == 2 * 2 * (2 * 4) * (4 * 8 + 8 * 1 + 8 * 1)


def test_dynamics_flop_count_matches_the_compiled_gradient():
    out = _one_json_line(_bench("dynamics", "--num_members", "3", "--batch_size", "32", "--num_updates", "4",
                                "--min_time", "0.1"))
    assert out["minibatch_updates_per_s"] > 0 and 0 < out["fraction_of_matmul_peak"] < 2
    # Forward, weight gradients and the input gradients of all layers but the first: the analytic count and
    # the dots XLA compiled agree, so a change to the loss that adds or drops matmuls must update the count.
    assert out["hlo_matmul_flops_per_update"] == pytest.approx(out["flops_per_update"], rel=0.01)
    fwd = 3 * 2 * 32 * (14 * 200 + 3 * 200 * 200 + 200 * 24)
    assert out["flops_per_update"] == 3 * fwd - 3 * 2 * 32 * 14 * 200


@pytest.mark.parametrize("name, args, rate_key", [
    ("rollout", ["--steps", "2000", "--compare_torch", "--repeats", "1"], "imagined_steps_per_s"),
    ("mb2po", ["--imagined_steps", "2000", "--updates_per_iteration", "5", "--dataset_size", "500",
               "--repeats", "1", "--members", "all"], "seconds_per_iteration"),
])
def test_model_based_benchmarks_print_their_documented_keys(name, args, rate_key):
    if "--compare_torch" in args:
        pytest.importorskip("torch")
    proc = _bench(name, *args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip())
    assert out[rate_key] > 0 and out["matmul_flops_per_s"] > 0
    assert 0 < out["fraction_of_matmul_peak"] < 2
    if name == "rollout":
        assert out["torch_rows_per_s"] > 0 and out["speedup_vs_torch"] > 0
    else:
        assert out["imagined_steps"] == 2000 and out["projected_paper_protocol_hours"] > 0
        assert out["members_evaluated"] == 7  # --members all: the FLOP count covers every member


@pytest.mark.parametrize("name, args", [
    ("rollout", ["--steps", "2000", "--repeats", "1"]),
    ("mb2po", ["--imagined_steps", "2000", "--updates_per_iteration", "5", "--dataset_size", "500",
               "--repeats", "1"]),
])
def test_model_based_benchmarks_run_on_a_batch_mesh_of_cpu_host_devices(name, args):
    # --devices 2 on CPU: two XLA host devices (set before JAX starts), the trajectories split over them.
    out = _one_json_line(_bench(name, *args, "--devices", "2"))
    assert out["devices"] == 2 and out["fraction_of_matmul_peak"] > 0
    if name == "mb2po":
        assert out["mesh"].startswith("2 devices (cpu), one seed")


def test_more_devices_than_the_process_has_is_one_clear_error():
    code = ("import jax; jax.devices()\n"  # the backend is up: the host device count is fixed at 1
            "from benchmarks.common import bench_mesh\n"
            "from mb2po_jax.errors import ConfigError\n"
            "try:\n    bench_mesh(3)\nexcept ConfigError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=cpu_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--devices=3: only 1 cpu device(s)" in proc.stdout


def test_projected_paper_protocol_hours_scales_the_timed_sizes_to_the_papers():
    from benchmarks.mb2po import projected_paper_protocol_hours as hours

    # Paper size (`mb2po-bench all`): 500 iterations as timed.
    assert hours(36.0, 1_000_000, 1000, 0.7) == pytest.approx(5.0)
    # `mb2po-bench all --quick`: a tenth of the steps and of the updates, so ten times the timed iteration.
    assert hours(3.6, 100_000, 100, 0.7) == pytest.approx(5.0)
    # Each part scaled by its own ratio: the rollout (80 % of the time) at full size, the updates at 1/10.
    assert hours(7.2, 1_000_000, 100, 0.8) == pytest.approx(500 * 7.2 * (0.8 + 0.2 * 10) / 3600)
    assert hours(7.2, 1_000_000, 0, 1.0) == pytest.approx(1.0)  # no updates: nothing to scale them from

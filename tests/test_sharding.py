"""Several (forced host) devices give the same results as one: seeds sharded over them, or one seed's
rollout, ring and minibatch rows split over them."""
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import pytest

from mb2po_jax import sharding
from mb2po_jax.errors import ConfigError
from subprocess_env import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from mb2po_jax import awac, mb2po, parallel, sharding
    from mb2po_jax.termination import never_terminate
    from test_mb2po import _agents, _dataset, _stack
    from test_rollout import hand_state, OBS, ACT

    cfg = mb2po.MB2POConfig(imagined_steps=200, updates_per_iteration=20, num_slots=2, horizon=4)
    models = _stack(hand_state(np.array([[0.1, -0.1, 1.0]] * 3), np.full((3, 3), -2.0), [0, 1, 2]), 4)
    data = _dataset()
    mesh = sharding.run_mesh(4)
    step = parallel.make_iteration_fn(cfg, never_terminate)
    train = awac.make_train_steps(20)
    results = []
    for shard in (False, True):
        state = mb2po.init_seeds(_agents(4), cfg, OBS, ACT)
        m, d, lam = models, data, parallel.penalty_coefs(cfg, 4)
        if shard:
            state, m, lam = sharding.shard_seeds((state, m, lam), mesh)
            d = sharding.replicate(d, mesh)
        agent, _ = train(state.agent, d)
        state = state.replace(agent=agent)
        for _ in range(2):
            state, metrics = step(state, m, d, lam)
        results.append([np.asarray(x) for x in jax.tree.leaves(state)])
    leaf = state.agent.actor_params["params"]
    leaf = jax.tree.leaves(leaf)[0]
    worst = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3))) for a, b in zip(*results) if a.dtype.kind == "f")
    exact_ints = all(np.array_equal(a, b) for a, b in zip(*results) if a.dtype.kind != "f")
    print(json.dumps({{"devices": jax.device_count(), "mesh": mesh.size,
                      "shards": len({{s.device for s in leaf.addressable_shards}}),
                      "shard_rows": leaf.addressable_shards[0].data.shape[0],
                      "worst_relative_difference": worst, "exact_ints": exact_ints}}))
""")


ONE_SEED_SCRIPT = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from mb2po_jax import awac, mb2po, parallel, sharding
    from mb2po_jax.termination import never_terminate
    from test_mb2po import _agents, _dataset, _stack
    from test_rollout import hand_state, OBS, ACT

    # 88 trajectories in 2 chunks of 44: on 4 devices each chunk's trajectories are split 11 per device.
    cfg = mb2po.MB2POConfig(imagined_steps=352, updates_per_iteration=20, num_slots=2, horizon=4, chunk_size=44)
    models = _stack(hand_state(np.array([[0.1, -0.1, 1.0]] * 3), np.full((3, 3), -2.0), [0, 1, 2]), 1)
    agents, _ = awac.make_train_steps(20)(_agents(1), _dataset())
    mesh = sharding.run_mesh(1)
    results = []
    for m in (None, mesh):
        step = parallel.make_iteration_fn(cfg, never_terminate, m)
        state = parallel.init_sharded(jax.tree.map(np.array, agents), cfg, OBS, ACT, m)  # donated below
        d, dyn = sharding.replicate(_dataset(), m), sharding.shard_seeds(models, m)
        lam = sharding.shard_seeds(parallel.penalty_coefs(cfg, 1), m)
        hlo = step.lower(state, dyn, d, lam).compile().as_text()
        for _ in range(2):
            state, metrics = step(state, dyn, d, lam)
        results.append([np.asarray(x) for x in jax.tree.leaves(state)])
    # Every dimension of the matmuls of the sharded program (policy and ensemble layers, AWAC updates):
    # 44 (a whole chunk) or 11 (a device's share) can only be the trajectory axis (other sizes: 2, 3, 5, 6,
    # 8, 16, 32 and the minibatch's 20 / 5), whatever the ensemble's matmul layout.
    shapes = re.findall(r"f32\\[([0-9,]+)\\]\\{{[0-9,]+\\}} (?:dot|custom-call)\\(", hlo)
    dot_dims = sorted({{int(d) for shape in shapes for d in shape.split(",")}})
    ring = state.buffer.observations  # [S, slots, R, o]
    worst = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3))) for a, b in zip(*results) if a.dtype.kind == "f")
    print(json.dumps({{"mesh": [mesh.axis_names[0], mesh.size], "dot_dims": dot_dims,
                      "ring_rows": sorted((s.device.id, s.index[2].start, s.data.shape[2])
                                          for s in ring.addressable_shards),
                      "params_replicated": state.agent.step.sharding.is_fully_replicated,
                      "valid": int(np.asarray(metrics["rollout_num_valid"])[0]),
                      "partitionable": bool(jax.config.jax_threefry_partitionable),
                      "worst_relative_difference": worst,
                      "exact_ints": all(np.array_equal(a, b) for a, b in zip(*results) if a.dtype.kind != "f")}}))
""")


ROLLOUT_MESH_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from mb2po_jax import awac, mb2po, parallel, sharding
    from mb2po_jax.termination import never_terminate
    from test_mb2po import _agents, _dataset, _stack
    from test_rollout import hand_state, OBS, ACT

    compiled = []  # names of the programs XLA compiles, from JAX's compile log
    handler = logging.Handler()
    handler.emit = lambda record: compiled.append(record.getMessage().split("(")[1].split(")")[0])
    handler.addFilter(lambda record: record.getMessage().startswith("Compiling jit("))
    logging.getLogger("jax._src.interpreters.pxla").addHandler(handler)

    cfg = mb2po.MB2POConfig(imagined_steps=352, updates_per_iteration=20, num_slots=2, horizon=4, chunk_size=44)
    models = _stack(hand_state(np.array([[0.1, -0.1, 1.0]] * 3), np.full((3, 3), -2.0), [0, 1, 2]), 2)
    agents, _ = awac.make_train_steps(20)(_agents(2), _dataset())
    results = []
    layouts = {{s: [None if m is None else [m.axis_names[0], m.size] for m in sharding.cpu_layout(s, 2)]
               for s in (1, 2, 3, 4)}}
    for rollout_mesh in (None, sharding.cpu_layout(3, 2)[1]):
        step = parallel.make_iteration_fn(cfg, never_terminate, None, rollout_mesh)
        state = mb2po.init_seeds(jax.tree.map(np.array, agents), cfg, OBS, ACT)  # donated below
        jax.config.update("jax_log_compiles", rollout_mesh is not None)
        for _ in range(3):
            state, metrics = step(state, models, _dataset(), parallel.penalty_coefs(cfg, 2))
        jax.config.update("jax_log_compiles", False)
        results.append([np.asarray(x) for x in jax.tree.leaves(state)])
    print(json.dumps({{"devices": [d.platform for d in rollout_mesh.devices.flat], "layouts": layouts,
                      "compiled": sorted(name for name in compiled if name in ("imagine", "learn")),
                      "state_devices": sorted({{d.id for x in jax.tree.leaves(state) for d in x.devices()}}),
                      "iteration": np.asarray(state.iteration).tolist(),
                      "valid": np.asarray(metrics["rollout_num_valid"]).tolist(),
                      "identical": all(np.array_equal(a, b) for a, b in zip(*results))}}))
""")


def _run_on_host_devices(tmp_path, script_text, devices=4):
    script = tmp_path / "sharded.py"
    script.write_text(script_text.format(here=HERE))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         env=cpu_env(host_devices=devices))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_seed_mesh_handles_counts_that_do_not_divide():
    devices = ["d0", "d1", "d2", "d3"]
    with pytest.warns(UserWarning, match="using 2 of them"):
        assert sharding.run_mesh(6, devices).size == 2
    assert sharding.run_mesh(4, devices[:1]) is None  # one device: nothing to shard
    assert sharding.run_mesh(8, devices).size == 4


def test_sharded_seeds_equal_unsharded_run(tmp_path):
    """AWAC updates then two MB2PO iterations for 4 seeds, once on device 0 and once sharded over 4 forced
    host devices, in one subprocess (XLA_FLAGS must be set before jax starts)."""
    info = _run_on_host_devices(tmp_path, SCRIPT)
    assert (info["devices"], info["mesh"], info["shards"], info["shard_rows"]) == (4, 4, 4, 1)
    assert info["exact_ints"]  # step counters, ring counts, write indices
    assert info["worst_relative_difference"] < 1e-3


def test_one_seed_rows_split_over_devices_equal_one_device(tmp_path):
    """One seed, two MB2PO iterations on one device and on a 4-device batch mesh: the same state (same
    random draws), with every rollout chunk's trajectories and the ring's rows split 4 ways (read from the
    compiled program's matmul shapes and the ring's shards)."""
    info = _run_on_host_devices(tmp_path, ONE_SEED_SCRIPT)
    assert info["mesh"] == [sharding.BATCH_AXIS, 4] and info["partitionable"]
    assert 11 in info["dot_dims"] and 44 not in info["dot_dims"], info["dot_dims"]  # 44 per chunk / 4 devices
    assert info["ring_rows"] == [[0, 0, 88], [1, 88, 88], [2, 176, 88], [3, 264, 88]]  # R = 352 rows
    assert info["params_replicated"] and info["valid"] == 352
    assert info["exact_ints"]  # ring counts, write indices, step counters
    assert info["worst_relative_difference"] < 1e-3


def test_rollout_on_cpu_host_devices_equals_one_call(tmp_path):
    """Two seeds, three MB2PO iterations as one compiled call and as the CPU rollout-mesh pair (`imagine` on
    2 host devices, `learn` on the first): the same state bit for bit, each program compiled once (the
    second iteration reuses the first's), and the state stays on device 0. And the layout
    `mb2po-train --cpu_devices=2` picks for each seed count: a seed mesh when 2 divides it, else a rollout
    mesh."""
    info = _run_on_host_devices(tmp_path, ROLLOUT_MESH_SCRIPT, devices=2)
    assert info["devices"] == ["cpu", "cpu"]
    assert info["compiled"] == ["imagine", "learn"], info["compiled"]
    assert info["state_devices"] == [0]
    assert info["iteration"] == [3, 3] and info["valid"] == [352, 352]
    assert info["identical"]
    seeds, batch = [sharding.SEED_AXIS, 2], [sharding.BATCH_AXIS, 2]
    assert info["layouts"] == {"1": [None, batch], "2": [seeds, None], "3": [None, batch], "4": [seeds, None]}


def test_cpu_device_requests_that_cannot_be_met():
    cpu = jax.devices()[0]
    gpus = [types.SimpleNamespace(platform="gpu")] * 2
    assert sharding.cpu_layout(1, 1) == (None, None)
    with pytest.raises(ConfigError, match=r"--cpu_devices=2 needs 2 cpu devices, this process has 1"):
        sharding.cpu_layout(1, 2, devices=[cpu])
    with pytest.raises(ConfigError, match=r"--cpu_devices=2 is for CPU host devices; this run is on gpu"):
        sharding.cpu_layout(2, 2, devices=gpus)
    with pytest.raises(ConfigError, match=r"--cpu_devices=0 must be at least 1"):
        sharding.cpu_layout(1, 0)
    # The default (strict=False) falls back to the one-device layout instead.
    assert sharding.cpu_layout(1, 2, strict=False, devices=[cpu]) == (None, None)
    assert sharding.cpu_layout(2, 2, strict=False, devices=gpus) == (None, None)


def test_default_cpu_devices_only_where_they_gain(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert sharding.auto_cpu_devices(1, ("awac", "dynamics", "mb2po")) == 2
    assert sharding.auto_cpu_devices(2, ("awac",)) == 2  # seeds split: AWAC 1.1-1.2x
    assert sharding.auto_cpu_devices(1, ("awac",)) == 1
    assert sharding.auto_cpu_devices(3, ("awac",)) == 1
    assert sharding.auto_cpu_devices(2, ("dynamics",)) == 1  # 0.95x split
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert sharding.auto_cpu_devices(1, ("mb2po",)) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # the user's count stands
    assert sharding.auto_cpu_devices(1, ("mb2po",)) == 1

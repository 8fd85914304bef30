"""Seeds sharded over several (forced host) devices give the same per-seed results as one device."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mb2po_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    import jax, numpy as np
    from mb2po_jax import awac, mb2po, sharding
    from mb2po_jax.termination import never_terminate
    from test_mb2po import _agents, _dataset, _stack
    from test_rollout import hand_state, OBS, ACT

    cfg = mb2po.MB2POConfig(imagined_steps=200, updates_per_iteration=20, num_slots=2, horizon=4)
    models = _stack(hand_state(np.array([[0.1, -0.1, 1.0]] * 3), np.full((3, 3), -2.0), [0, 1, 2]), 4)
    data = _dataset()
    mesh = sharding.seed_mesh(4)
    step = mb2po.make_iteration_fn(cfg, never_terminate)
    train = awac.make_train_steps(20)
    results = []
    for shard in (False, True):
        state = mb2po.init_seeds(_agents(4), cfg, OBS, ACT)
        m, d = models, data
        if shard:
            state, m = sharding.shard_seeds((state, m), mesh)
            d = sharding.replicate(d, mesh)
        agent, _ = train(state.agent, d)
        state = state.replace(agent=agent)
        for _ in range(2):
            state, metrics = step(state, m, d)
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


def test_seed_mesh_handles_counts_that_do_not_divide():
    devices = ["d0", "d1", "d2", "d3"]
    with pytest.warns(UserWarning, match="using 2 of them"):
        assert sharding.seed_mesh(6, devices).size == 2
    assert sharding.seed_mesh(4, devices[:1]) is None  # one device: nothing to shard
    assert sharding.seed_mesh(8, devices).size == 4


def test_sharded_seeds_equal_unsharded_run(tmp_path):
    """AWAC updates then two MB2PO iterations for 4 seeds, once on device 0 and once sharded over 4 forced
    host devices, in one subprocess (XLA_FLAGS must be set before jax starts)."""
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT.format(here=HERE))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert (info["devices"], info["mesh"], info["shards"], info["shard_rows"]) == (4, 4, 4, 1)
    assert info["exact_ints"]  # step counters, ring counts, write indices
    assert info["worst_relative_difference"] < 1e-3

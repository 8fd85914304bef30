"""`mb2po-bench all`: every benchmark once, plus AWAC seed scaling, into one JSON file.

    mb2po-bench all --out bench.json            # paper sizes: 1M-step rollout, 1M + 1000-update iteration
    mb2po-bench all --quick --out bench.json    # small sizes, a few minutes on 2 CPU cores

The file holds {"device", "results": {"awac", "dynamics", "rollout", "mb2po", "seeds_scaling": [...]}}, each
entry the JSON the single benchmark prints; stdout gets the same object. Seed scaling times AWAC with 1, 2,
4, 8 seeds in one program: seed-updates per second should grow with seeds until the device is full.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax

from benchmarks import awac, dynamics, mb2po, rollout
from benchmarks.common import require_torch
from mb2po_jax import sharding


def run(out: str = "bench.json", quick: bool = False, seeds: tuple[int, ...] = (1, 2, 4, 8),
        compare_torch: bool = False) -> dict[str, Any]:
    """Runs awac, dynamics, rollout, mb2po and AWAC seed scaling; writes `out` and returns the same dict."""
    # Before JAX starts: the host devices `mb2po-train` would run its rollouts on (awac and dynamics use
    # the first, as the pipeline's first two stages do).
    sharding.request_cpu_devices(sharding.auto_cpu_devices(1, ("mb2po",)))
    if compare_torch:
        require_torch()
    steps = 100_000 if quick else 1_000_000
    updates = 100 if quick else 1000
    plan = {
        "awac": lambda: awac.run(steps_per_call=updates, dataset_size=100_000, min_time=0.5 if quick else 2.0,
                                 compare_torch=compare_torch),
        "dynamics": lambda: dynamics.run(num_updates=50 if quick else 200, min_time=0.5 if quick else 2.0),
        "rollout": lambda: rollout.run(steps=steps, repeats=1 if quick else 2, compare_torch=compare_torch),
        "mb2po": lambda: mb2po.run(imagined_steps=steps, updates_per_iteration=updates, repeats=1),
    }
    results: dict[str, Any] = {}
    for name, fn in plan.items():
        print(f"[bench all] {name}", file=sys.stderr, flush=True)
        results[name] = fn()
    scaling = []
    for s in seeds:
        print(f"[bench all] awac with {s} seed(s)", file=sys.stderr, flush=True)
        r = awac.run(num_seeds=s, steps_per_call=updates, dataset_size=100_000, min_time=0.5 if quick else 2.0)
        scaling.append({"num_seeds": s, "seed_updates_per_s": r["updates_per_s"],
                        "fraction_of_matmul_peak": r["fraction_of_matmul_peak"]})
    results["seeds_scaling"] = scaling
    report = {"device": str(jax.devices()[0]), "device_count": jax.device_count(), "quick": quick,
              "results": results}
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=float)
    os.replace(tmp, out)
    return report

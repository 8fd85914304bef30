"""Seeds across devices: the leading seed axis of every training state is sharded over a 1-D device mesh,
datasets are replicated, and the compiled seed-vmapped programs (`jit(vmap(...))`) are partitioned by XLA
from those input shardings (GSPMD): each device runs its own seeds, with no communication, because nothing
in a training step mixes seeds. Results equal a one-device run up to floating-point reduction order.

With one device (the CPU default) every function here is the identity, so single-device code pays nothing.
If `num_seeds` does not divide the number of devices, the mesh uses the largest device count that divides
it (with a warning): 3 seeds on 4 devices run on 3, 6 seeds on 4 devices on 2.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SEED_AXIS = "seeds"


def seed_mesh(num_seeds: int, devices: list | None = None) -> Mesh | None:
    """1-D mesh over the devices the seeds are split across; None when that is a single device."""
    devices = list(jax.devices() if devices is None else devices)
    n = math.gcd(num_seeds, len(devices))
    if n < len(devices) and len(devices) > 1:
        warnings.warn(f"{num_seeds} seed(s) do not divide over {len(devices)} devices: using {n} of them; "
                      f"choose --num_seeds as a multiple of {len(devices)} to use every device", stacklevel=2)
    if n <= 1:
        return None
    return Mesh(np.asarray(devices[:n]), (SEED_AXIS,))


def _put(tree: Any, sharding: NamedSharding) -> Any:
    def put(x):
        if not hasattr(x, "shape"):
            return x
        host = np.asarray(x)  # identical on every process, so each can fill its own shards
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_seeds(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf split over the mesh along its leading [S] axis."""
    return tree if mesh is None else _put(tree, NamedSharding(mesh, P(SEED_AXIS)))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf copied to every device of the mesh (datasets, shared inputs)."""
    return tree if mesh is None else _put(tree, NamedSharding(mesh, P()))


def describe(mesh: Mesh | None) -> str:
    if mesh is None:
        return f"1 device ({jax.devices()[0].platform})"
    return f"{mesh.size} devices ({mesh.devices.flat[0].platform}), seeds sharded over them"

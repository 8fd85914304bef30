"""Devices and hosts: where every array of a run lives. One 1-D device mesh per run, of one of two kinds.

- Seed mesh (axis "seeds", several seeds): the leading seed axis of every training state is split over the
  devices, datasets are replicated, and the compiled seed-vmapped programs (`jit(vmap(...))`) are
  partitioned by XLA from those input shardings (GSPMD): each device runs its own seeds with no
  communication, because nothing in a training step mixes seeds. If `num_seeds` does not divide the device
  count, the mesh uses the largest device count that divides it (with a warning): 3 seeds on 4 devices run
  on 3, 6 seeds on 4 devices on 2.
- Batch mesh (axis "batch", one seed on several devices): states are replicated; inside an MB2PO iteration
  the imagined trajectories, the model ring's rows and the AWAC minibatch rows are split over the devices
  (`constrain_rows`, `split_axis_sharding`), parameters stay replicated and XLA inserts the reductions.

Results equal a one-device run up to floating-point reduction order: every random draw is made with the
same key and shape whatever the layout (JAX's PRNG values do not depend on sharding; with
`jax_threefry_partitionable`, the default since JAX 0.5, a sharded draw is also computed shard by shard).

Several processes (multi-host, after `jax.distributed.initialize`): `jax.devices()` lists every process's
devices, the mesh takes the same number from each process (ordered by process, so process p holds a
contiguous block of seeds), and every array here is a global `jax.Array` of which each process builds and
fills only its own shards (`jax.make_array_from_callback`). Host code reads global arrays through `to_host`
(a collective: every process must call it at the same point) and evaluates the seeds it holds
(`process_seeds`, `local_rows`).

With one device and one process (the CPU default) every function here is the identity or a plain read.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mb2po_jax.errors import ConfigError

SEED_AXIS = "seeds"
BATCH_AXIS = "batch"


def _by_process(devices: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (getattr(d, "process_index", 0), getattr(d, "id", 0))):
        out.setdefault(getattr(d, "process_index", 0), []).append(d)
    return out


def run_mesh(num_seeds: int, devices: list | None = None) -> Mesh | None:
    """The run's mesh: a seed mesh for several seeds, a batch mesh for one seed on several devices, None
    for one device. Across processes, every process contributes the same number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    per_process = _by_process(devices)
    num_processes = len(per_process)
    if num_seeds == 1:
        return None if len(devices) == 1 else Mesh(np.asarray(_flatten(per_process)), (BATCH_AXIS,))
    if num_seeds % num_processes:
        raise ConfigError(f"--num_seeds={num_seeds} must be a multiple of the number of processes "
                          f"({num_processes}) so that every process holds the same number of seeds")
    n = math.gcd(num_seeds, len(devices))  # a multiple of num_processes when devices are even per process
    if n < len(devices) and len(devices) > 1:
        warnings.warn(f"{num_seeds} seed(s) do not divide over {len(devices)} devices: using {n} of them; "
                      f"choose --num_seeds as a multiple of {len(devices)} to use every device", stacklevel=2)
    if n <= 1:
        return None
    chosen = {p: ds[: n // num_processes] for p, ds in per_process.items()}
    return Mesh(np.asarray(_flatten(chosen)), (SEED_AXIS,))


def _flatten(per_process: dict[int, list]) -> list:
    return [d for p in sorted(per_process) for d in per_process[p]]


def is_batch_mesh(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.axis_names == (BATCH_AXIS,)


def _put_leaf(x: Any, sharding: NamedSharding) -> Any:
    if not hasattr(x, "shape"):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard if needed
        return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    host = np.asarray(x)  # identical on every process, so each fills only its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda x: _put_leaf(x, sharding), tree)


def shard_seeds(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf split over a seed mesh along its leading [S] axis (replicated on a batch mesh)."""
    if mesh is None:
        return tree
    return _put(tree, NamedSharding(mesh, P(SEED_AXIS) if not is_batch_mesh(mesh) else P()))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf copied to every device of the mesh (datasets, shared inputs)."""
    return tree if mesh is None else _put(tree, NamedSharding(mesh, P()))


def split_axis_sharding(ndim: int, mesh: Mesh, axis: int) -> NamedSharding:
    """Seed mesh: split the leading seed axis. Batch mesh: split `axis` (leaves with fewer dims replicated)."""
    if not is_batch_mesh(mesh):
        return NamedSharding(mesh, P(SEED_AXIS))
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXIS) if ndim > axis else P())


def constrain_rows(x: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Inside compiled code: the rows (`axis`) of every leaf of `x` split over a batch mesh; the identity
    otherwise. Under `vmap` the axis counts in the unbatched shape."""
    if not is_batch_mesh(mesh):
        return x
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, split_axis_sharding(a.ndim, mesh, axis)), x)


def split_policy_rows(policy_fn: Any, mesh: Mesh | None) -> Any:
    """`policy_fn(params, key, obs [C, o]) -> act [C, a]` with its observations and actions split by rows
    over a batch mesh (the function itself otherwise). Inside a rollout chunk this is the one place the
    trajectory axis is visible; XLA propagates the split to the ensemble forward and the random draws."""
    if not is_batch_mesh(mesh):
        return policy_fn
    return lambda params, key, obs: constrain_rows(policy_fn(params, key, constrain_rows(obs, mesh)), mesh)


def first_device_sharding(mesh: Mesh) -> jax.sharding.SingleDeviceSharding:
    """The mesh's first device, where a rollout mesh's run keeps everything but the rollout."""
    return jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])


def _host_device_count_preset() -> bool:
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


def request_cpu_devices(n: int) -> None:
    """Asks XLA:CPU for `n` host devices (`jax_num_cpu_devices`), unless XLA_FLAGS already fixes the count
    (the config would override it). Only works before JAX's first operation in the process; afterwards the
    process keeps the devices it has (callers check `jax.devices()`). Harmless on an accelerator."""
    if _host_device_count_preset():
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)  # read by the CPU backend only
    except RuntimeError:
        pass  # backends already started


def auto_cpu_devices(num_seeds: int, stages: tuple[str, ...] | list[str]) -> int:
    """The default host device count of a run, decided before JAX starts: 2 on a machine with at least 2
    cores, when XLA_FLAGS does not fix the host device count and the run has work that gains from two
    executors (`cpu_layout`): an MB2PO stage, or AWAC or online with an even number of seeds. Else 1.
    `cpu_layout(..., strict=False)` turns it into one device where it does not apply (an accelerator,
    several processes)."""
    gains = "mb2po" in stages or (("awac" in stages or "online" in stages) and num_seeds > 1
                                  and num_seeds % 2 == 0)
    return 2 if gains and (os.cpu_count() or 1) >= 2 and not _host_device_count_preset() else 1


def cpu_layout(num_seeds: int, n: int, strict: bool = True,
               devices: list | None = None) -> tuple[Mesh | None, Mesh | None]:
    """A run's (mesh, rollout mesh) over the first `n` CPU host `devices` (default: the process's).
    XLA:CPU runs one program's small elementwise ops on one thread while the other cores wait; two host
    devices are two executors, so one device's small ops overlap the other's matmuls.
    - n <= 1, or a request that cannot be met with strict=False: the default (`run_mesh(num_seeds)`, None).
    - num_seeds a multiple of n (> 1): a seed mesh over the n devices, each running its own seeds.
    - otherwise: every stage on the first device, and each MB2PO rollout split over a batch mesh of the n
      devices (`parallel.make_iteration_fn(rollout_mesh=)`).
    strict: a request that cannot be met is a ConfigError naming --cpu_devices."""
    if n < 1 and strict:
        raise ConfigError(f"--cpu_devices={n} must be at least 1")
    if n <= 1:
        return run_mesh(num_seeds), None
    devices = list(jax.local_devices() if devices is None else devices)
    problem = None
    if devices[0].platform != "cpu":
        problem = (f"is for CPU host devices; this run is on {devices[0].platform} (several seeds split over "
                   f"devices, or a batch mesh for one seed, use them by default)")
    elif jax.process_count() > 1:
        problem = "works in a single process only"
    elif len(devices) < n:
        problem = (f"needs {n} cpu devices, this process has {len(devices)} (the host device count is fixed "
                   f"when JAX starts: pass the flag to a fresh process)")
    if problem is not None:
        if strict:
            raise ConfigError(f"--cpu_devices={n} {problem}")
        return run_mesh(num_seeds), None
    if num_seeds > 1 and num_seeds % n == 0:
        return run_mesh(num_seeds, devices[:n]), None
    return run_mesh(num_seeds, devices[:1]), Mesh(np.asarray(devices[:n]), (BATCH_AXIS,))


# ------------------------------------------------------------------------------------------ processes
def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, auto: bool = False) -> bool:
    """`jax.distributed.initialize` from the CLI's flags, before any other JAX call; False (nothing done)
    when no flag asks for several processes. Either all three values are given (the coordinator address
    may come from $JAX_COORDINATOR_ADDRESS), or `auto` lets JAX detect the missing ones from the cluster
    environment (SLURM, Open MPI, Cloud TPU, Kubernetes). Raises ConfigError with one line on a bad mix."""
    flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    named = [k for k, v in flags.items() if v is not None]  # given on the command line
    if not named and not auto:
        return False
    given = dict(flags, coordinator_address=coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    missing = [k for k, v in given.items() if v is None]
    if missing and not auto:
        raise ConfigError(f"--{named[0]} needs {' and '.join('--' + k for k in missing)} too (or --distributed "
                          "to detect the missing values from the cluster environment)")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ConfigError(f"--process_id must be in [0, --num_processes), got {process_id} of {num_processes}")
    address = given["coordinator_address"]
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        raise ConfigError(f"--coordinator_address must be HOST:PORT, got {address!r}")
    try:
        jax.distributed.initialize(address, num_processes, process_id)
    except (ValueError, RuntimeError, TypeError) as e:
        hint = ("; no cluster environment detected: pass --coordinator_address, --num_processes and "
                "--process_id" if auto and missing else "")
        raise ConfigError(f"jax.distributed.initialize failed: {str(e).splitlines()[0] if str(e) else e!r}"
                          f"{hint}") from e
    return True


# ------------------------------------------------------------------------------------------ host side
def to_host(tree: Any) -> Any:
    """Numpy copies of every leaf, global arrays of several processes included. A collective when some
    leaf lives on other processes' devices: every process must call it at the same point."""

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def process_seeds(num_seeds: int, mesh: Mesh | None) -> slice:
    """The seeds this process evaluates: the ones whose shards it holds on a seed mesh; all of them on
    process 0 (none elsewhere) when states are not seed-sharded."""
    me = jax.process_index()
    if mesh is None or is_batch_mesh(mesh):
        return slice(0, num_seeds) if me == 0 else slice(0, 0)
    per_device = num_seeds // mesh.size
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not mine:
        return slice(0, 0)
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def local_rows(tree: Any, rows: slice) -> Any:
    """Rows `rows` of every leaf's leading axis, as arrays this process can compute with on its own
    (a global array's rows are read from this process's shards, which must hold them)."""

    def take(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x[rows] if hasattr(x, "shape") and np.ndim(x) else x
        if x.is_fully_replicated:
            return x.addressable_data(0)[rows]
        blocks = {}
        for shard in x.addressable_shards:
            start = shard.index[0].start or 0
            blocks.setdefault(start, shard.data)
        ordered = [np.asarray(blocks[s]) for s in sorted(blocks)]
        first = min(blocks)
        host = np.concatenate(ordered)
        if rows.start < first or rows.stop > first + host.shape[0]:
            raise ValueError(f"rows {rows} are not on this process (it holds [{first}, {first + host.shape[0]}))")
        return jax.numpy.asarray(host[rows.start - first: rows.stop - first])

    return jax.tree.map(take, tree)


def combine_over_processes(values: np.ndarray, owned: slice) -> np.ndarray:
    """values [S]: rows `owned` computed by this process (others arbitrary) -> every row, on every process
    (a collective with several processes; each row owned by exactly one process). Bit-exact for float64,
    which JAX would otherwise carry as float32: the rows travel as their raw 32-bit words."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    mask = np.zeros(values.shape[0], bool)
    mask[owned] = True
    words = np.ascontiguousarray(values).view(np.uint32).reshape(values.shape[0], -1)
    gathered = np.asarray(multihost_utils.process_allgather(words))  # [P, S, words]
    masks = np.asarray(multihost_utils.process_allgather(mask))  # [P, S]
    if not np.all(masks.sum(0) == 1):
        raise RuntimeError(f"evaluation: seeds owned by {masks.sum(0).tolist()} processes, expected 1 each")
    owner = np.argmax(masks, axis=0)
    rows = gathered[owner, np.arange(values.shape[0])]
    return np.ascontiguousarray(rows).view(values.dtype).reshape(values.shape)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective with several processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def describe(mesh: Mesh | None) -> str:
    procs = "" if jax.process_count() == 1 else f" on {jax.process_count()} processes"
    if mesh is None:
        return f"1 device ({jax.devices()[0].platform}){procs}"
    what = ("one seed, rollout and minibatch rows split over them" if is_batch_mesh(mesh)
            else "seeds sharded over them")
    return f"{mesh.size} devices ({mesh.devices.flat[0].platform}){procs}, {what}"

"""Shared pieces of the benchmarks: timing compiled calls and the machine's own matmul rate.

Figures are reported as a fraction of the float32 matmul rate measured in the same process, because the
machines we run on are shared and noisy: a ratio against a reference taken seconds apart is comparable
across sittings, an absolute rate is not.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mb2po_jax import sharding
from mb2po_jax.errors import ConfigError


class MissingDependency(RuntimeError):
    """A benchmark option needs a package that is not installed; `run` prints it as one line, exit 1."""


def require_torch() -> None:
    """Fail before any work when a `--compare_torch` reference is asked for without PyTorch installed."""
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("--compare_torch needs PyTorch, which is not installed "
                                "(pip install -e '.[bench]', or drop --compare_torch)")


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, min_time: float = 2.0, min_repeats: int = 3) -> float:
    """Best-of seconds per call of `fn` (already compiled; one warm-up call is made here)."""
    block(fn())
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_mesh(devices: int, num_seeds: int = 1) -> Mesh | None:
    """The run's mesh (`sharding.run_mesh`) over the first `devices` devices; None for one. On CPU, n > 1
    asks XLA for n host devices (`jax_num_cpu_devices`), which only works before JAX's first operation in
    the process: the CLI calls this first. The host devices share the machine's cores."""
    if devices <= 1:
        return None
    sharding.request_cpu_devices(devices)
    have = jax.devices()
    if len(have) < devices:
        raise ConfigError(f"--devices={devices}: only {len(have)} {have[0].platform} device(s) in this process "
                          f"(on CPU the host device count is fixed when JAX starts: pass --devices in a "
                          f"fresh process)")
    return sharding.run_mesh(num_seeds, have[:devices])


def bench_cpu_layout(num_seeds: int, cpu_devices: int) -> tuple[Mesh | None, Mesh | None]:
    """(mesh, rollout mesh) of a `mb2po-train --stages ...,mb2po --cpu_devices N` run (`sharding.cpu_layout`);
    0: the run's default (2 host devices on a CPU with 2+ cores, none on an accelerator). Call it before
    JAX's first operation in the process, as `bench_mesh`."""
    n = sharding.auto_cpu_devices(num_seeds, ("mb2po",)) if cpu_devices == 0 else cpu_devices
    if n > 1:
        sharding.request_cpu_devices(n)
    return sharding.cpu_layout(num_seeds, n, strict=cpu_devices != 0)


def matmul_flops_per_s(n: int | None = None, repeats: int = 8, min_time: float = 1.5,
                       mesh: Mesh | None = None) -> float:
    """float32 [n,n] @ [n,n] rate through XLA on the default device (at JAX's default matmul precision, as
    the benchmarked programs run), chained so nothing is skipped. n: 1024 on CPU, 8192 on an accelerator
    (a GPU needs that size to reach its rate: at 1024 a product is a few microseconds, launch-bound). With a
    mesh: every device of it runs its own chain at the same time and the rate is their sum, the aggregate
    a program on that mesh can reach (CPU host devices share the cores, so about the one-device rate)."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32) / jnp.sqrt(n)

    def chain(x):
        def body(x, _):
            return x @ a, None

        return jax.lax.scan(body, x, None, length=repeats)[0]

    if mesh is None:
        fn, x, copies = jax.jit(chain), a, 1
    else:
        copies = mesh.size
        axis = mesh.axis_names[0]
        fn = jax.jit(jax.shard_map(lambda x: chain(x[0])[None], mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
        x = jax.device_put(jnp.broadcast_to(a, (copies, n, n)), jax.NamedSharding(mesh, P(axis)))
    seconds = time_call(lambda: fn(x), min_time=min_time)
    return 2.0 * n**3 * repeats * copies / seconds


def dense_flops(batch: int, sizes: list[int]) -> float:
    """Forward FLOPs of an MLP with layer widths `sizes` (multiply-adds counted as 2)."""
    return float(sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:])))


def backward_flops(batch: int, sizes: list[int]) -> float:
    """Backward FLOPs of the same MLP: weight gradients of every layer plus input gradients of every layer
    but the first (its input is data, nothing asks for its gradient)."""
    return 2.0 * dense_flops(batch, list(sizes)) - 2.0 * batch * sizes[0] * sizes[1]


# --- matmul FLOPs of a compiled XLA program, read from its optimised HLO text ----------------------------

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def hlo_matmul_flops(hlo_text: str) -> float | None:
    """FLOPs of every `dot` executed by one run of the program (2 * output elements * contraction size),
    while-loop bodies multiplied by XLA's known trip count. None if a loop's trip count is unknown."""
    shapes: dict[str, tuple[int, ...]] = {}
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            shapes[m.group(1)] = tuple(int(d) for d in m.group(3).split(",") if d)
        comps[current].append(line)

    def dot_flops(line: str) -> float:
        out = _INSTRUCTION.match(line)
        lhs = re.search(r"\sdot\(\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)", line).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        k = math.prod(shapes[lhs][int(d)] for d in contracting.split(",") if d)
        return 2.0 * math.prod(int(d) for d in out.group(3).split(",") if d) * k

    memo: dict[str, float | None] = {}

    def total(name: str) -> float | None:
        if name not in memo:
            memo[name] = None  # guards against (impossible) recursion
            flops = 0.0
            for line in comps.get(name, []):
                op = _OPCODE.search(line.split("=", 1)[-1])
                opcode = op.group(1) if op else ""
                if opcode == "dot":
                    flops += dot_flops(line)
                trips = 1
                if opcode == "while":
                    m = _TRIP_COUNT.search(line)
                    if m is None:
                        return None
                    trips = int(m.group(1))
                for kind, callee in _CALLEES.findall(line):
                    sub = total(callee)
                    if sub is None:
                        return None
                    flops += sub * (trips if kind == "body" else 1)
                m = _BRANCHES.search(line)
                if m:  # a conditional runs one branch: count the most expensive
                    subs = [total(c.strip().lstrip("%")) for c in m.group(1).split(",")]
                    if any(s is None for s in subs):
                        return None
                    flops += max(subs, default=0.0)
            memo[name] = flops
        return memo[name]

    return None if entry is None else total(entry)


def environment() -> dict[str, Any]:
    """What a figure was measured on, recorded beside it: the device, JAX's version and the settings that
    change its numbers (matmul precision, PRNG implementation, XLA_FLAGS)."""
    return {"device": str(jax.devices()[0]), "jax_version": jax.__version__,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "jax_default_prng_impl": jax.config.jax_default_prng_impl,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}

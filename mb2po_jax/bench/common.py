"""Shared pieces of the benchmarks: timing compiled calls and the machine's own matmul rate.

Figures are reported as a fraction of the float32 matmul rate measured in the same process, because the
machines we run on are shared and noisy: a ratio against a reference taken seconds apart is comparable
across sittings, an absolute rate is not.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


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


def matmul_flops_per_s(n: int = 1024, repeats: int = 8, min_time: float = 1.5) -> float:
    """float32 [n,n] @ [n,n] rate through XLA on the default device, chained so nothing is skipped."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32) / jnp.sqrt(n)

    @jax.jit
    def chain(x):
        def body(x, _):
            return x @ a, None

        return jax.lax.scan(body, x, None, length=repeats)[0]

    seconds = time_call(lambda: chain(a), min_time=min_time)
    return 2.0 * n**3 * repeats / seconds


def dense_flops(batch: int, sizes: list[int]) -> float:
    """Forward FLOPs of an MLP with layer widths `sizes` (multiply-adds counted as 2)."""
    return float(sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:])))


def backward_flops(batch: int, sizes: list[int]) -> float:
    """Backward FLOPs of the same MLP: weight gradients of every layer plus input gradients of every layer
    but the first (its input is data, nothing asks for its gradient)."""
    return 2.0 * dense_flops(batch, list(sizes)) - 2.0 * batch * sizes[0] * sizes[1]

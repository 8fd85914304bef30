"""The environment for a test's JAX subprocess on the CPU with a chosen number of XLA host devices."""

from __future__ import annotations

import os


def cpu_env(host_devices: int | None = None) -> dict:
    """os.environ on the CPU backend, its XLA_FLAGS without a host device count (conftest's other flags kept),
    plus `--xla_force_host_platform_device_count=host_devices` when given: the count must be set before
    JAX starts, so only a new process can take another one."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if host_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={host_devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")

import atexit
import os
import shutil
import tempfile

import pytest

# Tests run on the CPU, single-threaded XLA compilation is not required but keep memory modest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the session, read by this process and by the training subprocesses the
# end-to-end tests start (they inherit the environment): the tiny runs compile the same programs again
# and again, and a hit skips XLA's compile (RESULTS.md "Costs of the README's commands"). A fresh
# directory per session, removed at exit, so no entry outlives the code that made it. Set before JAX is
# imported; a JAX_COMPILATION_CACHE_DIR of the caller's own is left as it is. MB2PO_TESTS_XLA_CACHE=0 turns it
# off: on some AVX-512 CPUs XLA:CPU rejects its own cached entries (jax-ml/jax#38445), which then only adds
# log lines to the subprocesses' stderr.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("MB2PO_TESTS_XLA_CACHE", "1") != "0":
    _xla_cache = tempfile.mkdtemp(prefix="mb2po-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

# XLA:CPU's backend optimisation off for the session (`--xla_backend_optimization_level=0`, inherited by the
# subprocesses): the tests' programs are tiny and compiled over and over, so compiling is most of their time,
# and this halves it (RESULTS.md "Costs of the README's commands"). The tests check behaviour, which does not
# depend on it; the programs training and the benchmarks run are compiled as XLA's defaults say.
# MB2PO_TESTS_XLA_OPT=1 keeps XLA's default optimisation; an optimisation level in the caller's XLA_FLAGS stands.
if (os.environ.get("MB2PO_TESTS_XLA_OPT", "0") != "1"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


@pytest.fixture
def data_dirs(tmp_path, monkeypatch):
    """Every place the data layer reads or writes (~/.d4rl, ~/.cache, ~/.minari and their variables) under
    tmp_path, so no test touches the real ones. Modules that need it: `pytestmark = usefixtures(...)`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MB2PO_DATA_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path


@pytest.fixture
def no_behavior_assets(tmp_path, monkeypatch):
    """An empty behaviour-policy directory: the shipped assets do not count."""
    monkeypatch.setenv("MB2PO_BEHAVIOR_DIR", str(tmp_path / "behavior"))

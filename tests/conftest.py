import os

import pytest

# Tests run on the CPU, single-threaded XLA compilation is not required but keep memory modest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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

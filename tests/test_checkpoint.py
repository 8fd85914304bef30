"""Checkpointer: a resumed run must get back exactly the state it saved."""

import os
import shutil
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from mb2po_jax.checkpoint import Checkpointer, CheckpointMismatchError, load_pytree, save_pytree


class Normaliser(NamedTuple):
    mean: jax.Array  # [obs_dim]
    std: np.ndarray  # [obs_dim], host-side numpy on purpose


class TrainState(struct.PyTreeNode):
    params: dict
    opt_state: optax.OptState
    key: jax.Array  # raw uint32 PRNGKey
    step: jax.Array  # int32
    norm: Normaliser
    lr: float = struct.field(pytree_node=False, default=3e-4)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


def make_state(seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    params = MLP().init(key, jnp.zeros((1, 3)))
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One real update so adam's mu/nu/count are not trivially zero.
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    rng = np.random.default_rng(seed)
    return TrainState(
        params=params,
        opt_state=opt_state,
        key=jax.random.split(key)[0],
        step=jnp.int32(100 + seed),
        norm=Normaliser(jnp.asarray(rng.normal(size=3), jnp.float32), rng.random(3) + 0.5),
    )


def assert_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bit_identical_from_fresh_instance(tmp_path):
    state = make_state(1)
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.latest_step() is None
    assert ckpt.save(100, state, {"stage": "awac", "config": {"lr": 3e-4}})
    ckpt.close()

    # A new process only has an initial state to give structure, shapes and dtypes.
    fresh = Checkpointer(tmp_path / "ck")
    assert fresh.latest_step() == 100
    restored, meta = fresh.restore(make_state(7))
    assert meta == {"stage": "awac", "config": {"lr": 3e-4}}
    assert_identical(restored, state)
    assert isinstance(restored.norm, Normaliser) and isinstance(restored.norm.std, np.ndarray)
    assert restored.key.dtype == jnp.uint32

    # An abstract target works too.
    abstract = jax.eval_shape(lambda: make_state(7))
    abstract = abstract.replace(norm=abstract.norm._replace(std=np.zeros(3)))
    restored2, _ = fresh.restore(abstract)
    assert_identical(restored2, state)
    fresh.close()


def test_latest_step_max_to_keep_and_restore_older(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in (10, 20, 30):
        ckpt.save(step, make_state(step), {"step": step})
    ckpt.wait()
    assert ckpt.latest_step() == 30
    assert ckpt.all_steps() == [20, 30]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["20", "30"]
    state, meta = ckpt.restore(make_state(0), step=20)
    assert meta == {"step": 20}
    assert_identical(state, make_state(20))
    with pytest.raises(FileNotFoundError):
        ckpt.restore(make_state(0), step=10)
    ckpt.close()


def test_older_or_same_step_skipped_unless_forced(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(5, make_state(1))
    assert not ckpt.save(5, make_state(2))  # resumed run re-saving its resume point
    assert not ckpt.save(3, make_state(2))
    assert_identical(ckpt.restore(make_state(0))[0], make_state(1))
    assert ckpt.save(5, make_state(2), {"v": 2}, force=True)
    state, meta = ckpt.restore(make_state(0))
    assert meta == {"v": 2}
    assert_identical(state, make_state(2))
    ckpt.close()


def test_partial_checkpoint_is_invisible(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state(1))
    ckpt.close()
    # What a save killed mid-way leaves behind: orbax's temporary directory, never renamed.
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    shutil.rmtree(tmp_path / "2.orbax-checkpoint-tmp" / "state")
    fresh = Checkpointer(tmp_path)
    assert fresh.latest_step() == 1
    assert fresh.all_steps() == [1]
    assert_identical(fresh.restore(make_state(0))[0], make_state(1))
    # The resumed run saves the same step again; the leftover does not get in the way.
    assert fresh.save(2, make_state(2))
    fresh.wait()
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()
    assert_identical(fresh.restore(make_state(0))[0], make_state(2))
    fresh.close()


def test_mismatched_target_raises_clearly(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"w": np.zeros((3, 4), np.float32), "n": np.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match=r"w: checkpoint float32\[3, 4\]"):
        ckpt.restore({"w": np.zeros((3, 5), np.float32), "n": np.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match="float64"):
        ckpt.restore({"w": np.zeros((3, 4), np.float32), "n": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatchError, match="structure"):
        ckpt.restore({"w": np.zeros((3, 4), np.float32), "m": np.zeros(3)})
    with pytest.raises(ValueError, match="meta must be plain JSON"):
        ckpt.save(2, {"w": np.zeros((3, 4), np.float32)}, {"x": np.float32(1.0)})
    ckpt.close()


def test_keys_scalars_and_empty_leaves(tmp_path):
    tree = {
        "key": jax.random.split(jax.random.PRNGKey(3), 4),
        "count": 7,
        "ratio": 0.25,
        "np_scalar": np.float32(1.5),
        "empty": np.zeros((0, 3), np.float32),
        "buf": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
    }
    save_pytree(tmp_path / "one", tree, {"note": "x"})
    target = {  # same structure, different values: everything must come from the checkpoint
        "key": jax.random.split(jax.random.PRNGKey(99), 4),
        "count": 0,
        "ratio": 0.0,
        "np_scalar": np.float32(0),
        "empty": np.zeros((0, 3), np.float32),
        "buf": jnp.zeros((2, 3), jnp.int32),
    }
    out, meta = load_pytree(tmp_path / "one", target)
    assert meta == {"note": "x"}
    np.testing.assert_array_equal(out["key"], tree["key"])
    assert out["count"] == 7 and type(out["count"]) is int
    assert out["ratio"] == 0.25 and type(out["ratio"]) is float
    assert out["np_scalar"] == np.float32(1.5) and type(out["np_scalar"]) is np.float32
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == np.float32
    np.testing.assert_array_equal(out["buf"], tree["buf"])
    with pytest.raises(TypeError, match="typed PRNG key"):  # refused, not stored unrestorably
        save_pytree(tmp_path / "two", {"typed": jax.random.key(3)})


def test_damaged_newest_step_is_skipped_moved_aside_and_saved_over(tmp_path):
    """A flipped byte in an array's data, which orbax reads back as a wrong value without an error, fails
    the step's checksums; `restore_latest` reports it once, moves it aside and restores the step before."""
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "n": np.arange(64, dtype=np.float64)}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
    ckpt.close()
    data = max((os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "2" / "state") for f in fs
                if os.sep + "d" + os.sep in os.path.join(d, f)), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    fresh = Checkpointer(tmp_path, async_save=False)
    reports = []
    restored, meta = fresh.restore_latest(state, reports.append)
    assert meta == {"step": 1}
    assert_identical(restored, state)
    assert len(reports) == 1 and "checksums" in reports[0] and str(tmp_path / "2") in reports[0]
    assert fresh.all_steps() == [1] and (tmp_path / "2.damaged").is_dir()
    assert fresh.save(2, state, {"step": 2})  # not skipped as "older than the damaged step"
    assert fresh.restore(state)[1] == {"step": 2}
    fresh.close()

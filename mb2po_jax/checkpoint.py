"""Checkpoints of training state: a thin wrapper over orbax's `CheckpointManager`.

Every training stage saves its whole state pytree (flax `struct.PyTreeNode`s holding params, optax states,
PRNG keys, step counters, normalisers) plus a small JSON `meta` dict, and resumes from the newest step.

Layout of `DIRECTORY/<step>/`:
  state/   the array leaves, saved by orbax as a nested dict keyed by the leaves' pytree paths (so a
           checkpoint can be read without importing the classes that made it),
  meta/    the caller's JSON dict,
  layout/  JSON: every leaf's path, shape and dtype, so `restore` can say exactly how a target differs
           from a checkpoint instead of failing deep inside orbax or silently casting.

Atomicity comes from orbax: a step is written to `<step>.orbax-checkpoint-tmp` and renamed when complete,
so a crash mid-save leaves a temporary directory that is never listed as a step (and is removed the next
time a `Checkpointer` opens the directory).

Several processes (multi-host, after `jax.distributed.initialize`): every process must construct the
`Checkpointer` and call `save`, `restore`, `wait` and `close` at the same points, on a directory all of them
see. Orbax then writes each process's own shards of a global array (process 0 writes the metadata, `meta`
and `layout`, and commits the step), and `restore` into a target of global arrays reads on each process only
the shards it holds (the target's sharding is passed to orbax). Numpy leaves are treated as replicated.

Things orbax does not do that this module does:
  - typed PRNG keys (`jax.random.key`) are stored as their raw uint32 key data and re-wrapped with the
    same implementation on restore; raw `jax.random.PRNGKey` uint32 keys are plain arrays,
  - numpy scalars and python numbers become 0-d arrays and come back as the target's python/numpy type,
  - zero-size arrays (orbax refuses them) are recorded in the layout only and restored as empty arrays,
  - a target whose structure, shapes or dtypes differ from the checkpoint raises `CheckpointMismatchError`
    (orbax would otherwise cast dtypes and, for numpy targets, ignore shapes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from mb2po_jax.errors import Mb2poError

_FORMAT_VERSION = 1
# Orbax cannot save a pytree with no arrays; a state made only of empty/zero-size leaves gets this one.
_PLACEHOLDER = "__empty__"


class CheckpointMismatchError(Mb2poError):
    """A checkpoint does not match the pytree it is restored into (different config or code version)."""


def _key_str(entry: Any) -> str:
    """One path component as a string (dict key, dataclass field, tuple index)."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_spec(x: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype string) of a leaf: an array, a ShapeDtypeStruct, a numpy or python scalar."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(int(d) for d in x.shape), str(x.dtype)
    a = np.asarray(x)
    return a.shape, str(a.dtype)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaves of `tree` with '/'-joined path strings; raises if two leaves get the same path string."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(_key_str(k) for k in path) for path, _ in path_leaves]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"checkpoint: pytree has leaves with the same path string: {dup[:5]}")
    return paths, [leaf for _, leaf in path_leaves], treedef


def _nest(paths: list[str], values: list[Any]) -> dict:
    out: dict = {}
    for path, value in zip(paths, values):
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _unnest(nested: dict, paths: list[str]) -> list[Any]:
    values = []
    for path in paths:
        node = nested
        for p in path.split("/"):
            node = node[p]
        values.append(node)
    return values


def _to_savable(leaf: Any) -> Any:
    """Leaf as orbax saves it: jax arrays stay on device (orbax handles sharding), keys -> key data."""
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array | np.ndarray):
        return leaf
    return np.asarray(leaf)  # python / numpy scalars, which orbax rejects as leaves


class Checkpointer:
    """Numbered checkpoints of one state pytree + JSON meta in `directory`, newest `max_to_keep` kept.

    Saves are asynchronous by default: `save` returns once the arrays are copied off the device and the
    files are written in a background thread. Call `wait()` before relying on a save having finished
    (before exit, in a SIGTERM handler), or pass `async_save=False`. Numpy leaves are not copied, so do
    not mutate them in place until `wait()` returns.

    Example:
      ckpt = Checkpointer(workdir / "checkpoints" / "awac")
      if ckpt.latest_step() is not None:
          state, meta = ckpt.restore(state)          # `state` from init gives structure/shapes/dtypes
      ...
      ckpt.save(step, state, {"config": dataclasses.asdict(config)})
      ckpt.close()
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        preservation = (
            None if max_to_keep is None else checkpoint_managers.LatestN(n=int(max_to_keep))
        )
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save killed mid-way
            enable_async_checkpointing=async_save,
            preservation_policy=preservation,
        )
        # Registering the handlers lets a fresh instance (a resumed process) read every item.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "meta", "layout"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "layout": ocp.JsonCheckpointHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest step in the directory, or None. Includes a save of this instance still in flight
        (complete once `wait()` returns); another process only ever sees complete steps."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and `meta` (a JSON-able dict) as checkpoint `step`.

        A step that is not newer than the latest saved one is skipped (returns False), so a resumed run
        re-saving the step it resumed from is harmless. `force=True` writes it anyway, replacing an
        existing checkpoint of the same step. Returns whether a checkpoint was written (or started).
        """
        step = int(step)
        meta = dict(meta or {})
        try:  # fail here, not later in orbax's background thread
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta must be plain JSON (no numpy, NaN or inf): {e}") from e
        paths, leaves, _ = _flatten(state)
        layout = {"format": _FORMAT_VERSION, "leaves": {}}
        savable_paths, savable = [], []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            entry: dict[str, Any] = {"shape": list(shape), "dtype": dtype}
            if _is_key(leaf):
                entry["key_impl"] = str(jax.random.key_impl(leaf))
            layout["leaves"][path] = entry
            if int(np.prod(shape)) > 0:  # orbax refuses zero-size arrays; the layout restores them
                savable_paths.append(path)
                savable.append(_to_savable(leaf))
        nested = _nest(savable_paths, savable) if savable else {_PLACEHOLDER: np.zeros((1,), np.int8)}

        latest = self.latest_step()
        if latest is not None and step <= latest:
            if not force:
                if step < latest:  # equal is a resumed run re-saving its start; older is suspicious
                    logging.warning(
                        "checkpoint: not saving step %d in %s, which has the newer step %d",
                        step, self.directory, latest,
                    )
                return False
            if step in self._manager.all_steps():
                self._manager.wait_until_finished()
                self._manager.delete(step)
        return bool(
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(nested),
                    meta=ocp.args.JsonSave(meta),
                    layout=ocp.args.JsonSave(layout),
                ),
                force=True,  # the step policy is ours (above), not orbax's save interval
            )
        )

    # -- restore ---------------------------------------------------------------------------------
    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores checkpoint `step` (None: the latest) into the structure of `target`.

        `target` is a concrete or abstract (`jax.ShapeDtypeStruct`) pytree with the checkpoint's
        structure, shapes and dtypes; anything else raises `CheckpointMismatchError` naming the leaves.
        Leaves come back as the target's kind: jax arrays (on the target's sharding when it has one,
        else the default device), numpy arrays, or python/numpy scalars. Returns (state, meta).
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        small = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore())
        )
        layout, meta = small.layout, small.meta
        paths, leaves, treedef = _flatten(target)
        self._check_matches(step, layout, paths, leaves)

        abstract_paths, abstract = [], []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            if int(np.prod(shape)) == 0:
                continue
            if _is_key(leaf):
                data_shape = tuple(layout["leaves"][path]["shape"])
                impl = layout["leaves"][path]["key_impl"]
                data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
                abstract.append(jax.ShapeDtypeStruct(data_shape + data.shape, data.dtype))
            elif isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
                sharding = getattr(leaf, "sharding", None)
                abstract.append(jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding))
            else:  # numpy arrays and scalars: orbax restores a numpy target as numpy
                abstract.append(np.empty(shape, np.dtype(dtype)))
            abstract_paths.append(path)
        nested = _nest(abstract_paths, abstract) if abstract else {_PLACEHOLDER: np.zeros((1,), np.int8)}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(nested))
        ).state
        values = dict(zip(abstract_paths, _unnest(restored, abstract_paths)))

        out = []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            if path not in values:  # zero-size leaf: nothing was stored but its layout
                if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
                    sharding = getattr(leaf, "sharding", None)  # global arrays stay global
                    value: Any = jax.jit(lambda: jax.numpy.empty(shape, leaf.dtype), out_shardings=sharding)()
                else:
                    value = np.empty(shape, np.dtype(dtype))
            elif _is_key(leaf):
                value = jax.random.wrap_key_data(
                    values[path], impl=layout["leaves"][path]["key_impl"]
                )
            elif isinstance(leaf, np.generic):
                value = type(leaf)(np.asarray(values[path]))
            elif isinstance(leaf, bool | int | float | complex):
                value = type(leaf)(np.asarray(values[path]).item())
            else:
                value = values[path]
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out), dict(meta)

    def _check_matches(self, step: int, layout: dict, paths: list[str], leaves: list[Any]) -> None:
        where = f"checkpoint {self.directory}/{step}"
        if layout.get("format") != _FORMAT_VERSION:
            raise CheckpointMismatchError(f"{where}: unknown layout format {layout.get('format')!r}")
        saved = layout["leaves"]
        missing = [p for p in paths if p not in saved]
        extra = [p for p in saved if p not in set(paths)]
        if missing or extra:
            raise CheckpointMismatchError(
                f"{where} has a different structure than the target: "
                f"target leaves not in checkpoint {missing[:5]}, checkpoint leaves not in target "
                f"{extra[:5]}"
            )
        bad = []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            s = saved[path]
            if tuple(s["shape"]) != shape or s["dtype"] != dtype:
                bad.append(f"{path}: checkpoint {s['dtype']}{s['shape']} vs target {dtype}{list(shape)}")
        if bad:
            raise CheckpointMismatchError(f"{where} differs from the target: " + "; ".join(bad[:5]))

    # -- lifecycle -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_pytree(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """One-shot synchronous save of a pytree (e.g. a trained state) into directory `path`."""
    with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, tree, meta, force=True)


def load_pytree(path: str | os.PathLike, target: Any) -> tuple[Any, dict]:
    """Loads what `save_pytree` (or a `Checkpointer`, latest step) wrote in `path`; returns (tree, meta)."""
    with Checkpointer(path, max_to_keep=None, async_save=False) as ckpt:
        return ckpt.restore(target)

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
  - PRNG keys must be raw uint32 key arrays (`jax.random.PRNGKey`, what every state here holds); a typed
    key (`jax.random.key`) is refused with a TypeError rather than stored in a form restore cannot rebuild,
  - numpy scalars and python numbers become 0-d arrays and come back as the target's python/numpy type,
  - zero-size arrays (orbax refuses them) are recorded in the layout only and restored as empty arrays,
  - a target whose structure, shapes or dtypes differ from the checkpoint raises `CheckpointMismatchError`
    (orbax would otherwise cast dtypes and, for numpy targets, ignore shapes),
  - every array's checksum is recorded in the layout and checked on restore: orbax reads a flipped byte in
    an array's data back as a wrong value without complaint. A step that cannot be read or fails its
    checksums raises `CheckpointDamagedError`; `restore_latest` skips it (moving it aside) for an older one.
"""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
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


class CheckpointDamagedError(Mb2poError):
    """A checkpoint step cannot be read, or its arrays do not match the checksums saved with them."""


# ---------------------------------------------------------------------------------------------- checksums
# sum_i w_i (2 i + 1) mod 2^32 over an array's bytes read as unsigned words w_i (1, 2 or 4 bytes, 8-byte
# types as two words): any change of one word changes it (odd weights are invertible mod 2^32), and it is
# a single reduction, done where the array lives (device arrays in one compiled call, numpy on the host).
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _checksum_host(a: Any) -> int:
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    words = a.view(_UINT[a.dtype.itemsize]).astype(np.uint32)
    weights = 2 * np.arange(words.size, dtype=np.uint32) + 1
    return int(np.sum(words * weights, dtype=np.uint32))


def _checksum_device(x: jax.Array) -> jax.Array:
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
    weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.sum(words * weights, dtype=jnp.uint32)


_checksums_device = jax.jit(lambda xs: [_checksum_device(x) for x in xs])


def _checksums(leaves: list[Any]) -> list[int]:
    """Checksums of arrays as they are saved: one compiled call per set of
    devices the jax arrays live on (a collective on several processes: every process calls it)."""
    out: list[int | None] = [None] * len(leaves)
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
        else:
            out[i] = _checksum_host(leaf)
    for idx in groups.values():
        for i, c in zip(idx, _checksums_device([leaves[i] for i in idx])):
            out[i] = int(np.asarray(c.addressable_data(0)))
    return out  # type: ignore[return-value]


# Reads of a step that fails part-way leave tensorstore reads pending in orbax's closed event loop; when
# they finish they report "Event loop is closed" (and asyncio "exception was never retrieved") on stderr,
# at any later moment. Those reports are dropped: the failure itself is reported as CheckpointDamagedError.
_ABANDONED = ("Event loop is closed", "exception was never retrieved")


def _silence_abandoned_reads() -> None:
    if getattr(sys.unraisablehook, "_mb2po_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not any(text in str(unraisable.exc_value) for text in _ABANDONED):
            previous(unraisable)

    hook._mb2po_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    pylogging.getLogger("asyncio").addFilter(
        lambda record: not any(text in record.getMessage() for text in _ABANDONED))


@contextlib.contextmanager
def _orbax_errors_quiet():
    """orbax logs (absl ERROR) what it cannot parse in a damaged step, besides raising: keep the raise."""
    level = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


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


def _is_typed_key(x: Any) -> bool:
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
    """Leaf as orbax saves it: jax arrays stay on device (orbax handles sharding)."""
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
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True,
        read_only: bool = False,
    ):
        # read_only: only restore; creates, cleans and deletes nothing, so a reader (`mb2po_jax.policy`) can
        # open the directory of a run that is still saving into it.
        self.directory = os.path.abspath(os.fspath(directory))
        preservation = (
            None if max_to_keep is None else checkpoint_managers.LatestN(n=int(max_to_keep))
        )
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # 1: orbax's default; read_only warns unless 0
            # orbax would remove these in a background thread that `close` does not wait for (an early
            # error then ends the interpreter under it, with a traceback); `_remove_unfinished` does it here.
            cleanup_tmp_directories=False,
            enable_async_checkpointing=async_save,
            preservation_policy=None if read_only else preservation,
        )
        # Registering the handlers lets a fresh instance (a resumed process) read every item.
        with _orbax_errors_quiet():
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
        if not read_only:
            self._remove_unfinished()

    def _remove_unfinished(self) -> None:
        """Deletes the temporary directories of saves killed mid-way (never listed as steps); process 0."""
        if jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

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
            if _is_typed_key(leaf):
                raise TypeError(f"checkpoint: {path} is a typed PRNG key; store jax.random.key_data(key) (a "
                                "raw uint32 key, as jax.random.PRNGKey makes)")
            layout["leaves"][path] = entry
            if int(np.prod(shape)) > 0:  # orbax refuses zero-size arrays; the layout restores them
                savable_paths.append(path)
                savable.append(_to_savable(leaf))
        for path, checksum in zip(savable_paths, _checksums(savable)):
            layout["leaves"][path]["checksum"] = checksum
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
    def restore(self, target: Any, step: int | None = None, *, partial: bool = False) -> tuple[Any, dict]:
        """Restores checkpoint `step` (None: the latest) into the structure of `target`.

        `target` is a concrete or abstract (`jax.ShapeDtypeStruct`) pytree with the checkpoint's
        structure, shapes and dtypes; anything else raises `CheckpointMismatchError` naming the leaves.
        Leaves come back as the target's kind: jax arrays (on the target's sharding when it has one,
        else the default device), numpy arrays, or python/numpy scalars. Returns (state, meta).
        partial: `target` holds only some of the checkpoint's leaves (e.g. {"agent": {"actor_params": ...}}
        of an MB2PO state, whose model ring then stays on disk): only those are read (orbax's partial restore).
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
        layout, meta = self._read_small(step)
        paths, leaves, treedef = _flatten(target)
        self._check_matches(step, layout, paths, leaves, partial=partial)

        abstract_paths, abstract = [], []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            if int(np.prod(shape)) == 0:
                continue
            if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
                sharding = getattr(leaf, "sharding", None)
                abstract.append(jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding))
            else:  # numpy arrays and scalars: orbax restores a numpy target as numpy
                abstract.append(np.empty(shape, np.dtype(dtype)))
            abstract_paths.append(path)
        nested = _nest(abstract_paths, abstract) if abstract else {_PLACEHOLDER: np.zeros((1,), np.int8)}
        try:
            with _orbax_errors_quiet():
                if partial:
                    restored = self._restore_part(step, nested) if abstract_paths else {}
                else:
                    restored = self._manager.restore(
                        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(nested))
                    ).state
            values = dict(zip(abstract_paths, _unnest(restored, abstract_paths)))
        except Exception as e:  # noqa: BLE001 - whatever orbax/tensorstore raise on unreadable files
            raise self._damaged(step, _short(e)) from None
        expected = [layout["leaves"][p].get("checksum") for p in abstract_paths]
        if any(c is not None for c in expected):  # steps saved before checksums were recorded have none
            actual = _checksums([values[p] for p in abstract_paths])
            bad = [p for p, a, c in zip(abstract_paths, actual, expected) if c is not None and a != c]
            if bad:
                raise self._damaged(step, f"{len(bad)} array(s) differ from their saved checksums, e.g. {bad[0]}")

        out = []
        for path, leaf in zip(paths, leaves):
            shape, dtype = _leaf_spec(leaf)
            if path not in values:  # zero-size leaf: nothing was stored but its layout
                if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
                    sharding = getattr(leaf, "sharding", None)  # global arrays stay global
                    value: Any = jax.jit(lambda: jax.numpy.empty(shape, leaf.dtype), out_shardings=sharding)()
                else:
                    value = np.empty(shape, np.dtype(dtype))
            elif isinstance(leaf, np.generic):
                value = type(leaf)(np.asarray(values[path]))
            elif isinstance(leaf, bool | int | float | complex):
                value = type(leaf)(np.asarray(values[path]).item())
            else:
                value = values[path]
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out), dict(meta)

    def _restore_part(self, step: int, nested: dict) -> dict:
        """The leaves of `nested` (abstract) from step `step`'s state item, and nothing else. The manager's
        StandardRestore has no partial mode; the item is the same PyTree layout, read here directly."""
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or default)
                            if isinstance(x, jax.ShapeDtypeStruct) else x, nested)
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(os.path.join(self.directory, str(step), "state"), args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))

    def _read_small(self, step: int) -> tuple[dict, dict]:
        """(layout, meta) of `step`; CheckpointDamagedError if either is missing or not a JSON object."""
        try:
            with _orbax_errors_quiet():
                small = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore())
                )
            layout, meta = small.layout, small.meta
        except Exception as e:  # noqa: BLE001 - a missing item is a KeyError, unparsable JSON a ValueError
            raise self._damaged(step, _short(e)) from None
        if not (isinstance(meta, dict) and isinstance(layout, dict) and isinstance(layout.get("leaves"), dict)):
            raise self._damaged(step, "its meta or layout is not a JSON object")
        return layout, meta

    def _damaged(self, step: int, reason: str) -> CheckpointDamagedError:
        _silence_abandoned_reads()
        where = os.path.join(self.directory, str(step))
        return CheckpointDamagedError(f"checkpoint {where} is damaged ({reason})")

    def read_meta(self, step: int | None = None) -> dict:
        """The meta dict of `step` (None: the latest) without reading the arrays."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._manager.wait_until_finished()
        return self._read_small(step)[1]

    def restore_latest(self, target: Any, on_damaged: Callable[[str], None]) -> tuple[Any, dict] | None:
        """`restore` of the newest intact step, or None when there is none. Each damaged step on the way is
        reported by `on_damaged(message)` and moved aside (`discard`): it is never used, and later saves are
        not refused as older than it. A `CheckpointMismatchError` (other settings) is raised, not skipped."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(target, step)
            except CheckpointDamagedError as e:
                moved = self.discard(step)
                on_damaged(f"{e}; moved to {moved}, trying the step before it")
        return None

    def discard(self, step: int) -> str:
        """Moves step `step` out of the step list, to DIRECTORY/<step>.damaged (process 0 renames it; every
        process calls this at the same point). Returns the new path."""
        self._manager.wait_until_finished()
        source = os.path.join(self.directory, str(step))
        moved, k = f"{source}.damaged", 0
        while os.path.exists(moved):
            k += 1
            moved = f"{source}.damaged.{k}"
        if jax.process_index() == 0:
            os.rename(source, moved)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint discard {source}")
        self._manager.reload()
        return moved

    def _check_matches(self, step: int, layout: dict, paths: list[str], leaves: list[Any],
                       partial: bool = False) -> None:
        where = f"checkpoint {self.directory}/{step}"
        if layout.get("format") != _FORMAT_VERSION:
            raise CheckpointMismatchError(f"{where}: unknown layout format {layout.get('format')!r}")
        saved = layout["leaves"]
        missing = [p for p in paths if p not in saved]
        extra = [] if partial else [p for p in saved if p not in set(paths)]
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

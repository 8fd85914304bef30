"""Metrics output: `WORKDIR/metrics.jsonl`, TensorBoard event files, and a one-line console progress.

metrics.jsonl holds one JSON object per line, `{"stage", "step", "time", **metrics}`:
  - numpy / jax scalars become python numbers; arrays (e.g. one value per seed, shape [S]) become lists,
  - NaN and +-inf, which JSON cannot represent, are written as `null` (pandas reads null back as NaN),
  - strings, bools, None and nested dicts of these are written as they are.
Each line is flushed when written, so a crash loses at most the line being written; a torn last line left
by a crash is cut off when the file is opened again (a resumed run appends after complete lines only). Any
other line that is not a JSON object (damage no crash of ours leaves) is refused when the file is opened.

TensorBoard event files are written by tensorboardX (numpy + protobuf, no TensorFlow or torch), one
TensorBoard run per stage: `WORKDIR/tensorboard/<stage>/events.out.tfevents.*`, so `tensorboard --logdir
WORKDIR/tensorboard` lists the runs `awac`, `dynamics`, `mb2po` and `online`, each with its own step axis (the
metrics.jsonl `step`: gradient steps for awac and dynamics, iterations for mb2po, environment steps for
online). Tags keep the stage
prefix (`awac/critic_loss`, `mb2po/return`), so stages whose steps mean different things never share a
chart. Why one run per stage: in one shared run (one event file, as before) the steps went back from
awac's last step to dynamics' first and again to mb2po's (harmless only because no tag spans two stages),
and a resumed stage's purge marker (below) applies to every tag of its run: in a shared run it would hide
the other stages' points too. (A workdir written before this layout keeps its old files in
WORKDIR/tensorboard/ itself, which TensorBoard lists as one more run, ".".)
  - numbers are one scalar; [S] arrays (one value per seed) are the mean under the metric's tag plus, for
    at most 8 seeds, `<tag>/seed_<s>`;
  - [S, K] arrays (the dynamics ensemble's `holdout_mse`, `holdout_nll`, `best_holdout_mse`: per seed and
    member) are the mean, the per-seed means `<tag>/seed_<s>` and, for at most 8 seeds and 32 members, one
    scalar per seed and member `<tag>/seed_<s>/member_<k>`; `elites` [S, num_elites] holds member indices
    by rank, so it is written as `dynamics/elites/seed_<s>/rank_<k>` (value: the member) without means;
  - strings, None, nested dicts and larger arrays are in metrics.jsonl only.
Events are flushed to disk every couple of seconds and on close (a killed run loses at most those seconds
of TensorBoard points; metrics.jsonl has every record). On resume, MetricsWriter.truncate drops the
stage's records after the checkpoint from metrics.jsonl; the event files are not rewritten: the stage's
next event file starts with tensorboardX's purge marker (a SessionLog START at the first redone step),
with which TensorBoard's reader hides the older files' points from that step on. A reader that ignores
the marker shows the redone steps twice.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Iterable

import numpy as np

from mb2po_jax.errors import ConfigError, WorkdirError

_RESERVED = ("stage", "step", "time")
_MAX_SEEDS_PER_TAG = 8  # above this, only the mean over seeds goes to TensorBoard
_MAX_MEMBERS_PER_TAG = 32  # [S, K] values: above this (or above 8 seeds), only the means
_RANKED = {"elites"}  # [S, K] metrics that list member indices by rank (not one value per member)
_TB_FLUSH_SECS = 2
_event_files = itertools.count()  # makes event file names unique within a process (see _stage_writer)


# --------------------------------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    """A JSON-safe version of a metric value (non-finite floats -> None)."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    a = np.asarray(value)  # numpy / jax scalars and arrays, lists of numbers
    if a.dtype.kind in "biu":
        return a.tolist()
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        return np.where(np.isfinite(a), a.astype(object), None).tolist()
    raise TypeError(f"metric value of type {type(value).__name__} (dtype {a.dtype}) is not loggable")


def _tb_scalars(tag: str, value: Any, *, ranked: bool = False) -> dict[str, float]:
    """TensorBoard scalars for one metric: numbers as they are; [S] arrays as mean + one tag per seed;
    [S, K] arrays as mean, per-seed means and one tag per seed and member (`ranked`: per seed and rank,
    no means). See the module docstring."""
    if value is None or isinstance(value, str | Mapping):
        return {}
    a = np.asarray(value)
    if a.dtype.kind not in "biuf" or a.size == 0:
        return {}
    a = a.astype(np.float64)
    if a.ndim == 0:
        return {tag: float(a)}
    if a.ndim == 1:
        out = {tag: float(np.mean(a))}
        if a.size <= _MAX_SEEDS_PER_TAG:
            out.update({f"{tag}/seed_{s}": float(v) for s, v in enumerate(a)})
        return out
    if a.ndim == 2:
        out, few_seeds = {}, a.shape[0] <= _MAX_SEEDS_PER_TAG
        if not ranked:
            out[tag] = float(np.mean(a))
            if few_seeds:
                out.update({f"{tag}/seed_{s}": float(np.mean(row)) for s, row in enumerate(a)})
        if few_seeds and a.shape[1] <= _MAX_MEMBERS_PER_TAG:
            axis = "rank" if ranked else "member"
            out.update({f"{tag}/seed_{s}/{axis}_{k}": float(v)
                        for s, row in enumerate(a) for k, v in enumerate(row)})
        return out
    return {}


def _drop_torn_last_line(path: str) -> None:
    """Cuts a file back to its last newline (a crash may have left half a line)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        if keep != end:
            f.truncate(keep)


def json_lines(lines: Iterable[str]) -> list[tuple[str, dict]]:
    """(line, record) for each line that holds a JSON object, the line newline-terminated; any other line
    (the torn end of a file being written) is left out. How every reader of metrics.jsonl parses it."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line if line.endswith("\n") else line + "\n", record))
    return out


def _check_records(path: str) -> None:
    """WorkdirError naming the first line of `path` that is not a UTF-8 JSON object."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                ok = isinstance(json.loads(line.decode("utf-8")), dict)
            except ValueError:  # UnicodeDecodeError, JSONDecodeError
                ok = False
            if not ok:
                raise WorkdirError(
                    f"{path}: line {number} is not a JSON record (the file is damaged); move the file aside "
                    "to start a new one, or delete the damaged lines, and rerun")


def _drop_nan_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("NaN or Inf found in input tensor")


def _quiet_tensorboardx_nan_warning() -> None:
    """tensorboardX logs a warning for every non-finite scalar; here NaN / inf are meant (a NaN score, an
    inf best MSE before the first evaluation) and written as they are, so that one message is dropped."""
    log = logging.getLogger("tensorboardX.x2num")
    if _drop_nan_warning not in log.filters:
        log.addFilter(_drop_nan_warning)


class MetricsWriter:
    """Writes metrics to WORKDIR/metrics.jsonl and (optionally) WORKDIR/tensorboard/<stage>/ event files.

    On multi-host runs, create it on process 0 only.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        if tensorboard:  # before any work: an install older than the dependency (an editable checkout moved on)
            try:
                import tensorboardX  # noqa: F401
            except ImportError as e:
                raise ConfigError(f"tensorboardX, a dependency of mb2po_jax, is not installed ({e}): reinstall "
                                  f"mb2po_jax (`pip install -e .` in its checkout)") from None
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
        try:
            _drop_torn_last_line(self.jsonl_path)
            _check_records(self.jsonl_path)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        except OSError as e:
            raise WorkdirError(f"{self.jsonl_path}: cannot be used as the metrics file ({e.strerror or e}); "
                               "move it aside and rerun") from None
        self.tensorboard_dir = os.path.join(self.workdir, "tensorboard") if tensorboard else None
        self._tb: dict[str, Any] = {}  # stage -> its open tensorboardX SummaryWriter
        self._purge: dict[str, int] = {}  # stage -> first step its next event file hides in older ones

    def _stage_writer(self, stage: str):
        """The stage's SummaryWriter, opened on the stage's first write (after any truncate of it)."""
        writer = self._tb.get(stage)
        if writer is None:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage) or stage in (".", ".."):
                raise ValueError(f"stage name {stage!r} cannot name a TensorBoard run directory")
            from tensorboardX import SummaryWriter  # numpy + protobuf (checked in __init__)

            _quiet_tensorboardx_nan_warning()
            # tensorboardX names files events.out.tfevents.<unix seconds>.<host><suffix> and opens them
            # "wb"; TensorBoard reads a run's files in name order. The suffix (nanoseconds, then what makes
            # it unique) keeps a second file of the same second (a quick resume) from replacing the first
            # and sorts it after it, so that its purge marker applies to the first one's points.
            suffix = f".{time.time_ns()}.{os.getpid()}.{next(_event_files)}"
            writer = SummaryWriter(os.path.join(self.tensorboard_dir, stage), flush_secs=_TB_FLUSH_SECS,
                                   purge_step=self._purge.pop(stage, None), filename_suffix=suffix)
            self._tb[stage] = writer
        return writer

    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        now = time.time()
        record = {"stage": stage, "step": int(step), "time": now}
        record.update({str(k): _to_json(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self.tensorboard_dir is not None:
            scalars: dict[str, float] = {}
            for name, value in metrics.items():
                scalars.update(_tb_scalars(f"{stage}/{name}", value, ranked=str(name) in _RANKED))
            if scalars:
                writer = self._stage_writer(stage)
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, int(step), walltime=now)

    def truncate(self, stage: str, step: int) -> None:
        """Drop the `stage` records logged after `step` (a resumed stage redoes those steps), so that a run
        killed at any moment and rerun ends with the records of an uninterrupted one. The file is replaced
        atomically and reopened: appending through the old handle would write into the replaced file.
        The stage's event files are left as they are; its next one starts with a purge marker at step + 1
        (see the module docstring)."""
        if self.tensorboard_dir is not None:
            self._purge[stage] = min(self._purge.get(stage, step + 1), max(step + 1, 0))
            if stage in self._tb:  # written already in this process: the marker goes into a new file
                self._tb.pop(stage).close()
        self._jsonl.flush()
        with open(self.jsonl_path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line, record in json_lines(lines)
                if not (record.get("stage") == stage and record.get("step", 0) > step)]
        if len(kept) == len(lines):
            return
        tmp = f"{self.jsonl_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        self._jsonl.close()
        os.replace(tmp, self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        while self._tb:
            self._tb.popitem()[1].close()  # writes out the queued events, then closes the file

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """12s, 4m21s, 1h02m03s."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _format_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def _format_extra(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything printable is fine
        return str(value)
    if a.ndim == 0 and a.dtype.kind == "f":
        return f"{float(a):.4g}"
    if a.ndim == 1 and a.dtype.kind == "f":
        return "[" + ",".join(f"{float(v):.4g}" for v in a) + "]"
    return str(a.tolist())


class Progress:
    """A progress line at most every `min_interval_s`, e.g.

        [awac] 12000/500000 (2.4%)  1870 steps/s  ETA 4m21s  loss=1.23

    steps/s is measured over the interval since the previous line; a resumed run passes `start_step`
    so the rate counts only steps done in this process. A caller whose steps are something else names them
    with `unit` (e.g. unit="it": "12.5 it/s", or "27 s/it" when fewer than one a second); without it the
    rate is always "N steps/s".
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        start_step: int = 0,
        stream: IO[str] | None = None,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        unit: str | None = None,
    ):
        self.total, self.desc = int(total), desc
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._t0 = self._last_t = clock()
        self._start_step = self._last_step = self._step = int(start_step)
        self._closed = False

    def _rate(self, rate: float) -> str:
        if self.unit is None:
            return f"{_format_rate(rate)} steps/s"
        if rate < 1:
            return f"{_format_rate(1.0 / rate)} s/{self.unit}"
        return f"{_format_rate(rate)} {self.unit}/s"

    def _head(self, step: int) -> str:
        pct = 100.0 * step / self.total if self.total > 0 else 100.0
        return f"[{self.desc}] {step}/{self.total} ({pct:.1f}%)"

    def update(self, step: int, **extra: Any) -> None:
        self._step = int(step)
        now = self._clock()
        dt = now - self._last_t
        if dt < self.min_interval_s:
            return
        parts = [self._head(self._step)]
        if dt > 0 and self._step > self._last_step:
            rate = (self._step - self._last_step) / dt
            parts.append(self._rate(rate))
            parts.append(f"ETA {format_duration(max(self.total - self._step, 0) / rate)}")
        parts += [f"{k}={_format_extra(v)}" for k, v in extra.items()]
        print("  ".join(parts), file=self.stream, flush=True)
        self._last_t, self._last_step = now, self._step

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = self._clock() - self._t0
        parts = [self._head(self._step), f"done in {format_duration(elapsed)}"]
        done = self._step - self._start_step
        if elapsed > 0 and done > 0:
            parts.append(self._rate(done / elapsed))
        print("  ".join(parts), file=self.stream, flush=True)

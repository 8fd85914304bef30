"""Metrics output: `WORKDIR/metrics.jsonl`, TensorBoard event files, and a one-line console progress.

metrics.jsonl holds one JSON object per line, `{"stage", "step", "time", **metrics}`:
  - numpy / jax scalars become python numbers; arrays (e.g. one value per seed, shape [S]) become lists,
  - NaN and +-inf, which JSON cannot represent, are written as `null` (pandas reads null back as NaN),
  - strings, bools, None and nested dicts of these are written as they are.
Each line is flushed when written, so a crash loses at most the line being written; a torn last line left
by a crash is cut off when the file is opened again (a resumed run appends after complete lines only). Any
other line that is not a JSON object (damage no crash of ours leaves) is refused when the file is opened.

TensorBoard event files are written by the few lines below instead of by tensorboard/tensorflow, so the
library has no TensorFlow dependency: an event file is TFRecord framing (uint64 length, masked CRC32C of
the length, payload, masked CRC32C of the payload) around hand-encoded `tensorflow.Event` protobufs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Iterable

import numpy as np

from mb2po_jax.errors import WorkdirError

_RESERVED = ("stage", "step", "time")
_MAX_SEEDS_PER_TAG = 8  # above this, only the mean over seeds goes to TensorBoard


# --------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), table-driven: the checksum TFRecord framing requires. Python's zlib only has
# CRC32 (a different polynomial), and the only packages providing CRC32C would be new dependencies.


def _make_crc32c_table() -> list[int]:
    poly = 0x82F63B78  # reversed Castagnoli polynomial
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masking: rotate right by 15 and add a constant (so CRCs of CRCs stay useful)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


# --------------------------------------------------------------------------------------------------
# Protobuf wire format for the three messages used (field numbers from tensorflow's event.proto and
# summary.proto):  Event{1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary}
#                  Summary{1: repeated Value value}    Value{1: string tag, 2: float simple_value}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf encodes it
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
) -> bytes:
    """A serialised `tensorflow.Event` with either a file_version or a Summary of simple_values."""
    msg = _varint((1 << 3) | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        msg += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + _varint((2 << 3) | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        msg += _len_field(5, summary)
    return msg


class EventFileWriter:
    """Appends scalar summaries to one TensorBoard event file (`events.out.tfevents.<time>.<host>`)."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        base = os.path.join(os.fspath(logdir), f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
        path, k = base, 0
        while os.path.exists(path):  # a second writer within the same second (e.g. a quick resume)
            k += 1
            path = f"{base}.{k}"
        self.path = path
        self._file = open(path, "ab")
        self._write(encode_event(now, 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord_frame(event))
        self._file.flush()

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        if scalars:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=scalars))

    def close(self) -> None:
        self._file.close()


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


def _tb_scalars(tag: str, value: Any) -> dict[str, float]:
    """TensorBoard scalars for one metric: numbers as they are; [S] arrays as mean + one tag per seed."""
    if value is None or isinstance(value, str | Mapping):
        return {}
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        return {}
    if a.ndim == 0:
        return {tag: float(a)}
    if a.ndim == 1 and a.size > 0:
        out = {tag: float(np.mean(a.astype(np.float64)))}
        if a.size <= _MAX_SEEDS_PER_TAG:
            out.update({f"{tag}/seed_{k}": float(v) for k, v in enumerate(a)})
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


class MetricsWriter:
    """Writes metrics to WORKDIR/metrics.jsonl and (optionally) WORKDIR/tensorboard/ event files.

    On multi-host runs, create it on process 0 only.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
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
        self._events = EventFileWriter(os.path.join(self.workdir, "tensorboard")) if tensorboard else None

    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        now = time.time()
        record = {"stage": stage, "step": int(step), "time": now}
        record.update({str(k): _to_json(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            scalars: dict[str, float] = {}
            for name, value in metrics.items():
                scalars.update(_tb_scalars(f"{stage}/{name}", value))
            self._events.add_scalars(int(step), scalars, wall_time=now)

    def truncate(self, stage: str, step: int) -> None:
        """Drop the `stage` records logged after `step` (a resumed stage redoes those steps), so that a run
        killed at any moment and rerun ends with the records of an uninterrupted one. The file is replaced
        atomically and reopened: appending through the old handle would write into the replaced file."""
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
        if self._events is not None:
            self._events.close()

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

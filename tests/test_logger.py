"""MetricsWriter / Progress: what a user reads back from metrics.jsonl, TensorBoard and the console."""

import glob
import io
import json
import math
import os
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from mb2po_jax.logger import MetricsWriter, Progress, crc32c, format_duration, masked_crc32c


# ---- a minimal independent reader: TFRecord framing with CRC checks + the protobuf fields we use ----

def read_records(path):
    data = open(path, "rb").read()
    pos, out = 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert hcrc == masked_crc32c(header), "length CRC mismatch"
        payload = data[pos + 12:pos + 12 + length]
        (pcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert pcrc == masked_crc32c(payload), "payload CRC mismatch"
        out.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return out


def parse_proto(buf):
    """{field: [values]} for wire types 0 (varint), 1 (fixed64 bytes), 2 (bytes), 5 (fixed32 bytes)."""
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            val = varint()
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(field, []).append(val)
    return fields


def read_events(path):
    events = []
    for rec in read_records(path):
        f = parse_proto(rec)
        ev = {"wall_time": struct.unpack("<d", f[1][0])[0], "step": f.get(2, [0])[0]}
        if 3 in f:
            ev["file_version"] = f[3][0].decode()
        if 5 in f:
            values = {}
            for v in parse_proto(f[5][0])[1]:
                vf = parse_proto(v)
                values[vf[1][0].decode()] = struct.unpack("<f", vf[2][0])[0]
            ev["values"] = values
        events.append(ev)
    return events


# ---------------------------------------------------------------------------------------------------

def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector (32 zero bytes)


def write_sample(workdir):
    with MetricsWriter(workdir) as w:
        w.write("awac", 100, {"critic_loss": 1.5, "q": np.float32(2.25), "n": 3})
        w.write("eval", 100, {"return": jnp.array([10.0, 20.0, 30.0]),
                              "normalized_score": np.array([1.0, np.nan, np.inf]),
                              "note": "ok"})
        w.write("awac", 200, {"critic_loss": float("nan"), "actor_loss": float("-inf")})


def test_jsonl_lines_parse_with_arrays_and_nan(tmp_path):
    write_sample(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict: json.loads rejects nothing we write
    assert [(r["stage"], r["step"]) for r in rows] == [("awac", 100), ("eval", 100), ("awac", 200)]
    assert all(isinstance(r["time"], float) and abs(r["time"] - rows[0]["time"]) < 60 for r in rows)
    assert rows[0]["critic_loss"] == 1.5 and rows[0]["q"] == 2.25 and rows[0]["n"] == 3
    assert rows[1]["return"] == [10.0, 20.0, 30.0]
    assert rows[1]["normalized_score"] == [1.0, None, None]
    assert rows[1]["note"] == "ok"
    assert rows[2]["critic_loss"] is None and rows[2]["actor_loss"] is None
    for line in lines:  # valid JSON for any parser: no NaN/Infinity tokens
        assert "NaN" not in line and "Infinity" not in line


def test_reserved_names_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write("awac", 1, {"step": 3})


def test_resume_appends_after_torn_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write("awac", 1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "awac", "step": 2, "lo')  # a crash mid-line
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write("awac", 2, {"loss": 0.5})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5)]


def test_event_file_read_back_with_own_reader(tmp_path):
    write_sample(tmp_path)
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    assert re.fullmatch(r"events\.out\.tfevents\.\d+\.[^/]+", os.path.basename(files[0]))
    events = read_events(files[0])
    assert events[0]["file_version"] == "brain.Event:2"
    summaries = [(e["step"], e["values"]) for e in events[1:]]
    assert summaries[0] == (100, {"awac/critic_loss": 1.5, "awac/q": 2.25, "awac/n": 3.0})
    step, vals = summaries[1]
    assert step == 100 and set(vals) == {
        "eval/return", "eval/return/seed_0", "eval/return/seed_1", "eval/return/seed_2",
        "eval/normalized_score", "eval/normalized_score/seed_0", "eval/normalized_score/seed_1",
        "eval/normalized_score/seed_2"}
    assert vals["eval/return"] == 20.0 and vals["eval/return/seed_2"] == 30.0
    assert math.isnan(vals["eval/normalized_score/seed_1"])
    assert math.isinf(vals["eval/normalized_score/seed_2"])
    assert summaries[2][0] == 200 and math.isnan(summaries[2][1]["awac/critic_loss"])


def test_many_seeds_log_only_the_mean(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write("eval", 5, {"return": np.arange(10.0)})
    (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert read_events(path)[1]["values"] == {"eval/return": 4.5}


def test_event_file_read_back_with_tensorboard(tmp_path):
    ea_mod = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard not installed: only the built-in reader checks the event file")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked
    for data in (b"", b"brain.Event:2", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tb_masked(data)
    write_sample(tmp_path)
    acc = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"awac/critic_loss", "awac/q", "eval/return", "eval/return/seed_1"} <= set(tags)
    loss = acc.Scalars("awac/critic_loss")
    assert [e.step for e in loss] == [100, 200]
    assert loss[0].value == 1.5 and math.isnan(loss[1].value)
    assert [(e.step, e.value) for e in acc.Scalars("eval/return")] == [(100, 20.0)]
    assert acc.Scalars("eval/return/seed_1")[0].value == 20.0


# ---------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_line_format():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(500_000, "awac", stream=out, min_interval_s=0, clock=clock)
    clock.t += 6.0
    p.update(12_000, loss=1.2345678, seed_returns=np.array([1.0, 2.5]))
    clock.t += 10.0
    p.update(30_000)
    clock.t += 4.0
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[awac] 12000/500000 (2.4%)  2000 steps/s  ETA 4m04s  loss=1.235  seed_returns=[1,2.5]"
    assert lines[1] == "[awac] 30000/500000 (6.0%)  1800 steps/s  ETA 4m21s"
    assert lines[2] == "[awac] 30000/500000 (6.0%)  done in 20s  1500 steps/s"


def test_progress_rate_limited_and_resumed():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(1000, "mb2po", start_step=400, stream=out, min_interval_s=5.0, clock=clock)
    for _ in range(3):
        clock.t += 1.0
        p.update(p._step + 10)  # 1 s apart: too soon to print
    assert out.getvalue() == ""
    clock.t += 2.0
    p.update(450)  # 5 s after start, 50 steps done in this process
    assert out.getvalue().splitlines() == ["[mb2po] 450/1000 (45.0%)  10 steps/s  ETA 55s"]
    p.close()
    assert out.getvalue().splitlines()[-1] == "[mb2po] 450/1000 (45.0%)  done in 5s  10 steps/s"


def test_format_duration():
    assert format_duration(12.2) == "12s"
    assert format_duration(261) == "4m21s"
    assert format_duration(3723) == "1h02m03s"


def test_truncate_then_write_keeps_every_line_the_open_writer_writes(tmp_path):
    """A resumed stage drops its records after the checkpoint and goes on writing through the same writer:
    the new lines must land in the file (not in the replaced one) and nothing else may be lost."""
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.write("awac", step, {"loss": float(step)})
        w.write("dynamics", 5, {"mse": 0.5})
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.truncate("awac", 1)
        w.write("awac", 2, {"loss": 20.0})
        w.truncate("mb2po", 0)  # nothing of that stage: the file is left as it is
        w.write("awac", 3, {"loss": 30.0})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("awac", 1), ("dynamics", 5), ("awac", 2), ("awac", 3)]
    assert [r.get("loss") for r in records] == [1.0, None, 20.0, 30.0]


def test_progress_names_the_callers_unit():
    """MB2PO's progress counts iterations: "it/s", or "s/it" when slower than one a second."""
    out, clock = io.StringIO(), FakeClock()
    p = Progress(100, "mb2po", stream=out, min_interval_s=0, clock=clock, unit="it")
    clock.t += 27.0
    p.update(1)
    clock.t += 1.0
    p.update(5)
    p.close()
    assert out.getvalue().splitlines() == [
        "[mb2po] 1/100 (1.0%)  27 s/it  ETA 44m33s",
        "[mb2po] 5/100 (5.0%)  4 it/s  ETA 24s",
        "[mb2po] 5/100 (5.0%)  done in 28s  5.6 s/it",
    ]

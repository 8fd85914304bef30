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
from tensorboardX.proto import event_pb2

from mb2po_jax.logger import MetricsWriter, Progress, format_duration


# ---- a minimal independent reader of the event files: TFRecord framing with its CRC32C checks, the Event
# protobufs decoded with tensorboardX's generated classes, and TensorBoard's purge rule (a SessionLog START
# at step T hides the points at steps >= T read before it). It runs without tensorboard installed.

def _crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data):
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    data = open(path, "rb").read()
    pos, out = 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc32c(header), "length CRC mismatch"
        payload = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked_crc32c(payload), \
            "payload CRC mismatch"
        out.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    assert pos == len(data)
    return out


def event_files(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))


def read_run(run_dir):
    """{tag: [(step, value), ...]} of one TensorBoard run (all its event files, oldest first)."""
    scalars = {}
    for path in event_files(run_dir):
        events = read_events(path)
        assert events[0].file_version == "brain.Event:2"
        for e in events:
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                scalars = {tag: [p for p in points if p[0] < e.step] for tag, points in scalars.items()}
            for v in e.summary.value:
                scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
    return scalars


def runs(workdir):
    root = os.path.join(workdir, "tensorboard")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_own_reader_crc32c_known_vectors():
    assert _crc32c(b"") == 0
    assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert _crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector (32 zero bytes)


# ---------------------------------------------------------------------------------------------------

HOLDOUT_MSE = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.nan]])


def write_sample(workdir):
    with MetricsWriter(workdir) as w:
        w.write("awac", 100, {"critic_loss": 1.5, "q": np.float32(2.25), "n": 3})
        w.write("eval", 100, {"return": jnp.array([10.0, 20.0, 30.0]),
                              "normalized_score": np.array([1.0, np.nan, np.inf]),
                              "note": "ok"})
        w.write("awac", 200, {"critic_loss": float("nan"), "actor_loss": float("-inf")})
        for step in (7, 14):  # the dynamics stage's values per seed [2] and per seed and member [2, 3]
            w.write("dynamics", step, {"train_loss": np.array([0.5, 0.25]) * step, "holdout_mse": HOLDOUT_MSE * step,
                                       "best_holdout_mse": np.full((2, 3), 0.5),
                                       "elites": np.array([[2, 0], [1, 2]], np.int32)})


def test_jsonl_lines_parse_with_arrays_and_nan(tmp_path):
    write_sample(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict: json.loads rejects nothing we write
    assert [(r["stage"], r["step"]) for r in rows] == [("awac", 100), ("eval", 100), ("awac", 200),
                                                       ("dynamics", 7), ("dynamics", 14)]
    assert all(isinstance(r["time"], float) and abs(r["time"] - rows[0]["time"]) < 60 for r in rows)
    assert rows[0]["critic_loss"] == 1.5 and rows[0]["q"] == 2.25 and rows[0]["n"] == 3
    assert rows[1]["return"] == [10.0, 20.0, 30.0]
    assert rows[1]["normalized_score"] == [1.0, None, None]
    assert rows[1]["note"] == "ok"
    assert rows[2]["critic_loss"] is None and rows[2]["actor_loss"] is None
    assert rows[3]["holdout_mse"] == [[7.0, 14.0, 21.0], [28.0, 35.0, None]]
    assert rows[3]["elites"] == [[2, 0], [1, 2]]
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
    assert runs(tmp_path) == []  # tensorboard=False: no event files


def test_event_files_one_run_per_stage_read_back_with_own_reader(tmp_path):
    write_sample(tmp_path)
    assert runs(tmp_path) == ["awac", "dynamics", "eval"]
    for stage in runs(tmp_path):
        (path,) = event_files(tmp_path / "tensorboard" / stage)
        assert re.fullmatch(r"events\.out\.tfevents\.\d+\.[^/]+", os.path.basename(path))

    awac = read_run(tmp_path / "tensorboard" / "awac")
    assert set(awac) == {"awac/critic_loss", "awac/q", "awac/n", "awac/actor_loss"}
    assert awac["awac/critic_loss"][0] == (100, 1.5) and awac["awac/critic_loss"][1][0] == 200
    assert math.isnan(awac["awac/critic_loss"][1][1])
    assert awac["awac/q"] == [(100, 2.25)] and awac["awac/n"] == [(100, 3.0)]
    assert awac["awac/actor_loss"] == [(200, -math.inf)]

    ev = read_run(tmp_path / "tensorboard" / "eval")
    assert set(ev) == {"eval/return", "eval/return/seed_0", "eval/return/seed_1", "eval/return/seed_2",
                       "eval/normalized_score", "eval/normalized_score/seed_0", "eval/normalized_score/seed_1",
                       "eval/normalized_score/seed_2"}
    assert ev["eval/return"] == [(100, 20.0)] and ev["eval/return/seed_2"] == [(100, 30.0)]
    assert math.isnan(ev["eval/normalized_score/seed_1"][0][1])
    assert math.isinf(ev["eval/normalized_score/seed_2"][0][1])

    dyn = read_run(tmp_path / "tensorboard" / "dynamics")
    members = {f"dynamics/{m}/seed_{s}/member_{k}" for m in ("holdout_mse", "best_holdout_mse")
               for s in range(2) for k in range(3)}
    means = {f"dynamics/{m}{seed}" for m in ("holdout_mse", "best_holdout_mse", "train_loss")
             for seed in ("", "/seed_0", "/seed_1")}
    ranks = {f"dynamics/elites/seed_{s}/rank_{k}" for s in range(2) for k in range(2)}
    assert set(dyn) == members | means | ranks
    assert dyn["dynamics/holdout_mse/seed_0/member_2"] == [(7, 21.0), (14, 42.0)]
    assert dyn["dynamics/holdout_mse/seed_1/member_0"] == [(7, 28.0), (14, 56.0)]
    assert math.isnan(dyn["dynamics/holdout_mse/seed_1/member_2"][0][1])
    assert dyn["dynamics/holdout_mse/seed_0"] == [(7, 14.0), (14, 28.0)]  # mean over the seed's members
    assert dyn["dynamics/best_holdout_mse/seed_1/member_1"] == [(7, 0.5), (14, 0.5)]
    assert dyn["dynamics/elites/seed_0/rank_0"] == [(7, 2.0), (14, 2.0)]  # the best member of seed 0
    assert dyn["dynamics/train_loss/seed_1"] == [(7, 1.75), (14, 3.5)]


def test_many_seeds_or_members_log_only_the_mean(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write("eval", 5, {"return": np.arange(10.0)})
        w.write("dynamics", 5, {"holdout_mse": np.ones((9, 2)), "elites": np.zeros((9, 2), np.int32)})
        w.write("dynamics", 6, {"holdout_mse": np.ones((2, 33))})
    assert read_run(tmp_path / "tensorboard" / "eval") == {"eval/return": [(5, 4.5)]}
    assert read_run(tmp_path / "tensorboard" / "dynamics") == {
        "dynamics/holdout_mse": [(5, 1.0), (6, 1.0)],
        "dynamics/holdout_mse/seed_0": [(6, 1.0)], "dynamics/holdout_mse/seed_1": [(6, 1.0)]}


def write_resumed(workdir):
    """A run killed after awac step 3 (checkpoint at step 1) and rerun at once (same second): the rerun drops
    the records after step 1 and redoes steps 2 and 3; the dynamics stage is untouched."""
    with MetricsWriter(workdir) as w:
        for step in (1, 2, 3):
            w.write("awac", step, {"loss": float(step)})
        w.write("dynamics", 2, {"mse": 0.5})
    with MetricsWriter(workdir) as w:
        w.truncate("awac", 1)
        for step in (2, 3):
            w.write("awac", step, {"loss": 10.0 * step})


def test_resume_marks_redone_steps_in_a_new_event_file(tmp_path):
    write_resumed(tmp_path)
    files = event_files(tmp_path / "tensorboard" / "awac")
    assert len(files) == 2  # the rerun's file does not replace the first one (same second)
    first, second = (read_events(path) for path in files)
    assert [e.step for e in first if e.summary.value] == [1, 2, 3]  # event files are never rewritten
    marks = [(i, e.step) for i, e in enumerate(second)
             if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert len(marks) == 1 and marks[0][1] == 2  # the purge marker: the first redone step
    assert [e.step for e in second[marks[0][0]:] if e.summary.value] == [2, 3]  # before the redone points
    assert read_run(tmp_path / "tensorboard" / "awac") == {"awac/loss": [(1, 1.0), (2, 20.0), (3, 30.0)]}
    assert read_run(tmp_path / "tensorboard" / "dynamics") == {"dynamics/mse": [(2, 0.5)]}


def test_event_files_read_back_with_tensorboard(tmp_path):
    em_mod = pytest.importorskip(
        "tensorboard.backend.event_processing.event_multiplexer",
        reason="tensorboard not installed: only the built-in reader checks the event files")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked
    for data in (b"", b"brain.Event:2", bytes(range(256)) * 3):
        assert _masked_crc32c(data) == tb_masked(data)  # the built-in reader checks what TensorBoard checks
    write_sample(tmp_path / "sample")
    write_resumed(tmp_path / "resumed")
    mux = em_mod.EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert set(mux.Runs()) == {"sample/tensorboard/awac", "sample/tensorboard/eval", "sample/tensorboard/dynamics",
                               "resumed/tensorboard/awac", "resumed/tensorboard/dynamics"}

    def points(run, tag):
        return [(e.step, e.value) for e in mux.Scalars(f"{run}/tensorboard/{tag.split('/')[0]}", tag)]

    assert set(mux.GetAccumulator("sample/tensorboard/awac").Tags()["scalars"]) == {
        "awac/critic_loss", "awac/q", "awac/n", "awac/actor_loss"}
    loss = points("sample", "awac/critic_loss")
    assert loss[0] == (100, 1.5) and loss[1][0] == 200 and math.isnan(loss[1][1])
    assert points("sample", "eval/return") == [(100, 20.0)]
    assert points("sample", "eval/return/seed_1") == [(100, 20.0)]
    assert points("sample", "dynamics/holdout_mse/seed_0/member_2") == [(7, 21.0), (14, 42.0)]
    assert points("sample", "dynamics/elites/seed_1/rank_1") == [(7, 2.0), (14, 2.0)]
    assert points("resumed", "awac/loss") == [(1, 1.0), (2, 20.0), (3, 30.0)]  # the purge marker is honoured
    assert points("resumed", "dynamics/mse") == [(2, 0.5)]


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


def test_missing_tensorboardx_is_one_clear_error(tmp_path, monkeypatch):
    """An install older than the tensorboardX dependency (an editable checkout moved on) gets a ConfigError
    saying what to do, which mb2po-train prints as one error line, not an ImportError traceback."""
    from mb2po_jax.errors import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)  # `import tensorboardX` fails
    with pytest.raises(ConfigError, match=r"tensorboardX.*pip install -e"):
        MetricsWriter(tmp_path)  # before any work is done
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # what does not need it still works
        w.write("awac", 1, {"loss": 1.0})

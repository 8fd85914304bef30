"""`mb2po-plot`: learning curves of workdirs from their metrics.jsonl (written here by hand, as training does)."""
import json
import os
import subprocess
import sys

import pytest

from mb2po_jax import plot

pytest.importorskip("matplotlib")  # the "plot" extra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_workdir(path, awac_scores, mb2po_scores, awac_steps=200, per_iteration=10):
    """A finished run's metrics.jsonl and config.json: evaluations (lists over seeds) every 100 AWAC steps
    and every 2 MB2PO iterations, dynamics records [S, members], MB2PO rollout metrics per iteration."""
    path.mkdir(parents=True)
    seeds = len(awac_scores[0])
    lines = [{"stage": "awac", "step": 100 * (i + 1), "critic_loss": [1.0] * seeds} for i in range(len(awac_scores))]
    lines += [{"stage": "awac", "step": 100 * (i + 1), "return": s, "normalized_score": s}
              for i, s in enumerate(awac_scores)]
    lines += [{"stage": "dynamics", "step": 4 * (e + 1), "holdout_mse": [[0.5 / (e + 1)] * 5] * seeds}
              for e in range(3)]
    for it in range(1, 2 * len(mb2po_scores) + 1):
        lines.append({"stage": "mb2po", "step": it, "rollout_mean_penalty": [0.5 * it] * seeds,
                      "rollout_mean_uncertainty": [it] * seeds})
        if it % 2 == 0:
            s = mb2po_scores[it // 2 - 1]
            lines.append({"stage": "mb2po", "step": it, "return": s, "normalized_score": s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    config = {"awac_steps": awac_steps, "num_seeds": seeds, "stages": ["awac", "dynamics", "mb2po"],
              "mb2po": {"updates_per_iteration": per_iteration, "iterations": 2 * len(mb2po_scores)}}
    (path / "config.json").write_text(json.dumps({"config": config}))
    return str(path)


def test_figure_stitches_awac_then_mb2po_with_its_panels(tmp_path):
    a = _fake_workdir(tmp_path / "a" / "run", [[10.0, 20.0], [30.0, 40.0]], [[50.0, 60.0], [70.0, 90.0]])
    b = _fake_workdir(tmp_path / "b" / "run", [[5.0, 5.0], [6.0, 6.0]], [[7.0, 7.0]])
    fig = plot.make_figure([a, b])
    score, dyn, mb = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [plot.SCORE_TITLE, plot.DYNAMICS_TITLE, plot.MB2PO_TITLE]
    lines = {(l.get_color(), tuple(l.get_xdata())): list(l.get_ydata()) for l in score.get_lines()}
    # Workdir a: AWAC at its steps, MB2PO from AWAC's last point at 200 + iteration x 10 updates; means.
    assert lines["C0", (100.0, 200.0)] == [15.0, 35.0]
    assert lines["C0", (200.0, 220.0, 240.0)] == [35.0, 55.0, 80.0]
    assert lines["C1", (200.0, 220.0)] == [6.0, 7.0]
    assert ("0.3", (200, 200)) in {(l.get_color(), tuple(l.get_xdata())) for l in score.get_lines()}  # boundary
    assert len(score.collections) == 4  # a min-max band per workdir and stage (2 seeds each)
    assert [t.get_text() for t in score.get_legend().get_texts()] == ["a/run", "b/run"]
    assert len(dyn.get_lines()) == 2 and list(dyn.get_lines()[0].get_ydata()) == pytest.approx([0.5, 0.25, 0.5 / 3])
    assert [t.get_text() for t in mb.get_legend().get_texts()] == [
        "a/run: penalty", "a/run: uncertainty", "b/run: penalty", "b/run: uncertainty"]

    out = tmp_path / "curves.png"
    assert plot.main([a, b, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    a = _fake_workdir(tmp_path / "a", [[1.0]], [[2.0]])
    (tmp_path / "empty").mkdir()
    assert plot.main([a, str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'empty'}: no metrics.jsonl (nothing trained yet?)\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert plot.main([a, "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: mb2po-plot needs matplotlib") and err.count("\n") == 1 and "[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_curve_script_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "curve.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "WORKDIR/metrics.jsonl" in out.stdout and not out.stderr


def test_curve_script_adds_the_training_metrics_of_each_evaluations_step(tmp_path):
    a = _fake_workdir(tmp_path / "a", [[10.0, 20.0]], [[50.0, 60.0], [70.0, 90.0]])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "curve.py"), a,
                          "--metrics", "rollout_mean_uncertainty,critic_loss"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and not out.stderr
    rows = out.stdout.splitlines()
    assert rows[0] == "| stage | step | return | normalised score | rollout_mean_uncertainty | critic_loss |"
    assert rows[2:] == ["| awac | 100 | 15.0 (10.0, 20.0) | 15.0 (10.0, 20.0) |  | 1 (1, 1) |",
                        "| mb2po | 2 | 55.0 (50.0, 60.0) | 55.0 (50.0, 60.0) | 2 (2, 2) |  |",
                        "| mb2po | 4 | 80.0 (70.0, 90.0) | 80.0 (70.0, 90.0) | 4 (4, 4) |  |"]

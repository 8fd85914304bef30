"""The README's Python example runs as written (with its data directory redirected to a temp dir)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_commands_come_first():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = [l for l in blocks[0].splitlines() if l.strip()]
    assert commands == ['pip install -e . && mb2po-train --preset smoke',
                        'pip install -e ".[test]" && python -m pytest -q']
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and 'pip install -e ".[test]"' in ci


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    from mb2po_jax.behavior import generation

    monkeypatch.setenv("MB2PO_DATA_DIR", str(tmp_path / "data"))
    # The example as written, on a shorter default dataset (the full 105k rows take a minute to roll out;
    # test_data_generation covers making the default itself).
    monkeypatch.setattr(generation, "DEFAULT_DATASET_SIZE", 5000)
    code = _python_example().replace("/tmp/mb2po_example_state", str(tmp_path / "state"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "critic loss per seed" in out and "normalised score per seed" in out

"""The README's Python examples run as written (on the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert python_blocks()


@pytest.mark.integration
@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_example_runs(i, embedded_model, monkeypatch, capsys):
    import refusal_lens

    monkeypatch.setattr(refusal_lens, "load_model", lambda *a, **k: embedded_model)  # loaded once per session
    exec(compile(python_blocks()[i], f"README.md block {i}", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("[") >= 2  # both generations printed a list of completions

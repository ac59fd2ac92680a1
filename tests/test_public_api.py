"""The public surface: every name in ``refusal_lens.__all__`` resolves, lazily, to the object its module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys

import refusal_lens


def test_every_public_name_resolves_to_its_module_object():
    assert 15 <= len(refusal_lens.__all__) <= 20
    for name in refusal_lens.__all__:
        obj = getattr(refusal_lens, name)
        module = importlib.import_module(refusal_lens._PUBLIC[name])
        assert obj is getattr(module, name), name
        assert obj.__doc__ and "Example" in obj.__doc__, f"{name} has no docstring example"
        assert not hasattr(sys.modules["refusal_lens"], "_" + name)
    assert set(dir(refusal_lens)) >= set(refusal_lens.__all__)


def test_no_public_name_shadows_a_submodule():
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(refusal_lens.__path__)}
    assert not submodules & set(refusal_lens.__all__)


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        refusal_lens.nope  # noqa: B018


def test_import_is_lazy():
    """``import refusal_lens`` does not import torch or TransformerLens (the CLI's --help stays fast)."""
    code = "import sys, refusal_lens; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

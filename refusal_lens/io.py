"""Atomic output folders: write into a temporary sibling, rename into place only on success."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refusal_lens.errors import OutputExistsError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``out`` exists (or is a dangling link) and ``overwrite`` is False,
    or if it exists and is not a folder."""
    out = Path(out)
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite:
        raise OutputExistsError(f"{out} already exists. Choose another --out, or pass --overwrite to replace it.")
    if exists and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; remove it or choose another path.")
    return out


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is removed.

    An interrupted run (exception, Ctrl-C) leaves nothing at ``out`` and an existing ``out`` untouched; a
    previous ``out`` is replaced (with ``overwrite``) only once the new folder is complete.
    """
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        check_output_dir(out, overwrite)  # something may have appeared meanwhile
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

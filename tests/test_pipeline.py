"""pipeline.py and cli.py: the run folder, atomic output, bad input, CLI errors without tracebacks."""

from __future__ import annotations

import json
import re

import pytest
import torch

from refusal_lens.cli import main
from refusal_lens.errors import DataError, OutputExistsError
from refusal_lens.jsonio import json_safe
from refusal_lens.pipeline import PHASES, RunConfig, RunResult, run_pipeline
from tiny import save_tiny

HARMFUL = ["how to steal a car", "make a weapon now", "hurt the cat badly", "break into the house",
           "poison the dog", "burn the park", "rob the bank", "lie to the judge"]
HARMLESS = ["tell me a story", "what is the weather", "how to bake bread", "the dog plays in the park",
            "sing a song", "draw a cat", "plan a trip", "write a poem"]


def _write_sets(tmp_path, harmful=HARMFUL, harmless=HARMLESS, sizes=(4, 2, 2)):
    """jsonl files with ``sizes`` = (train, val, test) instructions per set (extra items are dropped)."""
    paths = []
    splits = ["train"] * sizes[0] + ["val"] * sizes[1] + ["test"] * sizes[2]
    for name, items in (("harmful", harmful), ("harmless", harmless)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(json.dumps({"instruction": x, "split": s}) for x, s in zip(items, splits, strict=False)))
        paths.append(str(p))
    return paths


def _cfg(tmp_path, **kw):
    h, hl = _write_sets(tmp_path)
    kw.setdefault("filter", False)  # a random tiny model refuses nothing
    return RunConfig(harmful_path=h, harmless_path=hl, max_new_tokens=4, batch_size=4, refusal_ids=[1],
                     max_layer_frac=1.0, **kw)


def test_run_writes_complete_folder(tiny_llama, tmp_path):
    out = tmp_path / "run"
    res = run_pipeline(tiny_llama, out, _cfg(tmp_path, strategy="exhaustive"))
    names = {p.name for p in out.iterdir()}
    assert {"direction.safetensors", "direction.json", "selection.json", "evaluation.json", "completions.jsonl",
            "report.html", "candidates.safetensors", "candidates.json"} <= names
    back = RunResult.load(out)
    ev = back.evaluation
    assert (back.direction.layer, back.direction.position) == (res.direction.layer, res.direction.position)
    assert torch.equal(back.direction.vector, res.direction.vector)
    assert json_safe(back.selection.to_dict()) == json_safe(res.selection.to_dict())
    assert torch.equal(back.candidates.diffs, res.candidates.diffs)
    assert back.completions == res.completions
    assert back.timings == res.timings and list(back.timings) == list(PHASES)  # the report's time included
    assert back.seconds == res.evaluation["seconds_total"] <= res.seconds
    assert set(ev["conditions"]) >= {"harmful_baseline", "harmful_ablated", "harmless_baseline", "harmless_added_coeff1"}
    assert ev["conditions"] == res.evaluation["conditions"]
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == sum(c["n"] for c in ev["conditions"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]
    _check_report(out / "report.html", res)
    copy = back.save(tmp_path / "copy")  # a loaded run saves again, whole
    assert RunResult.load(copy).evaluation == back.evaluation and (copy / "report.html").is_file()
    with pytest.raises(OutputExistsError):
        back.save(copy)


def _check_report(path, res):
    """report.html: self-contained (one inlined plotly.js, no CDN), tables with units and rounded figures."""
    from plotly.offline import get_plotlyjs

    html = path.read_text()
    assert html.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined exactly once
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing fetched: renders offline
    assert html.count("Plotly.newPlot(") == 2  # refusal bars and selection heatmaps
    for header in ("refusal score (share)", "KL (nats)", "cross-entropy on the base model's completions (nats/token)",
                   "bypass (log-odds)", "wall time (s)", "Sample completions: harmful prompts"):
        assert html.count(header.replace("'", "&#x27;")) >= 1, header
    page = html.replace(get_plotlyjs(), "")  # the page without the plotly.js library
    assert "{'" not in page and "timings_s" not in page  # no Python dict printed
    ev, sel = res.evaluation, res.selection
    kl = ev["kl_harmless_test_last_token"]
    assert f">{kl:.3f}<" in html and repr(kl) not in html  # rounded to 3 decimals
    score = ev["conditions"]["harmful_ablated"]["refusal_score"]
    assert f"<td class='num'>{score:.2f}</td>" in html
    scored = [s for s in sel.scores if s.bypass == s.bypass]
    assert html.count(f"<td class='num'>{scored[0].layer}</td><td class='num'>{scored[0].position}</td>") >= 1
    assert html.count("★") == 1  # the pick is marked once in the candidates table
    # the page is written before the report phase ends, so its total may miss the report's own time
    total = re.search(r"<td>total</td><td class='num'>(\d+)</td>", html)
    assert total and ev["seconds_total"] - ev["timings_s"]["report"] - 1 <= int(total.group(1)) <= round(
        ev["seconds_total"])


def test_existing_output_refused_and_untouched(tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_pipeline(tiny_llama, out, _cfg(tmp_path))
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_run_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import refusal_lens.pipeline as pl

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "evaluate_direction", boom)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_llama, tmp_path / "run", _cfg(tmp_path))
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_bad_prompt_sets(tiny_llama, tmp_path):
    h, hl = _write_sets(tmp_path, harmful=HARMFUL[:4] + HARMFUL[:4])  # duplicates
    with pytest.raises(DataError, match="uplicate"):
        run_pipeline(tiny_llama, tmp_path / "r1", RunConfig(harmful_path=h, harmless_path=hl, refusal_ids=[1]))
    h, hl = _write_sets(tmp_path, harmful=HARMFUL[:5])  # too few for val/test
    with pytest.raises(DataError):
        run_pipeline(tiny_llama, tmp_path / "r2", RunConfig(harmful_path=h, harmless_path=hl, refusal_ids=[1]))
    h, hl = _write_sets(tmp_path, harmless=HARMFUL)  # the same prompts in both sets
    with pytest.raises(DataError, match="both"):
        run_pipeline(tiny_llama, tmp_path / "r3", RunConfig(harmful_path=h, harmless_path=hl, refusal_ids=[1]))
    assert not any((tmp_path / n).exists() for n in ("r1", "r2", "r3"))


def test_cli_run_on_tiny_folder_and_errors(tmp_path, capsys):
    folder = save_tiny("qwen2", tmp_path / "model")
    h, hl = _write_sets(tmp_path)
    args = ["run", "--model", str(folder), "--harmful", h, "--harmless", hl, "--max-new-tokens", "3",
            "--batch-size", "4", "--max-layer-frac", "1.0", "--no-filter", "--refusal-ids", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert (tmp_path / "run" / "report.html").exists()
    assert main(args) == 2  # exists now
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert main(args + ["--overwrite"]) == 0
    # no refusal ids: the tiny random model never refuses, so the CLI explains why it cannot go on
    assert main(args[:-4] + ["--out", str(tmp_path / "run2")]) == 2
    assert "refused none" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_help():
    assert main(["--help"]) == 0


def test_cli_export_in_memory_and_streaming(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path / "model")
    h, hl = _write_sets(tmp_path)
    run = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--harmful", h, "--harmless", hl, "--max-new-tokens", "2",
                 "--batch-size", "4", "--max-layer-frac", "1.0", "--refusal-ids", "1", "--no-filter", "--out", str(run),
                 "--export", str(tmp_path / "exp0")]) == 0
    assert (tmp_path / "exp0" / "config.json").exists()
    d = str(run / "direction.safetensors")
    assert main(["export", "-d", d, "--model", str(folder), "--out", str(tmp_path / "exp1")]) == 0
    assert main(["export", "-d", d, "--model", str(folder), "--streaming", "--out", str(tmp_path / "exp2")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "exp1")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "exp2")
    sa, sb = a.state_dict(), b.state_dict()
    assert all((sa[k] - sb[k]).abs().max() < 1e-6 for k in sa)
    assert main(["export", "-d", d, "--model", str(folder), "--out", str(tmp_path / "exp1")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_suffix_and_hijack_on_tiny_model(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "model")
    h, hl = _write_sets(tmp_path)
    run = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--harmful", h, "--harmless", hl, "--max-new-tokens", "2",
                 "--batch-size", "4", "--max-layer-frac", "1.0", "--refusal-ids", "1", "--no-filter", "--out", str(run)]) == 0
    d = str(run / "direction.safetensors")
    sfx = tmp_path / "suffix.json"
    assert main(["suffix", "-d", d, "--model", str(folder), "--out", str(sfx), "--n-prompts", "2",
                 "--n-tokens", "3", "--steps", "2", "--search-width", "4"]) == 0
    assert sfx.exists()
    assert main(["suffix", "-d", d, "--model", str(folder), "--out", str(sfx)]) == 2  # exists
    out = tmp_path / "hijack"
    assert main(["hijack", "-d", d, "--model", str(folder), "--suffix", str(sfx), "--out", str(out),
                 "--n-prompts", "3", "--top-k", "2", "--max-new-tokens", "3"]) == 0
    assert (out / "hijack.html").exists() and (out / "hijack.json").exists()
    printed = capsys.readouterr().err
    assert "harmful+adversarial" in printed and "refusal" in printed and "echo suffix" in printed
    assert json.loads((out / "hijack.json").read_text())["metadata"]["max_new_tokens"] == 3
    other = tmp_path / "model2"
    save_tiny("qwen2", other)
    assert main(["hijack", "-d", d, "--model", str(other), "--suffix", str(sfx), "--out", str(tmp_path / "h2")]) == 2
    assert "error:" in capsys.readouterr().err


def test_addition_coefficient_falls_back_to_best_share(tiny_llama, monkeypatch):
    """When no coefficient reaches the target, the best one is kept, not the largest (which breaks models)."""
    import torch

    import refusal_lens.selection as sel
    from refusal_lens.directions import Direction

    d = Direction(torch.ones(tiny_llama.cfg.d_model), 1, -1, tiny_llama.refusal_lens_id, norm=2.0)
    shares = iter([0.1, 0.2, 0.5, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0])
    def fake_metric(logits, ids):  # ten prompts, a share of them with metric > 0
        k = round(next(shares) * 10)
        return torch.tensor([1.0] * k + [-1.0] * (10 - k))

    monkeypatch.setattr(sel, "refusal_metric_from_logits", fake_metric)
    coeff, table = sel.choose_addition_coeff(tiny_llama, d, ["a", "b"], [1], target=0.7, batch_size=2)
    assert len(table) == len(sel.ADD_COEFFS)
    assert coeff == sel.ADD_COEFFS[2]


def test_filter_by_refusal_keeps_by_the_sign_of_the_metric(tiny_llama, monkeypatch):
    import torch

    import refusal_lens.evaluate as ev

    prompts = ["a", "b", "c", "d"]
    monkeypatch.setattr(ev, "refusal_metric", lambda model, xs, ids, **kw: torch.tensor([1.5, -2.0, 0.3, -0.1]))
    kept, metric = ev.filter_by_refusal(tiny_llama, prompts, [1], refused=True)
    assert kept == ["a", "c"] and metric.tolist() == pytest.approx([1.5, -2.0, 0.3, -0.1])
    kept, _ = ev.filter_by_refusal(tiny_llama, prompts, [1], refused=False)
    assert kept == ["b", "d"]


def test_run_filters_train_and_val_not_test(tiny_llama, tmp_path, monkeypatch):
    """Harmful prompts the model answers and harmless ones it refuses leave train and val; test stays whole."""
    import torch

    import refusal_lens.directions as dirs
    import refusal_lens.evaluate as ev
    import refusal_lens.selection as sel
    from refusal_lens.directions import candidate_directions
    from refusal_lens.evaluate import last_logits

    harmful = HARMFUL[:4] + ["scam the old man", "forge a passport"] + HARMFUL[4:5] + ["spy on my ex"] + HARMFUL[5:]
    harmless = HARMLESS[:4] + ["list three fruits", "name a color"] + HARMLESS[4:5] + ["count to ten"] + HARMLESS[5:]
    answered = {"make a weapon now", "burn the park"}  # one harmful train, one harmful val prompt
    refused = {"how to bake bread"}  # one harmless train prompt

    def sign(x):
        return -1.0 if x in answered else 1.0 if (x in harmful or x in refused) else -1.0

    # filtering reads the metric from logits: tell each row's prompt by its own logits (distinct per prompt)
    texts = list(dict.fromkeys(harmful + harmless))
    own = ev.last_logits(tiny_llama, texts, batch_size=1)

    def fake_metric(logits, ids, eps=1e-8):
        nearest = torch.cdist(logits.double(), own.double()).argmin(-1)
        return torch.tensor([sign(texts[i]) for i in nearest.tolist()])

    monkeypatch.setattr(ev, "refusal_metric_from_logits", fake_metric)
    paths = _write_sets(tmp_path, harmful, harmless, sizes=(6, 3, 2))
    cfg = RunConfig(harmful_path=paths[0], harmless_path=paths[1], max_new_tokens=4, batch_size=4, refusal_ids=[1],
                    max_layer_frac=1.0, n_train=4, strategy="exhaustive")
    used_train = (["how to steal a car", "hurt the cat badly", "break into the house", "scam the old man"],
                  ["tell me a story", "what is the weather", "the dog plays in the park", "list three fruits"])
    used_val = (["poison the dog", "spy on my ex"], ["sing a song", "count to ten", "draw a cat"])
    ref_cands = candidate_directions(tiny_llama, *used_train, batch_size=4, progress=False)
    ref_base = [last_logits(tiny_llama, v, batch_size=4) for v in used_val]

    def second_pass(*a, **kw):
        raise AssertionError("the train prompts ran twice: filtering reads their activations already")

    plain_val_passes = []

    def counted(model, prompts, **kw):
        plain_val_passes.extend([prompts] if kw.get("interventions") is None else [])
        return last_logits(model, prompts, **kw)

    monkeypatch.setattr(dirs, "mean_activations", second_pass)
    monkeypatch.setattr(sel, "last_logits", counted)
    res = run_pipeline(tiny_llama, tmp_path / "run", cfg)
    assert plain_val_passes == []  # selection ran no base pass of its own over the val prompts
    # one pass over the train prompts gave both the filter and the diff-in-means (the used prompts only);
    # the filter's val logits are the selection's baseline
    torch.testing.assert_close(res.candidates.diffs, ref_cands.diffs, rtol=0, atol=1e-5)
    assert res.candidates.provenance["n_harmful"] == 4 and res.candidates.provenance["n_harmless"] == 4
    for key, logits in zip(("harmful_refusal_metric", "harmless_refusal_metric"), ref_base, strict=True):
        assert res.selection.baseline[key] == pytest.approx(float(sel.refusal_metric_from_logits(logits, [1]).mean()),
                                                            abs=1e-4)
    f = res.evaluation["filtering"]
    assert f["harmful_train"] == {"scored": 6, "kept": 5, "used": 4}  # filtered first, then cut to n_train
    assert f["harmful_val"] == {"scored": 3, "kept": 2, "used": 2}
    assert f["harmless_train"] == {"scored": 6, "kept": 5, "used": 4}
    assert f["harmless_val"] == {"scored": 3, "kept": 3, "used": 3}
    assert res.direction.provenance["filtering"] == f
    assert res.selection.config["n_harmful_val"] == 2
    assert res.evaluation["conditions"]["harmful_baseline"]["n"] == 2  # the test split is not filtered
    assert "filtering kept" in (tmp_path / "run" / "report.html").read_text()


def test_filter_that_leaves_too_few_names_no_filter(tiny_llama, tmp_path):
    """A random tiny model refuses nothing: filtering leaves no harmful prompt, and the error says what to do."""
    with pytest.raises(DataError, match="--no-filter"):
        run_pipeline(tiny_llama, tmp_path / "run", _cfg(tmp_path, filter=True))
    assert not (tmp_path / "run").exists()


def test_step_commands_take_the_same_steps_as_run(tmp_path, monkeypatch):
    """`extract` and `select` go through run's prepare_data (refusal tokens + the paper's filtering, on by
    default) and its extraction / selection steps, so a step-by-step result equals the run's."""
    import refusal_lens.pipeline as pl
    from refusal_lens.directions import Candidates, Direction
    from refusal_lens.evaluate import Filtering, RefusalTokens

    calls = []

    def fake_tokens(model, harmful, **kw):
        return RefusalTokens([5, 9], ["a", "b"], 1.0, len(harmful))

    def fake_filter(model, splits, ids, *, n_train, n_val, batch_size, means):  # a fixed subset, as filtering would
        calls.append((n_train, n_val, batch_size))
        for kind in ("harmful", "harmless"):
            target = getattr(splits, kind)
            target["train"], target["val"] = target["train"][1:9], target["val"][1:5]
        return Filtering({"harmful_train": {"scored": 9, "kept": 8, "used": 8}})

    tiny = str(save_tiny("qwen2", tmp_path / "model"))
    monkeypatch.setattr(pl, "find_refusal_tokens", fake_tokens)
    monkeypatch.setattr(pl, "filter_splits", fake_filter)
    assert main(["extract", "-m", tiny, "--batch-size", "4", "--out", str(tmp_path / "c")]) == 0
    assert main(["select", str(tmp_path / "c.safetensors"), "-m", tiny, "--strategy", "exhaustive",
                 "--max-layer-frac", "1", "--out", str(tmp_path / "d")]) == 0
    assert calls == [(128, 32, 4), (128, 32, 16)]  # both steps filter, with their own sizes
    cfg = RunConfig(batch_size=4, strategy="exhaustive", max_layer_frac=1.0, max_new_tokens=2, n_test=2,
                    mmlu_per_subject=0)
    from refusal_lens.models import load_model

    res = run_pipeline(load_model(tiny), tmp_path / "run", cfg)
    step = Candidates.load(tmp_path / "c")
    assert torch.allclose(step.diffs, res.candidates.diffs, atol=1e-6)
    assert step.provenance["filtering"] == res.candidates.provenance["filtering"]
    d = Direction.load(tmp_path / "d")
    assert (d.layer, d.position) == (res.direction.layer, res.direction.position)
    assert d.provenance["addition_coeff"] == res.direction.provenance["addition_coeff"]


def test_every_condition_generates_in_one_call(tiny_llama, tmp_path, monkeypatch):
    """The evaluation's conditions decode in one stream of batches (complete_each, batch 256); each condition's
    completions are those it gets generated alone."""
    import refusal_lens.pipeline as pl
    from refusal_lens.interventions import complete, complete_each

    calls = []

    def spy(model, conditions, **kw):
        calls.append(({name: len(p) for name, (p, _) in conditions.items()}, kw["batch_size"]))
        return complete_each(model, conditions, **kw)

    monkeypatch.setattr(pl, "complete_each", spy)
    cfg = _cfg(tmp_path)
    res = run_pipeline(tiny_llama, tmp_path / "run", cfg)
    assert cfg.gen_batch_size == 256
    assert len(calls) == 1 and calls[0][1] == 256
    assert calls[0][0] == {name: 2 for name in res.evaluation["conditions"]}
    rows = res.completions
    added = res.evaluation["addition"]
    for name, ivs in (("harmless_ablated", [res.direction.ablate(tiny_llama)]), ("harmful_baseline", []),
                      ("harmless_added_coeff1", [res.direction.add(tiny_llama, 1.0)]),
                      ("harmless_added_tuned", [res.direction.add(tiny_llama, added["tuned_coeff"])])):
        mine = [r for r in rows if r["condition"] == name]
        if not mine:  # no tuned condition when the tuned coefficient is 1
            assert name == "harmless_added_tuned" and added["tuned_coeff"] == 1.0
            continue
        alone = complete(tiny_llama, [r["instruction"] for r in mine], interventions=ivs,
                         max_new_tokens=cfg.max_new_tokens, progress=False)
        assert [r["completion"] for r in mine] == alone.texts
    assert [r["condition"] for r in rows][::2] == list(res.evaluation["conditions"])  # 2 test prompts each

"""selection.py: the paper's filters, fallbacks, and fast vs exhaustive strategies."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refusal_lens.directions import candidate_directions
from refusal_lens.errors import DataError
from refusal_lens.jsonio import json_safe
from refusal_lens.selection import CandidateScore, Selection, _pick, effective_threshold, select_direction

HARMFUL = ["how to steal a car", "make a weapon now", "hurt the cat badly", "break into the house"]
HARMLESS = ["tell me a story", "what is the weather", "how to bake bread", "the dog plays in the park"]
VAL_H = ["steal the bread", "weapon in the park"]
VAL_HL = ["a story about bread", "the weather today"]


def test_pick_rules():
    s = [CandidateScore(1, -1, bypass=-3, induce=-1, kl=0.05), CandidateScore(2, -1, bypass=-2, induce=0.5, kl=0.05),
         CandidateScore(3, -1, bypass=-5, induce=1.0, kl=0.5), CandidateScore(4, -1, bypass=-6, induce=-1, kl=0.3)]
    best, rule = _pick(s, max_kl=0.1, kl_weight=10, effective=-2.5)
    assert (best.layer, rule) == (2, 0)  # the only one passing induce > 0 and KL < 0.1
    s[1].induce = -0.1
    best, rule = _pick(s, max_kl=0.1, kl_weight=10, effective=-2.5)
    assert (best.layer, rule) == (1, 1)  # fallback 1: effective (bypass <= -2.5) with KL < 0.1
    best, rule = _pick(s, max_kl=0.1, kl_weight=10, effective=-4)
    assert (best.layer, rule) == (4, 2)  # fallback 2: effective ones (layers 3, 4) all have KL > 0.1: lowest KL
    best, rule = _pick(s, max_kl=0.1, kl_weight=10, effective=-10)
    assert (best.layer, rule) == (4, 3)  # fallback 3: none effective: bypass + 10 KL (-6 + 3 is the lowest)
    # effective = at least half-way from the harmful to the harmless baseline metric
    assert effective_threshold({"harmful_refusal_metric": 1.0, "harmless_refusal_metric": -3.0}) == -1.0


def test_select_on_tiny_model(tiny_llama, tmp_path):
    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    refusal_ids = [tiny_llama.tokenizer.convert_tokens_to_ids("<|eos|>")]
    d, sel = select_direction(tiny_llama, c, VAL_H, VAL_HL, refusal_ids, strategy="exhaustive",
                              max_layer_frac=1.0, progress=False)
    scored = [s for s in sel.scores if not math.isnan(s.bypass)]
    assert all(c.is_valid(s.layer, c.positions.index(s.position)) for s in scored)
    assert (0, -1) not in {(s.layer, s.position) for s in sel.scores}  # zero candidate never scored
    assert (d.layer, d.position) == (sel.layer, sel.position)
    best, rule = _pick(sel.scores, sel.config["max_kl"], sel.config["kl_weight"],
                       effective=effective_threshold(sel.baseline))
    assert (best.layer, best.position, rule) == (sel.layer, sel.position, sel.rule)
    sel.save(tmp_path / "sel.json")
    strict = json.loads((tmp_path / "sel.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert any(sc["screen_bypass"] is None for sc in strict["scores"])  # not computed: null, not NaN
    back = Selection.load(tmp_path / "sel.json")
    assert (back.layer, back.position, back.rule) == (sel.layer, sel.position, sel.rule)
    assert all(math.isnan(b.screen_bypass) and b.bypass == s.bypass for b, s in zip(back.scores, sel.scores, strict=True))
    fig = sel.plot()
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.name for t in heat] == ["bypass", "induce", "kl"]  # screens were not run: no panel for them
    grid = sel.grid("bypass")
    assert [[None if math.isnan(v) else v for v in row] for row in grid.tolist()] == [list(r) for r in heat[0].z]
    stars = [t for t in fig.data if t.type == "scatter"]
    assert all((list(t.x), list(t.y)) == ([str(sel.position)], [sel.layer]) for t in stars) and len(stars) == 3
    # fast strategy with a top_k covering everything picks the same
    d2, sel2 = select_direction(tiny_llama, c, VAL_H, VAL_HL, refusal_ids, strategy="fast", top_k=100,
                                max_layer_frac=1.0, progress=False)
    assert (d2.layer, d2.position) == (d.layer, d.position)


def test_json_safe_writes_strict_json():
    out = json_safe({"a": float("nan"), 1.5: [float("inf"), -float("inf"), 2.0, (3, "x")], "n": None})
    assert out == {"a": None, "1.5": [None, None, 2.0, [3, "x"]], "n": None}
    assert json.loads(json.dumps(out)) == out


def test_fast_screens_kl_where_the_pick_lies(tiny_llama):
    """KL is screened on the best position of every layer and on the 2 * top_k best candidates; the
    candidates whose screens pass fallback 1 are scored fully first."""
    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    refusal_ids = [tiny_llama.tokenizer.convert_tokens_to_ids("<|eos|>")]
    top_k = 1  # the tiny model has 4 valid candidates
    _, sel = select_direction(tiny_llama, c, VAL_H, VAL_HL, refusal_ids, strategy="fast", top_k=top_k,
                              max_layer_frac=1.0, progress=False)
    by_screen = sorted(sel.scores, key=lambda s: s.screen_bypass)
    assert len(by_screen) > 2 * top_k and not any(math.isnan(s.screen_bypass) for s in by_screen)
    kl_screened = {(s.layer, s.position) for s in sel.scores if not math.isnan(s.screen_kl)}
    best_per_layer: dict[int, tuple[int, int]] = {}
    for s in by_screen:
        best_per_layer.setdefault(s.layer, (s.layer, s.position))
    assert {(s.layer, s.position) for s in by_screen[: 2 * top_k]} | set(best_per_layer.values()) == kl_screened
    full = {(s.layer, s.position) for s in sel.scores if not math.isnan(s.bypass)}
    assert len(full) == top_k
    thr = effective_threshold(sel.baseline)
    rule1 = [(s.layer, s.position) for s in by_screen
             if (s.layer, s.position) in kl_screened and s.screen_kl < 0.15 and s.screen_bypass <= thr]
    assert set(rule1[:top_k]) <= full


def test_select_bad_input(tiny_llama):
    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    with pytest.raises(DataError):
        select_direction(tiny_llama, c, [], VAL_HL, [1], progress=False)
    with pytest.raises(DataError, match="strategy"):
        select_direction(tiny_llama, c, VAL_H, VAL_HL, [1], strategy="magic", progress=False)


def test_gradient_screen_is_the_derivative_of_ablation(tiny_model):
    """-r^T M r is d/d(eps) of the mean refusal metric under partial ablation x - eps (x.r) r, at eps=0."""
    import torch

    from refusal_lens.interventions import Intervention
    from refusal_lens.selection import _metric, _write_hooks, gradient_screen_matrix

    ids = [5, 9]
    M, base = gradient_screen_matrix(tiny_model, HARMFUL, ids, batch_size=3)
    r = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    r = r / r.norm()
    eps = 1e-3

    def partial(act, hook):
        return act - eps * (act @ r).unsqueeze(-1) * r

    class PartialAblation(Intervention):  # any edit is an Intervention: its hooks, nothing more
        def fwd_hooks(self):
            return [(name, partial) for name in _write_hooks(self.model)]

    plus = _metric(tiny_model, HARMFUL, ids, PartialAblation(tiny_model), 8)
    assert abs(base - _metric(tiny_model, HARMFUL, ids, None, 8)) < 1e-5
    est = -float(r.double() @ M @ r.double())
    assert abs((plus - base) / eps - est) < 0.02 * abs(est) + 2e-3


def test_base_logits_given_are_the_baseline(tiny_llama):
    """Logits already read (by the filtering pass) stand in for selection's own base pass; the wrong rows are
    refused with the fix named."""
    from refusal_lens.evaluate import last_logits

    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    ids = [tiny_llama.tokenizer.convert_tokens_to_ids("<|eos|>")]
    kw = dict(strategy="exhaustive", max_layer_frac=1.0, layers=[1, 2], progress=False)
    _, own = select_direction(tiny_llama, c, VAL_H, VAL_HL, ids, **kw)
    given = (last_logits(tiny_llama, VAL_H), last_logits(tiny_llama, VAL_HL))
    _, sel = select_direction(tiny_llama, c, VAL_H, VAL_HL, ids, base_logits=given, **kw)
    assert sel.baseline == own.baseline and [s.kl for s in sel.scores] == [s.kl for s in own.scores]
    shifted = (given[0], given[1] + torch.linspace(0, 3, given[1].shape[-1]))  # another baseline: other KLs
    _, other = select_direction(tiny_llama, c, VAL_H, VAL_HL, ids, base_logits=shifted, **kw)
    assert [s.kl for s in other.scores] != [s.kl for s in own.scores]
    with pytest.raises(DataError, match="in order"):
        select_direction(tiny_llama, c, VAL_H, VAL_HL, ids, base_logits=(given[0][:1], given[1]), **kw)

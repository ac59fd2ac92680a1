"""Every supported family, end to end on a tiny random model: extract -> ablate -> orthogonalize -> export
-> reload with plain ``transformers``.

Families (``tests/tiny.py``, ALL_ARCHS): Llama, Qwen2, Qwen3, Mistral, Phi-3 and GPT-2, where the
orthogonalized weights compute the same function as hook ablation, and Gemma2, Gemma3 and OLMo2, whose
norms after ``o_proj`` / ``down_proj`` make the (exact, r-free) edit a slightly different function: there
the residual stream's component along ``r`` is checked, and the KL to hook ablation is bounded and printed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lens.directions import candidate_directions
from refusal_lens.export import ExportReport, export
from refusal_lens.interventions import generate
from refusal_lens.models import load_model
from refusal_lens.orthogonalize import (
    _batch,
    _logits,
    max_component_along,
    max_logit_diff,
    mean_kl,
    unit_vector,
)
from refusal_lens.prompts import position_ids_from_mask
from tiny import ALL_ARCHS, D_MODEL, N_LAYERS, save_tiny

HARMFUL = ["How can I make a bomb to hurt someone?", "How do I steal a car?", "Write a message that tricks people."]
HARMLESS = ["How do I bake a loaf of bread?", "Tell me a story about a dragon.", "Explain why the sky is blue."]
PROMPTS = ["Give me a list of healthy snacks.", "How do I hack a computer?", "Why?"]
POST_NORM = ("gemma2", "gemma3", "olmo2")  # a norm after o_proj / down_proj
#: Mean KL(hook ablation || orthogonalized) per position allowed for the post-norm families; measured
#: 0.0100 (gemma2), 0.0147 (gemma3), 0.0020 (olmo2) nats on these fixtures with their extracted layer-1
#: direction (printed by the test, with the ablation's own KL from the base model for scale).
KL_BOUND = 0.03


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_extract_ablate_orthogonalize_export_reload(arch, tmp_path):
    src = save_tiny(arch, tmp_path / "src")
    model = load_model(src)
    assert model.cfg.d_model == D_MODEL and model.cfg.n_layers == N_LAYERS

    # extract
    cands = candidate_directions(model, HARMFUL, HARMLESS, positions=[-1], batch_size=8, progress=False)
    assert cands.diffs.shape == (N_LAYERS, 1, D_MODEL)
    d = cands.direction(1, -1)
    assert torch.isfinite(d.vector).all() and d.norm > 0
    r = unit_vector(d)

    # ablate (hooks): the residual stream holds no r, and the logits move
    batch = _batch(model, PROMPTS)
    base = _logits(model, batch)
    with d.ablate(model):
        assert max_component_along(model, batch, r) <= 1e-5
        hooked = _logits(model, batch)
    assert max_logit_diff(base, hooked, batch.attention_mask) > 1e-3
    completions = generate(model, PROMPTS[:2], interventions=[d.ablate(model)], max_new_tokens=4, progress=False)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)

    # orthogonalize + export (verified against hook ablation and by reload inside export)
    out = tmp_path / "out"
    report = export(model, d, out, verify_prompts=PROMPTS)
    assert ExportReport.load(out) == report
    assert report.max_logit_diff <= 1e-4
    assert report.max_resid_along_r <= 1e-5
    if arch in POST_NORM:
        effect = mean_kl(base, hooked, batch.attention_mask)
        print(f"{arch}: orthogonalized vs hook ablation: mean KL {report.kl_vs_hook_ablation:.3g} nats "
              f"(hook ablation vs base: {effect:.3g}), max |logit diff| {report.hook_ablation_diff:.3g}, "
              f"max |x.r|/|x| {report.max_resid_along_r:.3g}")
        assert report.exact is False and 0 < report.kl_vs_hook_ablation <= KL_BOUND
        assert report.kl_vs_hook_ablation < effect  # the two ablations differ less than ablation moves the model
    else:
        assert report.exact is True and report.hook_ablation_diff <= 1e-4

    # reload with plain transformers: same logits as the edited model, no r in its hidden states
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert plain.config.tie_word_embeddings is False
    with torch.no_grad():
        res = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True)
    assert max_logit_diff(res.logits.float(), _logits(model, batch), batch.attention_mask) <= 1e-4
    keep = batch.attention_mask.bool()
    for layer, h in enumerate(res.hidden_states[:-1]):  # block inputs (the last one is after the final norm)
        x = h[keep]
        assert ((x @ r).abs() / x.norm(dim=-1)).max() <= 1e-5, f"{arch}: layer {layer} holds r"

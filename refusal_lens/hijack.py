"""How an adversarial suffix hijacks attention away from the refusal direction (paper section 5).

For four conditions -- harmful prompts with no suffix, with the adversarial suffix, with a random suffix of
the same token length, and harmless prompts -- :func:`hijack_analysis` measures at the last token:

1. the cosine similarity of the residual stream with the refusal direction at every block input and at
   the final residual (mean and std over prompts);
2. the top-``k`` heads by direct attribution onto the direction (chosen on harmful prompts without a
   suffix; see :mod:`refusal_lens.attribution`) and their attribution under every condition;
3. where those heads look: the share of the last token's attention on the instruction's tokens, the
   suffix's tokens, the chat template's tokens, and the first token (the usual attention sink), with
   token-level attention rows of one example prompt per condition;
4. what the model then says: greedy completions per condition, their refusal score (the paper's substring
   list), the share judged coherent by the model itself, and the share that merely echo the suffix (a
   suffix can "work" by making the model repeat it, which is no answer either).

Token spans are located from character offsets of the rendered chat prompt (template prefix, instruction,
suffix, post-instruction template), so they do not depend on a per-family table.

Example:
    >>> res = SuffixResult.load("suffix.json")
    >>> report = hijack_analysis(model, direction, harmful_test[:32], harmless_test[:32], res)
    >>> report.summary()["cosine_at_layer"]; report.save("out/hijack")   # hijack.json + hijack.html
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.attribution import (
    cache_at,
    component_hook_names,
    head_label,
    project_components,
    resid_hook_name,
)
from refusal_lens.directions import Direction
from refusal_lens.errors import DataError, RefusalLensError
from refusal_lens.evaluate import coherence, refusal_score
from refusal_lens.interventions import generate
from refusal_lens.prompts import ChatFormat, batches, chat_format
from refusal_lens.suffix import SuffixResult
from refusal_lens.suffix import random_suffix as draw_random_suffix

FORMAT_VERSION = 1
SPANS = ("instruction", "suffix", "template", "first_token")
HARMFUL, ADVERSARIAL, RANDOM, HARMLESS = "harmful", "harmful+adversarial", "harmful+random", "harmless"


class HijackError(RefusalLensError):
    """The hijack analysis cannot run on these inputs."""


# --------------------------------------------------------------------------------------------------
# Token spans
# --------------------------------------------------------------------------------------------------


def token_spans(
    tokenizer, fmt: ChatFormat, instruction: str, suffix: str = ""
) -> tuple[list[int], list[str], list[str]]:
    """Token ids, token strings and span names (``SPANS``) of ``fmt.format(instruction + suffix)``.

    Each token belongs to the span holding its first character; the first token is ``first_token``.
    """
    text = fmt.format(instruction + suffix)
    a = len(fmt.prefix)
    b = a + len(instruction)
    c = b + len(suffix)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        ids = enc["input_ids"]
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizers: fall back to lengths
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_pre = len(tokenizer(fmt.prefix + instruction, add_special_tokens=False)["input_ids"])
        n_prefix = len(tokenizer(fmt.prefix, add_special_tokens=False)["input_ids"])
        n_post = fmt.n_post
        offsets = None
        names = (
            ["template"] * n_prefix
            + ["instruction"] * (n_pre - n_prefix)
            + ["suffix"] * (len(ids) - n_pre - n_post)
            + ["template"] * n_post
        )
    if offsets is not None:
        names = []
        for start, _end in offsets:
            if a <= start < b:
                names.append("instruction")
            elif b <= start < c:
                names.append("suffix")
            else:
                names.append("template")
    if names:
        names[0] = "first_token"
    strings = [
        tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids
    ]
    return ids, strings, names


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _mean_std(x: Tensor) -> tuple[list[float], list[float]]:
    x = x.to(torch.float64)
    std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.zeros_like(x[0])
    return x.mean(0).tolist(), std.tolist()


@dataclass
class HijackReport:
    """Results of :func:`hijack_analysis` (all lists are plain floats, JSON-ready).

    Attributes:
        conditions: condition names in order (``harmful``, ``harmful+adversarial``, ``harmful+random``,
            ``harmless``; suffix conditions are absent when no suffix was given).
        layer_labels: ``"0"`` .. ``"n-1"`` (block inputs) and ``"final"`` (final residual, before the norm).
        cosine_mean, cosine_std: per condition, the last-token cosine with the direction per layer label.
        projection_mean: per condition, the mean projection onto the direction at the direction's layer.
        top_heads: ``[layer, head]`` pairs, top-``k`` by direct attribution on harmful prompts, no suffix.
        head_attr_mean, head_attr_std: per condition, attribution of each top head.
        head_attr_grid: per condition, the ``[layer][head]`` mean attribution of every head.
        attention_mass: per condition, per span, the mean share of each top head's last-token attention.
        examples: per condition, one prompt's tokens, span names and the top heads' attention rows.
        metadata: direction, model, suffix texts, prompt counts.
        behaviour: per condition, ``refusal_score``, ``coherent_fraction`` and ``echoes_suffix`` of the
            greedy completions (empty when ``max_new_tokens=0``).
        completions: per condition, the greedy completions themselves.
    """

    conditions: list[str]
    layer_labels: list[str]
    cosine_mean: dict[str, list[float]]
    cosine_std: dict[str, list[float]]
    projection_mean: dict[str, float]
    top_heads: list[list[int]]
    head_attr_mean: dict[str, list[float]]
    head_attr_std: dict[str, list[float]]
    head_attr_grid: dict[str, list[list[float]]]
    attention_mass: dict[str, dict[str, list[float]]]
    examples: dict[str, dict]
    metadata: dict = field(default_factory=dict)
    behaviour: dict[str, dict[str, float]] = field(default_factory=dict)
    completions: dict[str, list[str]] = field(default_factory=dict)

    @property
    def head_labels(self) -> list[str]:
        return [head_label(layer, head) for layer, head in self.top_heads]

    def summary(self) -> dict:
        """Headline numbers: cosine at the direction's layer, top-head attribution, attention shares."""
        idx = self.layer_labels.index(str(self.metadata["direction_layer"]))
        out: dict = {
            "direction_layer": self.metadata["direction_layer"],
            "cosine_at_layer": {c: self.cosine_mean[c][idx] for c in self.conditions},
            "cosine_final": {c: self.cosine_mean[c][-1] for c in self.conditions},
            "projection_at_layer": dict(self.projection_mean),
            "top_heads": self.head_labels,
            "top_head_attribution_sum": {c: float(sum(self.head_attr_mean[c])) for c in self.conditions},
            "attention_share_mean_over_top_heads": {
                c: {s: float(sum(v) / len(v)) if v else 0.0 for s, v in self.attention_mass[c].items()}
                for c in self.conditions
            },
        }
        if self.behaviour:
            out["behaviour"] = self.behaviour
        if ADVERSARIAL in self.conditions and RANDOM in self.conditions:
            out["cosine_drop_adversarial_vs_random"] = (
                out["cosine_at_layer"][RANDOM] - out["cosine_at_layer"][ADVERSARIAL]
            )
        return out

    # ---- figures (drawn by refusal_lens.plots) ----

    def plot_cosine(self):
        from refusal_lens.plots import hijack_cosine

        return hijack_cosine(self)

    def plot_attribution(self):
        from refusal_lens.plots import hijack_attribution

        return hijack_attribution(self)

    def plot_attention_mass(self):
        from refusal_lens.plots import hijack_attention_mass

        return hijack_attention_mass(self)

    def plot_attention_tokens(self):
        from refusal_lens.plots import hijack_attention_tokens

        return hijack_attention_tokens(self)

    def plot_behaviour(self):
        from refusal_lens.plots import hijack_behaviour

        return hijack_behaviour(self)

    def plot(self) -> dict:
        """All figures (:func:`refusal_lens.plots.hijack_figures`): ``behaviour`` (when completions were
        generated), ``cosine``, ``attribution``, ``attention_mass``, ``attention_tokens``."""
        from refusal_lens.plots import hijack_figures

        return hijack_figures(self)

    # ---- persistence ----

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self), "summary": self.summary()}

    def save(self, directory: str | Path, *, html: bool = True) -> Path:
        """Write ``hijack.json`` (and, with ``html``, the page ``hijack.html`` of
        :func:`refusal_lens.report.write_hijack_report`) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hijack.json").write_text(json.dumps(self.to_dict(), indent=1))
        if html:
            from refusal_lens.report import write_hijack_report

            write_hijack_report(self, directory / "hijack.html")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> HijackReport:
        path = Path(directory)
        path = path / "hijack.json" if path.is_dir() else path
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HijackError(f"Cannot read {path}: {e}. Re-run hijack_analysis.") from e
        d.pop("format_version", None)
        d.pop("summary", None)
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


@dataclass
class _CondResult:
    cos: Tensor  # [n, n_layers + 1]
    heads: Tensor  # [n, L, H]
    total: Tensor  # [n]
    mass: Tensor  # [n, L, H, n_spans]
    example: dict | None


def _suffix_text(model, suffix: SuffixResult | str | None) -> tuple[str | None, int]:
    if suffix is None:
        return None, 0
    if isinstance(suffix, SuffixResult):
        text = suffix.text_for(model.tokenizer)
        return text, suffix.n_tokens
    if not isinstance(suffix, str) or not suffix.strip():
        raise HijackError("The suffix must be a SuffixResult or a non-empty string.")
    return suffix, len(model.tokenizer(suffix, add_special_tokens=False)["input_ids"])


def _run_condition(
    model,
    direction: Direction,
    instructions: list[str],
    suffix: str,
    fmt: ChatFormat,
    batch_size: int,
    desc: str,
    progress: bool,
) -> _CondResult:
    n_layers = int(model.cfg.n_layers)
    L = direction.layer
    r = direction.vector.to(torch.float32)
    resid_names = [resid_hook_name(n_layers, layer) for layer in range(n_layers + 1)]
    pattern_names = [get_act_name("pattern", layer) for layer in range(L)]
    names = list(dict.fromkeys(resid_names + component_hook_names(model, L) + pattern_names))
    cos_all, heads_all, total_all, mass_all = [], [], [], []
    example = None
    tok = model.tokenizer
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    for batch in batches(tok, instructions, batch_size, fmt, suffix=suffix):
        acts = cache_at(model, batch, names, [-1])
        resid = torch.stack([acts[n][:, 0] for n in resid_names], 1)  # [b, n_layers + 1, d]
        cos_all.append(torch.nn.functional.cosine_similarity(resid, r.expand_as(resid), dim=-1))
        comp = project_components(model, acts, L, lambda x: x @ r)
        heads_all.append(comp.heads)
        total_all.append(resid[:, L] @ r)
        seq = batch.input_ids.shape[1]
        b = batch.input_ids.shape[0]
        mass = torch.zeros(b, L, int(model.cfg.n_heads), len(SPANS))
        pats = torch.stack([acts[n][:, :, 0, :] for n in pattern_names], 1) if L else None  # [b, L, H, seq]
        for i, instr in enumerate(batch.instructions):
            ids, strings, span_names = token_spans(tok, fmt, instr, suffix)
            row = batch.input_ids[i, seq - len(ids) :].tolist()
            if row != ids:
                raise HijackError(
                    "Token spans do not match the batch's tokens; the chat format and the tokenizer "
                    "disagree (pass fmt= built from this tokenizer)."
                )
            if pats is None:
                continue
            p = pats[i, :, :, seq - len(ids) :]  # [L, H, n_i]
            for s_idx, s in enumerate(SPANS):
                sel = torch.tensor([n == s for n in span_names])
                mass[i, :, :, s_idx] = p[..., sel].sum(-1)
            if example is None:
                example = {"instruction": instr, "tokens": strings, "spans": span_names, "attention_all": p}
        mass_all.append(mass)
        bar.update(b)
    bar.close()
    return _CondResult(
        torch.cat(cos_all), torch.cat(heads_all), torch.cat(total_all), torch.cat(mass_all), example
    )


def echoes_suffix(completion: str, suffix: str, window: int = 12) -> bool:
    """True when ``completion`` contains ``window`` consecutive characters of ``suffix`` (stripped; the
    whole suffix when it is shorter): the model repeating its prompt's suffix rather than answering."""
    core = suffix.strip()
    if not core:
        return False
    w = min(window, len(core))
    return any(core[i : i + w] in completion for i in range(len(core) - w + 1))


def _behaviour(model, instructions, suffix, fmt, max_new_tokens, batch_size, desc, progress):
    texts = generate(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                     suffix=suffix, progress=progress, desc=f"generating: {desc}")
    coh = coherence(model, [i + suffix for i in instructions], texts, batch_size=batch_size, fmt=fmt)
    echo = [echoes_suffix(t, suffix) for t in texts]  # False throughout when there is no suffix
    return texts, {
        "refusal_score": refusal_score(texts),
        "coherent_fraction": coh.fraction,
        "echoes_suffix": sum(echo) / max(len(echo), 1),
    }


def hijack_analysis(
    model,
    direction: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    suffix: SuffixResult | str | None,
    random_suffix: SuffixResult | str | None = None,
    top_k: int = 8,
    *,
    fmt: ChatFormat | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> HijackReport:
    """Compare harmful prompts with no / adversarial / random suffix, and harmless prompts.

    Args:
        direction: the refusal direction; its layer is where head attribution is read.
        harmful, harmless: instructions (the chat template is applied here).
        suffix: the adversarial suffix (:class:`SuffixResult`, tokenizer checked, or text). ``None`` runs
            only the two suffix-free conditions.
        random_suffix: the control; default a random suffix of the same token length (``seed``).
        top_k: number of heads to follow.
        max_new_tokens: length of the greedy completions scored per condition (0: no generation).

    Returns:
        :class:`HijackReport` (``.summary()``, ``.plot()``, ``.save(dir)``).

    Example:
        >>> adv = SuffixResult.load("refusal_lens/data/suffix_qwen2.5_coder_0.5b.json")
        >>> report = hijack_analysis(model, direction, harmful_test, harmless_test, adv)
        >>> report.save("runs/hijack")            # numbers + hijack.html
    """
    direction.check_model(model)
    for name, items in (("harmful", harmful), ("harmless", harmless)):
        if isinstance(items, str) or len(items) == 0:
            raise DataError(
                f"The {name} prompt list is empty (or a single string); pass a list of instructions."
            )
    if direction.layer < 1:
        raise HijackError(
            "The direction's layer must be >= 1: at layer 0 no head has written to the residual yet."
        )
    if top_k < 1:
        raise HijackError(f"top_k must be >= 1, got {top_k}.")
    if max_new_tokens < 0:
        raise HijackError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    fmt = fmt or chat_format(model)
    adv_text, n_tok = _suffix_text(model, suffix)
    if adv_text is not None and random_suffix is None:
        random_suffix = draw_random_suffix(model.tokenizer, n_tok, seed=seed)
    rand_text, _ = _suffix_text(model, random_suffix) if adv_text is not None else (None, 0)

    conds: dict[str, tuple[list[str], str]] = {HARMFUL: (list(harmful), "")}
    if adv_text is not None:
        conds[ADVERSARIAL] = (list(harmful), adv_text)
        conds[RANDOM] = (list(harmful), rand_text)
    conds[HARMLESS] = (list(harmless), "")
    results = {
        c: _run_condition(model, direction, instrs, suf, fmt, batch_size, c, progress)
        for c, (instrs, suf) in conds.items()
    }

    behaviour, completions = {}, {}
    if max_new_tokens:
        for c, (instrs, suf) in conds.items():
            completions[c], behaviour[c] = _behaviour(model, instrs, suf, fmt, max_new_tokens, batch_size, c, progress)

    n_layers = int(model.cfg.n_layers)
    n_heads = int(model.cfg.n_heads)
    k = min(top_k, direction.layer * n_heads)
    flat = results[HARMFUL].heads.mean(0).flatten()
    order = flat.argsort(descending=True)[:k].tolist()
    top = [[i // n_heads, i % n_heads] for i in order]

    def pick(x: Tensor) -> Tensor:  # [n, L, H, ...] -> [n, k, ...]
        return torch.stack([x[:, layer, head] for layer, head in top], 1)

    cosine_mean, cosine_std, attr_mean, attr_std, grid, mass, examples, proj = {}, {}, {}, {}, {}, {}, {}, {}
    for c, res in results.items():
        cosine_mean[c], cosine_std[c] = _mean_std(res.cos)
        attr_mean[c], attr_std[c] = _mean_std(pick(res.heads))
        grid[c] = res.heads.mean(0).tolist()
        proj[c] = float(res.total.mean())
        m = pick(res.mass).mean(0)  # [k, n_spans]
        mass[c] = {s: m[:, j].tolist() for j, s in enumerate(SPANS)}
        if res.example is not None and c != HARMLESS:
            ex = res.example
            att = torch.stack([ex["attention_all"][layer, head] for layer, head in top])
            examples[c] = {
                "instruction": ex["instruction"],
                "tokens": ex["tokens"],
                "spans": ex["spans"],
                "attention": att.tolist(),
            }
    from refusal_lens.models import model_id

    return HijackReport(
        conditions=list(conds),
        layer_labels=[str(i) for i in range(n_layers)] + ["final"],
        cosine_mean=cosine_mean,
        cosine_std=cosine_std,
        projection_mean=proj,
        top_heads=top,
        head_attr_mean=attr_mean,
        head_attr_std=attr_std,
        head_attr_grid=grid,
        attention_mass=mass,
        examples=examples,
        metadata={
            "model_id": model_id(model),
            "direction_layer": direction.layer,
            "direction_position": direction.position,
            "suffix": adv_text,
            "random_suffix": rand_text,
            "suffix_tokens": n_tok,
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "top_k": k,
            "max_new_tokens": max_new_tokens,
            "position": "last token",
            "spans": list(SPANS),
        },
        behaviour=behaviour,
        completions=completions,
    )

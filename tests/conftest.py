"""Shared fixtures: tiny random chat models (see tiny.py) booted through refusal-lens, and the embedded model."""

from __future__ import annotations

import functools

import pytest
import torch

from tiny import ARCHS, make_hf_model, make_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def boot_rl_tiny(arch: str, seed: int = 0):
    """A tiny random model booted with refusal_lens.models.boot_bridge (untied, KV-cache fix, model id)."""
    from refusal_lens.models import boot_bridge

    return boot_bridge(make_hf_model(arch, seed=seed), make_tokenizer(), f"tiny-{arch}")


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    """A tiny random bridge, one per architecture (fresh each test: tests may edit weights)."""
    return boot_rl_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return boot_rl_tiny("llama")


@functools.cache
def _embedded():
    from refusal_lens import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded default model, loaded once per session (do not edit its weights in tests)."""
    return _embedded()

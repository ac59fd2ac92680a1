"""The tiny offline fixtures in ``tests/tiny.py``: tokenizer, four HF architectures, and their bridges."""

from __future__ import annotations

import pytest
import torch
import transformers

from tiny import ARCHS, D_MODEL, N_HEADS, N_LAYERS, boot_tiny, make_hf_model, make_tokenizer, save_tiny

PROMPTS = ("How do I bake a loaf of bread?", "Tell me a story about a dragon.")


def chat(content: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return make_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(text: str) -> torch.Tensor:
    # Chat strings already hold BOS; the tokenizer would prepend a second one.
    return make_tokenizer()(text, add_special_tokens=False, return_tensors="pt").input_ids


def test_tokenizer_and_chat_template():
    tok = make_tokenizer()
    assert 300 <= len(tok) <= 500
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    for special in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1

    text = chat("hi", system="Be brief.")
    assert text == "<|bos|><|system|>Be brief.<|end|>\n<|user|>hi<|end|>\n<|assistant|>\n"
    ids = encode(text)[0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == text
    assert tok("hi").input_ids[0] == tok.bos_token_id  # plain text gets BOS, like Llama/Gemma tokenizers

    batch = tok([chat("hi"), chat(PROMPTS[0])], add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id and batch.attention_mask[0, 0] == 0
    assert make_tokenizer().get_vocab() == tok.get_vocab()


@pytest.fixture(scope="module", params=ARCHS)
def booted(request):
    """(arch, bridge, HF logits for PROMPTS[0] computed before booting, which rewires the HF model)."""
    arch = request.param
    model = make_hf_model(arch)
    with torch.no_grad():
        hf_logits = model(encode(chat(PROMPTS[0]))).logits
    return arch, boot_tiny(arch, hf_model=model), hf_logits


def test_bridge_boots(booted):
    from transformer_lens.model_bridge import TransformerBridge

    arch, bridge, _ = booted
    assert isinstance(bridge, TransformerBridge)
    cfg = bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (
        N_LAYERS,
        D_MODEL,
        N_HEADS,
        len(make_tokenizer()),
    )
    if arch != "gpt2":
        assert cfg.n_key_value_heads == 2  # GQA


def test_bridge_logits_equal_hf(booted):
    _, bridge, hf_logits = booted
    tokens = bridge.to_tokens(chat(PROMPTS[0]), prepend_bos=False)
    assert torch.equal(tokens, encode(chat(PROMPTS[0])))
    with torch.no_grad():
        logits = bridge(tokens)
    assert (logits - hf_logits).abs().max().item() < 1e-5


def test_run_with_cache_has_resid_pre(booted):
    _, bridge, _ = booted
    tokens = encode(chat(PROMPTS[0]))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_pre"))
    assert cache["blocks.0.hook_resid_pre"].shape == (1, tokens.shape[1], D_MODEL)
    assert f"blocks.{N_LAYERS - 1}.hook_resid_pre" in cache


def test_different_prompts_give_different_logits(booted):
    _, bridge, _ = booted
    with torch.no_grad():
        last = [bridge(encode(chat(p)))[0, -1] for p in PROMPTS]
    assert last[0].std() > 0.5  # not near-uniform
    assert (last[0] - last[1]).abs().max() > 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_model_properties_and_save_roundtrip(arch, tmp_path):
    model = make_hf_model(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch != "llama")
    assert model.dtype == torch.float32 and not model.training
    assert model.generation_config.pad_token_id == make_tokenizer().pad_token_id
    tokens = encode(chat(PROMPTS[1]))
    with torch.no_grad():
        out = model.generate(
            tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False
        )
        ref = model(tokens).logits
    assert len(set(out[0, tokens.shape[1] :].tolist())) >= 3  # greedy generation is not one repeated token
    same, other = make_hf_model(arch).state_dict(), make_hf_model(arch, seed=1).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())  # deterministic
    assert not torch.equal(model.get_input_embeddings().weight, other[next(iter(other))])

    path = save_tiny(arch, tmp_path / arch)
    assert (path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == len(make_tokenizer()) and tok.padding_side == "left"
    assert tok(chat(PROMPTS[1]), add_special_tokens=False).input_ids == tokens[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)

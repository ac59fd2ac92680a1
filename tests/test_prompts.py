"""prompts.py: chat formats derived from templates, post-instruction positions, left padding."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.errors import ChatTemplateError, DataError
from refusal_lens.prompts import ChatFormat, batches, tokenize_instructions
from tiny import make_tokenizer


def test_post_instruction_tokens_from_template():
    tok = make_tokenizer()
    fmt = ChatFormat.from_tokenizer(tok)
    assert [tok.decode([i]) for i in fmt.post_instruction_ids] == ["<|end|>", "\n", "<|assistant|>", "\n"]
    assert fmt.positions == [-4, -3, -2, -1]
    assert fmt.format("hi").startswith("<|bos|>")


def test_system_prompt_in_prefix():
    tok = make_tokenizer()
    fmt = ChatFormat.from_tokenizer(tok, system_prompt="be nice")
    assert "be nice" in fmt.prefix


def test_single_bos_and_left_padding():
    tok = make_tokenizer()
    b = tokenize_instructions(tok, ["hi", "tell me a much longer story about the cat"])
    bos = tok.bos_token_id
    for row, mask in zip(b.input_ids, b.attention_mask, strict=True):
        real = row[mask.bool()]
        assert real[0] == bos and (real == bos).sum() == 1
    assert b.attention_mask[0, 0] == 0 and b.attention_mask[:, -1].all()
    fmt = ChatFormat.from_tokenizer(tok)
    assert torch.equal(b.input_ids[:, -fmt.n_post :], torch.tensor([fmt.post_instruction_ids] * 2))


def test_padding_does_not_change_last_token_activations(tiny_model):
    fmt = ChatFormat.from_tokenizer(tiny_model.tokenizer)
    alone = tokenize_instructions(tiny_model.tokenizer, ["hi"], fmt)
    padded = tokenize_instructions(tiny_model.tokenizer, ["hi", "a much longer instruction about cats and dogs"], fmt)
    with torch.no_grad():
        a = tiny_model(alone.input_ids)[0, -1]
        p = tiny_model(padded.input_ids, attention_mask=padded.attention_mask)[0, -1]
    assert (a - p).abs().max() < 1e-4


def test_batches_split():
    tok = make_tokenizer()
    sizes = [len(b) for b in batches(tok, [f"q {i}" for i in range(7)], 3)]
    assert sizes == [3, 3, 1]


def test_bad_input():
    tok = make_tokenizer()
    with pytest.raises(DataError):
        tokenize_instructions(tok, [])
    with pytest.raises(DataError, match="list"):
        tokenize_instructions(tok, "a single string")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError):
        ChatFormat.from_tokenizer(tok)


def test_the_model_carries_its_chat_format_to_every_step(tiny_llama):
    from refusal_lens.activations import mean_activations
    from refusal_lens.evaluate import last_logits
    from refusal_lens.prompts import chat_format, set_chat_format

    prompts = ["tell me a story", "the cat sat"]
    default = chat_format(tiny_llama)
    assert chat_format(tiny_llama) is default  # derived once, kept on the model
    base_means = mean_activations(tiny_llama, prompts, progress=False).mean
    base_logits = last_logits(tiny_llama, prompts)

    custom = ChatFormat.from_tokenizer(tiny_llama.tokenizer, system_prompt="be brief")
    assert custom.prefix != default.prefix
    set_chat_format(tiny_llama, custom)
    assert chat_format(tiny_llama) is custom
    means = mean_activations(tiny_llama, prompts, progress=False).mean
    assert torch.equal(means, mean_activations(tiny_llama, prompts, fmt=custom, progress=False).mean)
    assert not torch.allclose(means, base_means)  # the system prompt changed what the model saw
    assert torch.equal(last_logits(tiny_llama, prompts), last_logits(tiny_llama, prompts, fmt=custom))
    assert not torch.allclose(last_logits(tiny_llama, prompts), base_logits)

"""Tiny random chat models for fast, offline tests.

Nine architectures share one byte-level BPE tokenizer of a few hundred tokens, trained in-process on a
fixed corpus, with a small chat template. Everything is deterministic and needs no network.

* :data:`ARCHS` (Llama, Qwen2, Gemma2, GPT-2): the four most tests parametrize over.
* :data:`ALL_ARCHS`: those plus Qwen3, Mistral, Gemma3 (text), Phi-3 and OLMo2 -- every family among
  the paper's and today's common chat models that TransformerLens 4.3's bridge boots -- for
  ``tests/test_architectures.py`` (the whole pipeline once per family).

Usage::

    from tiny import ALL_ARCHS, ARCHS, boot_tiny, make_hf_model, make_tokenizer, save_tiny

(``tests/`` has no ``__init__.py``; pytest's default ``prepend`` import mode puts it on ``sys.path``.)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHS = ("llama", "qwen2", "gemma2", "gpt2")
ALL_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt2")
#: Gemma's RMSNorms scale by ``(1 + weight)``; the others by ``weight``.
GEMMA_ARCHS = ("gemma2", "gemma3")

# ids 0..7 in this order. ``<|endoftext|>`` is unused, but transformers' AutoTokenizer loads a saved qwen2
# folder as ``Qwen2Tokenizer``, which adds it (as id == vocab size, out of the embedding) when missing.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|endoftext|>",
)
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 400
TOKENIZER_NAME = "refusal-lens-tiny-chat"

N_LAYERS = 2
D_MODEL = 64
N_HEADS = 4
N_KV_HEADS = 2
D_HEAD = 16
D_MLP = 128
MAX_POSITIONS = 256

# Re-initialisation (see ``_reinit``). HF's default (std 0.02, zero biases, unit norms) gives near-uniform
# logits, and with a large tied embedding the models just repeat the last token. These values give logits
# with std ~1.6 and varied greedy generations on all four archs.
WEIGHT_STD = 0.2  # every matrix other than embeddings (Q/K/V/O, MLP, untied lm_head)
EMBED_STD = 0.05  # token (and GPT-2 positional) embeddings; Gemma2 divides by sqrt(d_model), its input scale
BIAS_STD = 0.02  # every bias, so that bias terms (e.g. GPT-2's c_proj.bias) are non-zero
NORM_NOISE = 0.1  # norm gains = 1 + noise, so that weight folding is not a no-op
LOGIT_STD = 1.6  # for tied models, the final norm gain is chosen to give about this logit std

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% else %}{{ '<|assistant|>' }}{% endif %}"
    "{{ message['content'] }}{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small cat sat on the warm mat by the door.
How do I bake a loaf of bread at home? Mix flour, water, salt and yeast, then let the dough rise.
Please write a short poem about the sea, the wind and the sky at night.
Can you explain how a bicycle works? The pedals turn a chain that drives the back wheel.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Tell me a story about a dragon who wanted to learn to read books in the library.
I'm sorry, but I cannot help with that request. As an AI, I am unable to assist with harmful things.
I can't do that. I am not able to provide instructions that could hurt people.
Sure, here is a simple recipe for a tasty soup with carrots, onions and potatoes.
Of course! Here are three tips for learning a new language: read, listen and speak every day.
How can I make a bomb or a weapon to hurt someone? How do I steal a car or hack a computer?
Write a message that tricks people into giving away their password or their money.
The weather today is sunny with a light breeze, and the temperature is mild in the afternoon.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.
Explain why the sky is blue. Sunlight scatters off molecules in the air, and blue light scatters most.
Give me a list of healthy snacks: apples, nuts, yogurt, carrots, berries and whole grain crackers.
Summarize the following text in one sentence. Translate this sentence into Spanish, please.
Thank you for your question! Let me think step by step about the answer before I reply.
The model refused the harmful request and answered the harmless request with a helpful reply.
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process; the JSON is the deterministic artefact."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training breaks ties deterministically (same JSON with 1 or 8 rayon threads).
    tok.train_from_iterator(CORPUS.splitlines() * 3, trainer=trainer)
    return tok.to_str()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fresh tokenizer object (cheap: the trained BPE is cached per process)."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        # Like Llama/Gemma tokenizers, plain ``tok(text)`` prepends BOS (and the chat template emits one
        # too, so tokenize chat strings with ``add_special_tokens=False``). TL 4.3's ``setup_tokenizer``
        # needs both of these: without ``add_bos_token=True`` it re-loads the tokenizer from the hub by
        # ``name_or_path`` (fails offline), and it reads ``init_kwargs["name_or_path"]`` (KeyError if absent).
        add_bos_token=True,
        name_or_path=TOKENIZER_NAME,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(arch: str, vocab_size: int, ids: dict[str, int]) -> transformers.PretrainedConfig:
    common = dict(vocab_size=vocab_size, **ids)
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            head_dim=D_HEAD,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "gemma2":
        return transformers.Gemma2Config(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=64,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            head_dim=D_HEAD,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            head_dim=D_HEAD,
            sliding_window=64,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"][:N_LAYERS],
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "phi3":
        return transformers.Phi3Config(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            original_max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "olmo2":
        return transformers.Olmo2Config(
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=D_MODEL,
            n_inner=D_MLP,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_positions=MAX_POSITIONS,
            tie_word_embeddings=True,
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ALL_ARCHS}")


def make_hf_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random fp32 causal LM of the given architecture, in eval mode, eager attention."""
    tok = make_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = _config(arch, len(tok), ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    _reinit(model, arch, seed)
    # As in a saved checkpoint: TransformerLens picks its adapter from ``architectures`` (it falls back to
    # ``model_type`` only for some families, e.g. not for gemma3_text or olmo2).
    model.config.architectures = [type(model).__name__]
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    model.eval()
    return model


_FINAL_NORMS = ("model.norm.weight", "transformer.ln_f.weight")


@torch.no_grad()
def _reinit(model: transformers.PreTrainedModel, arch: str, seed: int) -> None:
    """Deterministic, non-degenerate weights (tied parameters are visited once)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    # Gemma multiplies the embedding by sqrt(d_model) on input; undo that so the blocks are not drowned out.
    embed_std = EMBED_STD / D_MODEL**0.5 if arch in GEMMA_ARCHS else EMBED_STD
    # Tied: logit std ~ sqrt(d_model) * embed_std * final gain (the final norm output has unit rms).
    tied = model.config.tie_word_embeddings
    final_gain = LOGIT_STD / (D_MODEL**0.5 * embed_std) if tied else 1.0
    for name, p in model.named_parameters():
        is_norm = "norm" in name or ".ln_" in name
        if is_norm and name.endswith("weight"):
            gain = (1.0 + NORM_NOISE * randn(p.shape)) * (final_gain if name in _FINAL_NORMS else 1.0)
            p.copy_(gain - 1.0 if arch in GEMMA_ARCHS else gain)  # Gemma's RMSNorm scales by (1 + weight)
        elif name.endswith("bias"):
            p.copy_(BIAS_STD * randn(p.shape))
        elif "embed" in name or name.startswith("transformer.wte") or name.startswith("transformer.wpe"):
            p.copy_(embed_std * randn(p.shape))
        else:
            p.copy_(WEIGHT_STD * randn(p.shape))


def save_tiny(arch: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save model (safetensors) and tokenizer to ``path``, loadable as a local HF folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_hf_model(arch, seed=seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    # transformers 5 drops ``add_bos_token`` on save and load when a tokenizer.json exists: a reloaded
    # tokenizer still prepends BOS (tokenizer.json's post-processor) but reports ``add_bos_token=False``.
    return path


def boot_tiny(arch: str, seed: int = 0, hf_model: transformers.PreTrainedModel | None = None):
    """A ``TransformerBridge`` over a tiny model. Booting rewires the HF model it is given."""
    from transformer_lens.model_bridge import TransformerBridge

    model = hf_model if hf_model is not None else make_hf_model(arch, seed=seed)
    name = f"tiny-random-{arch}"
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=make_tokenizer(), device="cpu")


def dispatch_tiny(arch: str, folder: str | os.PathLike, route: str = "from_pretrained"):
    """``(bridge, source folder)``: a tiny model split by accelerate into in-memory and offloaded parts.

    Layer 0 is offloaded to CPU RAM (``accelerate.cpu_offload``: its parameters are ``meta`` and their
    values live in a state dict); the embedding and layer 1 go to "disk":

    * ``route="from_pretrained"``: ``AutoModelForCausalLM.from_pretrained(src, device_map=...,
      offload_folder=...)``; transformers points the disk entries at the source ``.safetensors`` file.
    * ``route="dispatch_model"``: ``accelerate.dispatch_model(model, device_map, offload_dir=...)`` on an
      in-memory model; accelerate writes the disk entries as ``.dat`` files into the offload folder.

    The final norm stays in memory, the unembedding goes to disk (on this CPU machine a "cpu" entry is not offloaded:
    accelerate offloads "cpu" entries only when a GPU is the main device).
    """
    import accelerate

    from refusal_lens.models import boot_bridge

    folder = Path(folder)
    src = folder / "src"
    if not src.exists():
        save_tiny(arch, src)
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    offload = folder / "offload"
    if route == "from_pretrained":
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            src, device_map=device_map, offload_folder=offload, attn_implementation="eager"
        )
    elif route == "dispatch_model":
        hf = accelerate.dispatch_model(make_hf_model(arch), device_map, offload_dir=offload)
    else:
        raise ValueError(f"unknown route {route!r}")
    accelerate.cpu_offload(hf.model.layers[0], execution_device=torch.device("cpu"))
    return boot_bridge(hf, make_tokenizer(), str(src)), src

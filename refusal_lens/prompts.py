"""Chat templates, post-instruction token positions, and left-padded batches.

The *post-instruction tokens* are the template tokens that follow the user's text, e.g. for Qwen
``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``. They are derived from the tokenizer's
own chat template (render it around a marker and tokenize what follows the marker), never from a
per-family table. Positions are given as negative offsets from the end of the (left-padded) sequence,
so ``-1`` is always the last token, whatever the padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor

from refusal_lens.errors import ChatTemplateError, DataError

_MARKER = "\x1fREFUSAL_LENS_INSTRUCTION\x1f"


@dataclass(frozen=True)
class ChatFormat:
    """How a tokenizer wraps one user instruction.

    Attributes:
        prefix: template text before the instruction (system prompt included).
        suffix: template text after the instruction, up to the start of the assistant's reply.
        post_instruction_ids: token ids of ``suffix``; their count is ``n_post``.
        system_prompt: the system prompt passed to the template, or ``None`` for the template's default.
    """

    prefix: str
    suffix: str
    post_instruction_ids: tuple[int, ...]
    system_prompt: str | None = None

    @property
    def n_post(self) -> int:
        """Number of post-instruction tokens."""
        return len(self.post_instruction_ids)

    @property
    def positions(self) -> list[int]:
        """Post-instruction positions as negative offsets: ``[-n_post, ..., -1]``."""
        return list(range(-self.n_post, 0))

    def format(self, instruction: str) -> str:
        """The full prompt string for one instruction (ends where the assistant's reply begins)."""
        return self.prefix + instruction + self.suffix

    @classmethod
    def from_tokenizer(cls, tokenizer, system_prompt: str | None = None) -> ChatFormat:
        """Derive the format from ``tokenizer.chat_template``.

        Raises:
            ChatTemplateError: when the tokenizer has no chat template or the template does not place
                the instruction verbatim.
        """
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                "The tokenizer has no chat template. Set one before loading, e.g. "
                "`tokenizer.chat_template = open('template.jinja').read()`, or add `chat_template.jinja` "
                "to the model folder."
            )
        messages = [{"role": "user", "content": _MARKER}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors come in many classes
            raise ChatTemplateError(f"The tokenizer's chat template failed to render: {e}") from e
        if text.count(_MARKER) != 1:
            raise ChatTemplateError(
                "The chat template does not place the user's message verbatim exactly once; pass a "
                "tokenizer whose template does."
            )
        prefix, suffix = text.split(_MARKER)
        post_ids = tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"])
        fmt = cls(prefix, suffix, post_ids, system_prompt)
        fmt._check_tokenization(tokenizer)
        return fmt

    def _check_tokenization(self, tokenizer) -> None:
        """The suffix's tokens must be the last tokens of a full prompt (no merge across the boundary)."""
        if self.n_post == 0:
            raise ChatTemplateError(
                "The chat template adds no tokens after the user's message, so there are no "
                "post-instruction positions. Use a template with an assistant header."
            )
        for probe in ("Tell me a story.", "hello world", "Why?"):
            ids = tokenizer(self.format(probe), add_special_tokens=False)["input_ids"]
            if tuple(ids[-self.n_post :]) != self.post_instruction_ids:
                raise ChatTemplateError(
                    "The template's post-instruction tokens merge with the instruction's last tokens "
                    f"(probe {probe!r}); positions would be ambiguous. Use a template with special tokens "
                    "around the user turn."
                )


def chat_format(model, system_prompt: str | None = None) -> ChatFormat:
    """The model's :class:`ChatFormat`: the one given to :func:`set_chat_format`, else its tokenizer's
    template with the template's default system prompt (derived once, then kept on the model).

    Every step (extraction, filtering, selection, generation, evaluation) formats prompts with it, so a
    format set once on the model is used everywhere.

    Args:
        system_prompt: return the tokenizer's format with this system prompt instead (not stored).

    Example:
        >>> fmt = chat_format(model)
        >>> fmt.positions                  # post-instruction positions, e.g. [-5, -4, -3, -2, -1]
    """
    if system_prompt is not None:
        return ChatFormat.from_tokenizer(model.tokenizer, system_prompt)
    fmt = getattr(model, "refusal_lens_fmt", None)
    if fmt is None:
        fmt = ChatFormat.from_tokenizer(model.tokenizer)
        object.__setattr__(model, "refusal_lens_fmt", fmt)
    return fmt


def set_chat_format(model, fmt: ChatFormat) -> None:
    """Make ``fmt`` the model's chat format for every later step (e.g. one with a system prompt).

    Example:
        >>> set_chat_format(model, ChatFormat.from_tokenizer(model.tokenizer, system_prompt="Be brief."))
    """
    object.__setattr__(model, "refusal_lens_fmt", fmt)


@dataclass
class PromptBatch:
    """A left-padded batch of chat prompts.

    Attributes:
        input_ids: ``[batch, seq]`` token ids, left padded.
        attention_mask: ``[batch, seq]`` 1 for real tokens, 0 for padding.
        instructions: the raw instructions.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    instructions: list[str]

    def __len__(self) -> int:
        return len(self.instructions)


def tokenize_instructions(
    tokenizer, instructions: Sequence[str], fmt: ChatFormat | None = None, *, suffix: str = ""
) -> PromptBatch:
    """Apply the chat template and tokenize with left padding, adding no second BOS.

    Args:
        instructions: user messages.
        fmt: the chat format (derived from the tokenizer when omitted).
        suffix: text appended to each instruction inside the user turn (e.g. an adversarial suffix).
    """
    if isinstance(instructions, str):
        raise DataError("Pass a list of instructions, not a single string (wrap it: [instruction]).")
    if len(instructions) == 0:
        raise DataError("The instruction list is empty; pass at least one instruction.")
    fmt = fmt or ChatFormat.from_tokenizer(tokenizer)
    texts = [fmt.format(instr + suffix) for instr in instructions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return PromptBatch(enc["input_ids"], enc["attention_mask"], list(instructions))


def batches(
    tokenizer, instructions: Sequence[str], batch_size: int, fmt: ChatFormat | None = None, *, suffix: str = ""
) -> Iterator[PromptBatch]:
    """Yield left-padded :class:`PromptBatch` es of at most ``batch_size`` instructions."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    fmt = fmt or ChatFormat.from_tokenizer(tokenizer)
    for i in range(0, len(instructions), batch_size):
        yield tokenize_instructions(tokenizer, instructions[i : i + batch_size], fmt, suffix=suffix)


def position_ids_from_mask(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Position ids that start at 0 on each row's first real token (for left-padded batches)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
